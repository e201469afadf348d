// Fused CPU kernels (fp32) for the generalized hyper-connection's read and write, forward and backward.
// The maths and the shapes are those of harness/model/ghc.py; harness/model/cpu_kernels.py builds this
// file on first use, harness/model/ghc_kernel.py wraps the four ops in autograd functions.
//
// T tokens, n slots of width d, m read slots, k = 2m + n coefficients per slot: row i of a token's
// coefficients is [A[i, :] | B[:, i]] = [Å[i, :] (m) | Â[i, :] (n) | Bᵀ[i, :] (m)].
//
//   read:   coef = static + scale ∘ tanh(rstd · H W)   (dynamic; static alone otherwise)
//           X[j] = Σ_i coef[i, j] H[i]                 j < m
//   write:  H⁺[j] = Σ_i coef[i, m + j] H[i] + Σ_l coef[j, m + n + l] Z[l]
//
// Every token's slots, coefficients and gradients fit in L1, so each op is one pass over its tensors;
// torch's batched GEMMs of (n × d) matrices, their cats and the elementwise passes over the coefficients
// made the same maths several times slower. Parameter gradients are summed per thread, then reduced.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "thread_rows.h"
#include "vector_math.h"

namespace {

using at::Tensor;
using vwn::load8;
using vwn::store8;
using vwn::tanh_approx;
using vwn::v8;
using vwn::whole_vectors;

constexpr int64_t kGrainTokens = 32;

void check_input(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim,
              "vwn_ghc: ", name, " must be a contiguous float32 CPU tensor of ", dim, " dims, got ", t.sizes(),
              " ", t.scalar_type(), " on ", t.device());
}

struct Dims {
  int64_t tokens, n, d, m, k;
  Dims(const Tensor& h, int64_t m) : tokens(h.size(0)), n(h.size(1)), d(h.size(2)), m(m), k(2 * m + h.size(1)) {}
};

// out[0:len] += a · x[0:len]
__attribute__((always_inline)) inline void axpy(float* __restrict out, float a, const float* __restrict x, int64_t len) {
  int64_t c = 0;
  for (; c + 8 <= len; c += 8) store8(out + c, load8(out + c) + a * load8(x + c));
  for (; c < len; ++c) out[c] += a * x[c];
}

__attribute__((always_inline)) inline float dot(const float* __restrict x, const float* __restrict y, int64_t len) {
  v8 acc = {};
  int64_t c = 0;
  for (; c + 8 <= len; c += 8) acc += load8(x + c) * load8(y + c);
  float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; c < len; ++c) sum += x[c] * y[c];
  return sum;
}

// out[0:len] (+)= Σ_r a[r] · b[r, 0:len] (row stride ldb): the sum kept in registers when len is a multiple
// of 8 up to 64 (the row widths here), so b is only read and out written once
template <int kVectors>
inline void row_times_matrix_fixed(float* __restrict out, const float* __restrict a, const float* __restrict b,
                                   int64_t rows, int64_t ldb, bool accumulate) {
  v8 acc[kVectors];
  for (int v = 0; v < kVectors; ++v) acc[v] = accumulate ? load8(out + 8 * v) : v8{};
  for (int64_t r = 0; r < rows; ++r) {
    const float* br = b + r * ldb;
    for (int v = 0; v < kVectors; ++v) acc[v] += a[r] * load8(br + 8 * v);
  }
  for (int v = 0; v < kVectors; ++v) store8(out + 8 * v, acc[v]);
}

inline void row_times_matrix(float* __restrict out, const float* __restrict a, const float* __restrict b,
                             int64_t rows, int64_t len, int64_t ldb, bool accumulate) {
  switch (len) {
    case 8: return row_times_matrix_fixed<1>(out, a, b, rows, ldb, accumulate);
    case 16: return row_times_matrix_fixed<2>(out, a, b, rows, ldb, accumulate);
    case 24: return row_times_matrix_fixed<3>(out, a, b, rows, ldb, accumulate);
    case 32: return row_times_matrix_fixed<4>(out, a, b, rows, ldb, accumulate);
    case 40: return row_times_matrix_fixed<5>(out, a, b, rows, ldb, accumulate);
    case 48: return row_times_matrix_fixed<6>(out, a, b, rows, ldb, accumulate);
    case 56: return row_times_matrix_fixed<7>(out, a, b, rows, ldb, accumulate);
    case 64: return row_times_matrix_fixed<8>(out, a, b, rows, ldb, accumulate);
    default:
      if (len > 64 && len % 8 == 0) {  // blocks of 64 columns
        const int64_t head = len - (len - 1) % 64 - 1;
        for (int64_t c = 0; c < head; c += 64) row_times_matrix_fixed<8>(out + c, a, b + c, rows, ldb, accumulate);
        return row_times_matrix(out + head, a, b + head, rows, len - head, ldb, accumulate);
      }
      if (!accumulate) std::fill(out, out + len, 0.0f);
      for (int64_t r = 0; r < rows; ++r) axpy(out, a[r], b + r * ldb, len);
  }
}

// x[0:len] *= r, len a multiple of 8
inline void scale_vectors(float* __restrict x, float r, int64_t len) {
  for (int64_t c = 0; c < len; c += 8) store8(x + c, r * load8(x + c));
}

// out (d) = Σ_i coef[i · stride + column] · rows[i] (rows: n × d): one column of a token's (n, wp)
// coefficients times its n state rows, the column gathered into `scratch` (n floats) first
inline void column_times_rows(float* __restrict out, const float* __restrict coef, int64_t stride, int64_t column,
                              const float* __restrict rows, int64_t n, int64_t d, float* __restrict scratch) {
  for (int64_t i = 0; i < n; ++i) scratch[i] = coef[i * stride + column];
  row_times_matrix(out, scratch, rows, n, d, d, false);
}

// contiguous (rows, k) -> columns [q0, q0 + width) of it, each row zero-padded to `padded` columns
std::vector<float> padded_columns(const Tensor& t, int64_t q0, int64_t width, int64_t padded) {
  const int64_t rows = t.size(0), k = t.size(1);
  const float* T = t.data_ptr<float>();
  std::vector<float> out(rows * padded, 0.0f);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(&out[r * padded], T + r * k + q0, sizeof(float) * width);
  return out;
}

// One token's coefficients of the column range, each slot's row padded to whole vectors: (n, wp) arrays.
struct TokenCoefficients {
  std::vector<float> pre, act, coef, rstd;  // rstd · H W, tanh of it, static + scale ∘ tanh; rstd per slot
  TokenCoefficients(int64_t n, int64_t wp) : pre(n * wp, 0.0f), act(n * wp, 0.0f), coef(n * wp, 0.0f), rstd(n) {}
};

struct ThreadSums;

// The coefficients of one column range [q0, q0 + width) of every slot's row [Å[i, :] | Â[i, :] | Bᵀ[i, :]]
// (read: the m columns of Å; write: the n + m of Â and Bᵀ), computed from the slots' states whenever they are
// needed. Nothing of size (T, n, k) is ever stored: at (8, 64) such a tensor is ten times the state, and
// passes over it were memory-bound; keeping a token's coefficients from forward to backward measured slower
// than recomputing them in cache at every width but (2, 3).
// NOTE: rows are padded to whole vectors of 8 and the tanh runs over all of a token's slots in one loop: at
// (2, 3) a row is 2 or 5 columns, and one vector per slot left each tanh's long dependency chain exposed.
class Mixing {
 public:
  Mixing(const Tensor& static_coef, const std::optional<Tensor>& proj, const std::optional<Tensor>& scale,
         int64_t d, double eps, int64_t q0, int64_t width)
      : dynamic(proj.has_value()), n(static_coef.size(0)), d(d), k(static_coef.size(1)), q0(q0), width(width),
        wp(whole_vectors(width)), eps_(static_cast<float>(eps)) {
    check_input(static_coef, "static", 2);
    static_ = padded_columns(static_coef, q0, width, wp);
    if (!dynamic) return;
    check_input(*proj, "proj", 2);
    check_input(*scale, "scale", 2);
    scale_ = padded_columns(*scale, q0, width, wp);
    proj_ = padded_columns(*proj, q0, width, wp);
    proj_t_.resize(width * d);  // Wᵀ of the range, (width, d)
    for (int64_t c = 0; c < d; ++c)
      for (int64_t q = 0; q < width; ++q) proj_t_[q * d + c] = proj_[c * wp + q];
  }

  // The token's state ht (n, d) -> its coefficients c (rows zero beyond width when static).
  void forward(const float* __restrict ht, TokenCoefficients& c) const {
    if (!dynamic) {
      std::memcpy(c.coef.data(), static_.data(), sizeof(float) * n * wp);
      return;
    }
    const float* W = proj_.data();
    const float* Wt = proj_t_.data();
    for (int64_t i = 0; i < n; ++i) {
      const float* hi = ht + i * d;
      const float r = 1.0f / std::sqrt(dot(hi, hi, d) / d + eps_);
      float* pre = &c.pre[i * wp];
      if (width >= 8) {  // hi times the rows of W, whole vectors of columns at a time
        row_times_matrix(pre, hi, W, d, wp, wp, false);
        scale_vectors(pre, r, wp);
      } else {  // few columns: dot products of d floats with the rows of Wᵀ (the padding stays zero)
        for (int64_t q = 0; q < width; ++q) pre[q] = r * dot(hi, Wt + q * d, d);
      }
      c.rstd[i] = r;
    }
    const float* S0 = static_.data();
    const float* SC = scale_.data();
    float* __restrict pre = c.pre.data();
    float* __restrict act = c.act.data();
    float* __restrict coef = c.coef.data();
#pragma omp simd
    for (int64_t e = 0; e < n * wp; ++e) {
      act[e] = tanh_approx(pre[e]);
      coef[e] = S0[e] + SC[e] * act[e];
    }
  }

  // The gradient g (n, wp; zero beyond width) of a token's coefficients c -> adds to the state gradient
  // ght (n, d) and to this thread's parameter sums. g_hw (n, wp) and scratch (n · wp) are workspace.
  //   g_pre = g ∘ scale ∘ (1 - tanh²),  g_HW = rstd · g_pre,  g_rstd = Σ_q g_pre ∘ pre / rstd
  //   g_H = g_HW Wᵀ - g_rstd · rstd³ / d · H,   g_W += Hᵀ g_HW
  void backward(const float* __restrict ht, const TokenCoefficients& c, const float* __restrict g,
                float* __restrict ght, const ThreadSums& sums, float* __restrict g_hw, float* __restrict scratch) const;

  // Per-thread sums [static (n, wp) | scale (n, wp) | W (d, wp) | Wᵀ (width, d)], zeroed: one row per thread
  vwn::ThreadRows sums() const { return vwn::ThreadRows(2 * n * wp + (dynamic ? d * wp + width * d : 0)); }

  // The per-thread sums -> gradients of static (n, k), and if dynamic of proj (d, k) and scale (n, k), zero
  // outside this column range (empty tensors if static)
  std::tuple<Tensor, Tensor, Tensor> gradients(const vwn::ThreadRows& sums, const Tensor& like) const {
    auto total = [&](int64_t offset) { return sums.total(offset); };
    Tensor grad_static = at::zeros({n, k}, like.options());
    Tensor grad_scale = at::zeros({dynamic ? n : 0, k}, like.options());
    Tensor grad_proj = at::zeros({dynamic ? d : 0, k}, like.options());
    float* GS = grad_static.data_ptr<float>();
    float* GSC = grad_scale.data_ptr<float>();
    float* GP = grad_proj.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t q = 0; q < width; ++q) {
        GS[i * k + q0 + q] = total(i * wp + q);
        if (dynamic) GSC[i * k + q0 + q] = total(n * wp + i * wp + q);
      }
    if (dynamic)
      for (int64_t c = 0; c < d; ++c)
        for (int64_t q = 0; q < width; ++q)
          GP[c * k + q0 + q] = total(2 * n * wp + c * wp + q) + total(2 * n * wp + d * wp + q * d + c);
    if (!dynamic) return {grad_static, at::empty({0}, like.options()), at::empty({0}, like.options())};
    return {grad_static, grad_proj, grad_scale};
  }

  const bool dynamic;
  const int64_t n, d, k, q0, width, wp;

 private:
  const float eps_;
  std::vector<float> static_, scale_, proj_, proj_t_;  // the range's columns, rows padded to wp (Wᵀ: width x d)
};

struct ThreadSums {  // this thread's row of Mixing::sums
  float *static_, *scale, *proj, *proj_t;
  ThreadSums(vwn::ThreadRows& sums, const Mixing& mixing) {
    static_ = sums.row();
    scale = static_ + mixing.n * mixing.wp;
    proj = scale + mixing.n * mixing.wp;
    proj_t = proj + mixing.d * mixing.wp;
  }
};

void Mixing::backward(const float* __restrict ht, const TokenCoefficients& c, const float* __restrict g,
                      float* __restrict ght, const ThreadSums& sums, float* __restrict g_hw,
                      float* __restrict scratch) const {
  axpy(sums.static_, 1.0f, g, n * wp);
  if (!dynamic) return;
  const float* SC = scale_.data();
  const float* Wt = proj_t_.data();
  const float* __restrict pre = c.pre.data();
  const float* __restrict act = c.act.data();
  float* __restrict sum_scale = sums.scale;
  float* __restrict g_pre_pre = scratch;  // g_pre ∘ pre, summed per slot below
#pragma omp simd
  for (int64_t e = 0; e < n * wp; ++e) {
    sum_scale[e] += g[e] * act[e];
    const float g_pre = g[e] * SC[e] * (1.0f - act[e] * act[e]);
    g_pre_pre[e] = g_pre * pre[e];
    g_hw[e] = g_pre;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float r = c.rstd[i];
    const float* hi = ht + i * d;
    float* g_hw_i = g_hw + i * wp;
    float g_rstd_r = 0.0f;  // g_rstd · rstd
    for (int64_t q = 0; q < wp; ++q) g_rstd_r += g_pre_pre[i * wp + q];
    scale_vectors(g_hw_i, r, wp);
    row_times_matrix(ght + i * d, g_hw_i, Wt, width, d, d, true);
    axpy(ght + i * d, -g_rstd_r * r * r / d, hi, d);  // g_rstd · rstd³ / d
    if (width < 8)  // W's gradient as rank-1 updates of Wᵀ's rows, along d
      for (int64_t q = 0; q < width; ++q) axpy(sums.proj_t + q * d, g_hw_i[q], hi, d);
  }
  if (width < 8) return;
  // W's gradient Hᵀ g_HW, row c of W from column c of H: reads g_HW rather than writing W's sums n times
  float* column = scratch;
  for (int64_t ch = 0; ch < d; ++ch) {
    for (int64_t i = 0; i < n; ++i) column[i] = ht[i * d + ch];
    row_times_matrix(sums.proj + ch * wp, column, g_hw, n, wp, wp, true);
  }
}

// Per-thread workspace of an op: a token's coefficients, their gradient (zero beyond each row's width) and
// scratch for Mixing::backward.
struct Workspace {
  TokenCoefficients coefficients;
  std::vector<float> grad, g_hw, scratch, column;
  explicit Workspace(const Mixing& mixing)
      : coefficients(mixing.n, mixing.wp), grad(mixing.n * mixing.wp, 0.0f), g_hw(mixing.n * mixing.wp, 0.0f),
        scratch(mixing.n * mixing.wp), column(mixing.n) {}
};

// h (T, n, d) -> x (T, m, d), X[j] = Σ_i Å[i, j] H[i]
Tensor read_forward(const Tensor& h, const Tensor& static_coef, const std::optional<Tensor>& proj,
                    const std::optional<Tensor>& scale, int64_t read_slots, double eps) {
  check_input(h, "h", 3);
  const Dims s(h, read_slots);
  const Mixing mixing(static_coef, proj, scale, s.d, eps, 0, s.m);
  Tensor x = at::empty({s.tokens, s.m, s.d}, h.options());
  const float* H = h.data_ptr<float>();
  float* X = x.data_ptr<float>();
  at::parallel_for(0, s.tokens, kGrainTokens, [&](int64_t begin, int64_t end) {
    const int64_t n = s.n, d = s.d, m = s.m, wp = mixing.wp;  // locals: loop bounds the compiler can vectorise on
    Workspace work(mixing);
    const float* coef = work.coefficients.coef.data();
    for (int64_t t = begin; t < end; ++t) {
      const float* ht = H + t * n * d;
      float* xt = X + t * m * d;
      mixing.forward(ht, work.coefficients);
      for (int64_t j = 0; j < m; ++j)  // X[j] = Σ_i Å[i, j] H[i]
        column_times_rows(xt + j * d, coef, wp, j, ht, n, d, work.column.data());
    }
  });
  return x;
}

// gradient of x (T, m, d) -> gradients of h (T, n, d), static (n, k), proj (d, k) and scale (n, k) (the last
// two empty if static)
std::tuple<Tensor, Tensor, Tensor, Tensor> read_backward(const Tensor& h, const Tensor& static_coef,
                                                         const std::optional<Tensor>& proj,
                                                         const std::optional<Tensor>& scale, double eps,
                                                         const Tensor& grad_x) {
  check_input(h, "h", 3);
  check_input(grad_x, "grad_x", 3);
  const Dims s(h, grad_x.size(1));
  const Mixing mixing(static_coef, proj, scale, s.d, eps, 0, s.m);
  vwn::ThreadRows sums = mixing.sums();
  Tensor grad_h = at::empty_like(h);
  const float* H = h.data_ptr<float>();
  const float* GX = grad_x.data_ptr<float>();
  float* GH = grad_h.data_ptr<float>();
  at::parallel_for(0, s.tokens, kGrainTokens, [&](int64_t begin, int64_t end) {
    const int64_t n = s.n, d = s.d, m = s.m, wp = mixing.wp;  // locals: loop bounds the compiler can vectorise on
    const ThreadSums thread_sums(sums, mixing);
    Workspace work(mixing);
    const float* coef = work.coefficients.coef.data();
    for (int64_t t = begin; t < end; ++t) {
      const float* ht = H + t * n * d;
      const float* gxt = GX + t * m * d;
      float* ght = GH + t * n * d;
      mixing.forward(ht, work.coefficients);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < m; ++j) work.grad[i * wp + j] = dot(ht + i * d, gxt + j * d, d);
        row_times_matrix(ght + i * d, coef + i * wp, gxt, m, d, d, false);
      }
      mixing.backward(ht, work.coefficients, work.grad.data(), ght, thread_sums, work.g_hw.data(),
                      work.scratch.data());
    }
  });
  auto [grad_static, grad_proj, grad_scale] = mixing.gradients(sums, h);
  return {grad_h, grad_static, grad_proj, grad_scale};
}

// h (T, n, d), z (T, m, d) -> new state (T, n, d), H⁺[j] = Σ_i Â[i, j] H[i] + Σ_l Bᵀ[j, l] Z[l]
Tensor write_forward(const Tensor& h, const Tensor& z, const Tensor& static_coef, const std::optional<Tensor>& proj,
                     const std::optional<Tensor>& scale, double eps) {
  check_input(h, "h", 3);
  check_input(z, "z", 3);
  const Dims s(h, z.size(1));
  const Mixing mixing(static_coef, proj, scale, s.d, eps, s.m, s.n + s.m);  // row i: [Â[i, :] | Bᵀ[i, :]]
  Tensor out = at::empty_like(h);
  const float* H = h.data_ptr<float>();
  const float* Z = z.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, s.tokens, kGrainTokens, [&](int64_t begin, int64_t end) {
    const int64_t n = s.n, d = s.d, m = s.m, wp = mixing.wp;  // locals: loop bounds the compiler can vectorise on
    Workspace work(mixing);
    const float* coef = work.coefficients.coef.data();
    for (int64_t t = begin; t < end; ++t) {
      const float* ht = H + t * n * d;
      const float* zt = Z + t * m * d;
      float* ot = O + t * n * d;
      mixing.forward(ht, work.coefficients);
      for (int64_t j = 0; j < n; ++j) {
        column_times_rows(ot + j * d, coef, wp, j, ht, n, d, work.column.data());  // Σ_i Â[i, j] H[i]
        row_times_matrix(ot + j * d, coef + j * wp + n, zt, m, d, d, true);
      }
    }
  });
  return out;
}

// gradient g of the new state (T, n, d) -> gradients of h (T, n, d), z (T, m, d), static, proj and scale
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> write_backward(const Tensor& h, const Tensor& z,
                                                                  const Tensor& static_coef,
                                                                  const std::optional<Tensor>& proj,
                                                                  const std::optional<Tensor>& scale, double eps,
                                                                  const Tensor& grad) {
  check_input(h, "h", 3);
  check_input(z, "z", 3);
  check_input(grad, "grad", 3);
  const Dims s(h, z.size(1));
  const Mixing mixing(static_coef, proj, scale, s.d, eps, s.m, s.n + s.m);
  vwn::ThreadRows sums = mixing.sums();
  Tensor grad_h = at::empty_like(h);
  Tensor grad_z = at::empty_like(z);
  const float* H = h.data_ptr<float>();
  const float* Z = z.data_ptr<float>();
  const float* G = grad.data_ptr<float>();
  float* GH = grad_h.data_ptr<float>();
  float* GZ = grad_z.data_ptr<float>();
  // NOTE: with many slots the n x n products <H_i, G_j> are short dot products (d = 8 floats at (8, 64));
  // as H Gᵀ with G transposed per token they become rows of n instead
  const bool transpose = s.n >= 8;
  at::parallel_for(0, s.tokens, kGrainTokens, [&](int64_t begin, int64_t end) {
    const int64_t n = s.n, d = s.d, m = s.m, wp = mixing.wp;  // locals: loop bounds the compiler can vectorise on
    const ThreadSums thread_sums(sums, mixing);
    Workspace work(mixing);
    const float* coef = work.coefficients.coef.data();
    float* g_coef = work.grad.data();
    std::vector<float> grad_t(transpose ? d * n : 0), carry_grad(transpose ? n * n : 0);
    for (int64_t t = begin; t < end; ++t) {
      const float* ht = H + t * n * d;
      const float* zt = Z + t * m * d;
      const float* gt = G + t * n * d;
      float* ght = GH + t * n * d;
      float* gzt = GZ + t * m * d;
      mixing.forward(ht, work.coefficients);
      if (transpose) {
        for (int64_t j = 0; j < n; ++j)
          for (int64_t c = 0; c < d; ++c) grad_t[c * n + j] = gt[j * d + c];
        for (int64_t i = 0; i < n; ++i) row_times_matrix(&carry_grad[i * n], ht + i * d, grad_t.data(), d, n, n, false);
      }
      for (int64_t i = 0; i < n; ++i) {
        row_times_matrix(ght + i * d, coef + i * wp, gt, n, d, d, false);  // Σ_j Â[i, j] G[j]
        for (int64_t j = 0; j < n; ++j)
          g_coef[i * wp + j] = transpose ? carry_grad[i * n + j] : dot(ht + i * d, gt + j * d, d);
        for (int64_t l = 0; l < m; ++l) g_coef[i * wp + n + l] = dot(gt + i * d, zt + l * d, d);
      }
      for (int64_t l = 0; l < m; ++l)  // G_Z[l] = Σ_i Bᵀ[i, l] G[i]
        column_times_rows(gzt + l * d, coef, wp, n + l, gt, n, d, work.column.data());
      mixing.backward(ht, work.coefficients, g_coef, ght, thread_sums, work.g_hw.data(), work.scratch.data());
    }
  });
  auto [grad_static, grad_proj, grad_scale] = mixing.gradients(sums, h);
  return {grad_h, grad_z, grad_static, grad_proj, grad_scale};
}

}  // namespace

TORCH_LIBRARY(vwn_ghc, lib) {
  lib.def("read_forward(Tensor h, Tensor static, Tensor? proj, Tensor? scale, int m, float eps) -> Tensor");
  lib.def("read_backward(Tensor h, Tensor static, Tensor? proj, Tensor? scale, float eps, Tensor grad_x)"
          " -> (Tensor, Tensor, Tensor, Tensor)");
  lib.def("write_forward(Tensor h, Tensor z, Tensor static, Tensor? proj, Tensor? scale, float eps) -> Tensor");
  lib.def("write_backward(Tensor h, Tensor z, Tensor static, Tensor? proj, Tensor? scale, float eps, Tensor grad)"
          " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vwn_ghc, CPU, lib) {
  lib.impl("read_forward", &read_forward);
  lib.impl("read_backward", &read_backward);
  lib.impl("write_forward", &write_forward);
  lib.impl("write_backward", &write_backward);
}
