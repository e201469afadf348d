// Fused CPU kernels (fp32) for the generalized hyper-connection's read and write, forward and backward.
// The maths and the shapes are those of harness/model/ghc.py; harness/model/ghc_kernel.py builds this
// file on first use and wraps the four ops in autograd functions.
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

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

constexpr int64_t kGrainTokens = 32;

// tanh in single precision, written so the compiler vectorises loops that call it (std::tanh stops
// vectorisation). |error| < 1e-7 against torch.tanh (tested): tanh|x| = (1 - e) / (1 + e), e = exp(-2|x|),
// with exp by range reduction (2^k · exp(r), |r| ≤ ln2 / 2, degree-7 Taylor); below |x| = 0.1, where
// 1 - e cancels, the odd Taylor series to x⁹ instead.
__attribute__((always_inline)) inline float tanh_approx(float x) {
  float a = std::fabs(x);
  a = a < 9.0f ? a : 9.0f;  // tanh(9) rounds to 1 in fp32
  const float u = -2.0f * a;
  const int32_t k = -static_cast<int32_t>(0.5f - u * 1.44269504f);  // round(u / ln 2); a conversion, unlike
  const float r = u - static_cast<float>(k) * 0.693147181f;        // floor, vectorises without -fno-trapping-math
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float e = p * std::bit_cast<float>((k + 127) << 23);
  const float large = (1.0f - e) / (1.0f + e);
  const float a2 = a * a;
  const float small = a * (1.0f + a2 * (-1.0f / 3.0f + a2 * (2.0f / 15.0f + a2 * (-17.0f / 315.0f + a2 * (62.0f / 2835.0f)))));
  const float magnitude = a < 0.1f ? small : large;
  return x < 0.0f ? -magnitude : magnitude;
}

void check_input(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim,
              "vwn_ghc: ", name, " must be a contiguous float32 CPU tensor of ", dim, " dims, got ", t.sizes(),
              " ", t.scalar_type(), " on ", t.device());
}

struct Dims {
  int64_t tokens, n, d, m, k;
  Dims(const Tensor& h, int64_t m) : tokens(h.size(0)), n(h.size(1)), d(h.size(2)), m(m), k(2 * m + h.size(1)) {}
};

// Eight-lane blocks through GCC's vector extension (one AVX register; two NEON registers elsewhere): the
// rows here are often 8 to 32 floats long, where an auto-vectorised loop spends its time in set-up and
// remainder handling.
typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, v8 v) { __builtin_memcpy(p, &v, sizeof v); }

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

// pre[0:k] *= r; out = static + scale ∘ tanh(pre)
inline void scaled_tanh(float* __restrict out, const float* __restrict static_coef, const float* __restrict scale,
                        float* __restrict pre, float r, int64_t k) {
#pragma omp simd
  for (int64_t q = 0; q < k; ++q) {
    const float p = pre[q] * r;
    pre[q] = p;
    out[q] = static_coef[q] + scale[q] * tanh_approx(p);
  }
}

// The coefficients of one slot, columns [q0, q1) of its row [Å[i, :] | Â[i, :] | Bᵀ[i, :]], computed from the
// slot's state whenever they are needed: read uses columns [0, m), write [m, k). Nothing of size
// (T, n, k) is ever stored; at (8, 64) such a tensor is ten times the state, and storing it made
// every pass over it memory-bound.
// (rows, k) -> (rows, k + 8) with zeros appended to every row
Tensor padded_rows(const Tensor& t) {
  Tensor out = at::zeros({t.size(0), t.size(1) + 8}, t.options());
  out.narrow(1, 0, t.size(1)).copy_(t);
  return out;
}

class Coefficients {
 public:
  Coefficients(const Tensor& static_coef, const std::optional<Tensor>& proj, const std::optional<Tensor>& scale,
               int64_t d, double eps)
      : dynamic(proj.has_value()), d_(d), k_(static_coef.size(1)), eps_(static_cast<float>(eps)) {
    check_input(static_coef, "static", 2);
    static_padded_ = padded_rows(static_coef);
    static_ = static_padded_.data_ptr<float>();
    if (!dynamic) return;
    check_input(*proj, "proj", 2);
    check_input(*scale, "scale", 2);
    proj_t_ = proj->t().contiguous();
    // W with 8 zero columns appended: a row slice [q0, q0 + width rounded up to 8) always exists
    proj_padded_ = at::zeros({d, k_ + 8}, proj->options());
    proj_padded_.narrow(1, 0, k_).copy_(*proj);
    W_ = proj_padded_.data_ptr<float>();
    Wt_ = proj_t_.data_ptr<float>();
    scale_padded_ = padded_rows(*scale);
    scale_ = scale_padded_.data_ptr<float>();
  }

  // Slot i with state hi (d): coef[0, q1-q0) and, if dynamic, pre = rstd · hi W; returns rstd (0 if static).
  // NOTE: pre and coef hold q1 - q0 rounded up to whole vectors of 8 and are computed that far (past q1 from
  // the next columns or the zero padding, finite either way): a loop over 2 or 5 columns, as at (2, 3),
  // otherwise runs entirely in the compiler's scalar remainder code, tanh included.
  float forward(const float* __restrict hi, int64_t i, int64_t q0, int64_t q1, float* __restrict pre,
                float* __restrict coef) const {
    const int64_t width = q1 - q0;
    if (!dynamic) {
      std::memcpy(coef, static_ + i * kp() + q0, sizeof(float) * width);
      return 0.0f;
    }
    const float r = 1.0f / std::sqrt(dot(hi, hi, d_) / d_ + eps_);
    if (width >= 8) {  // hi times the rows of W, over whole vectors of columns
      row_times_matrix(pre, hi, W_ + q0, d_, padded(width), k_ + 8, false);
    } else {  // few columns: dot products of d floats with the rows of Wᵀ
      for (int64_t q = 0; q < width; ++q) pre[q] = dot(hi, Wt_ + (q0 + q) * d_, d_);
    }
    scaled_tanh(coef, static_ + i * kp() + q0, scale_ + i * kp() + q0, pre, r, padded(width));
    return r;
  }

  // The gradient g (width, zero up to padded(width)) of those coefficients -> adds to the slot's state gradient g_hi (d) and to this
  // thread's sums for static and scale (n, k); writes the gradient of the slot's hi W to g_hw (width). W's
  // gradient Hᵀ g_HW: for fewer than 8 columns added here, as rows of Wᵀ (rank-1 updates along d), else
  // by `add_projection_gradient` once per token.
  //   g_pre = g ∘ scale ∘ (1 - tanh²),  g_HW = rstd · g_pre,  g_rstd = Σ_q g_pre ∘ pre / rstd
  //   g_H = g_HW Wᵀ - g_rstd · rstd³ / d · H,   g_W += Hᵀ g_HW
  void backward(const float* __restrict hi, int64_t i, int64_t q0, int64_t q1, const float* __restrict pre,
                float r, const float* __restrict g, float* __restrict g_hi, float* __restrict sum_static,
                float* __restrict sum_scale, float* __restrict sum_proj_t, float* __restrict g_hw) const {
    const int64_t width = q1 - q0;
    axpy(sum_static + i * kp() + q0, 1.0f, g, width);
    if (!dynamic) return;
    const float* sc = scale_ + i * kp() + q0;
    float* sum_sc = sum_scale + i * kp() + q0;
    float g_rstd = 0.0f;
    const int64_t vectors = padded(width);
#pragma omp simd reduction(+ : g_rstd)
    for (int64_t q = 0; q < vectors; ++q) {
      const float act = tanh_approx(pre[q]);
      sum_sc[q] += g[q] * act;
      const float g_pre = g[q] * sc[q] * (1.0f - act * act);
      g_rstd += g_pre * pre[q];
      g_hw[q] = g_pre * r;
    }
    row_times_matrix(g_hi, g_hw, Wt_ + q0 * d_, width, d_, d_, true);
    if (width < 8)
      for (int64_t q = 0; q < width; ++q) axpy(sum_proj_t + (q0 + q) * d_, g_hw[q], hi, d_);
    axpy(g_hi, -g_rstd * r * r / d_, hi, d_);  // g_rstd · rstd³ / d, with g_rstd's 1/rstd folded in
  }

  // sum_proj[:, q0 : q0 + padded(width)] += Hᵀ g_hw for a token's state H (n, d) and g_hw (n, padded(width),
  // zero beyond width); column scratch holds n floats
  void add_projection_gradient(float* __restrict sum_proj, const float* __restrict g_hw,
                               const float* __restrict ht, int64_t n, int64_t q0, int64_t width,
                               float* __restrict column) const {
    if (!dynamic || width < 8) return;
    const int64_t stride = padded(width);
    for (int64_t c = 0; c < d_; ++c) {
      for (int64_t i = 0; i < n; ++i) column[i] = ht[i * d_ + c];
      row_times_matrix(sum_proj + c * (k_ + 8) + q0, column, g_hw, n, stride, stride, true);
    }
  }

  // Per-thread parameter gradient sums (rows of `sums`, laid out as in ThreadSums) -> gradients of static
  // (n, k), and if dynamic of scale (n, k) and proj (d, k) (empty tensors if static).
  std::tuple<Tensor, Tensor, Tensor> gradients(const Tensor& sums, int64_t n) const {
    const int64_t coef_size = n * kp();
    Tensor grad_static = at::empty({n, k_}, sums.options());
    Tensor grad_scale = at::empty({dynamic ? n : 0, k_}, sums.options());
    Tensor grad_proj = at::empty({dynamic ? d_ : 0, k_}, sums.options());
    const float* S = sums.data_ptr<float>();
    const int64_t threads = sums.size(0), row = sums.size(1);
    float* GS = grad_static.data_ptr<float>();
    float* GSC = grad_scale.data_ptr<float>();
    float* GP = grad_proj.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t q = 0; q < k_; ++q) {
        float total_static = 0.0f, total_scale = 0.0f;
        for (int64_t t = 0; t < threads; ++t) {
          total_static += S[t * row + i * kp() + q];
          if (dynamic) total_scale += S[t * row + coef_size + i * kp() + q];
        }
        GS[i * k_ + q] = total_static;
        if (dynamic) GSC[i * k_ + q] = total_scale;
      }
    if (dynamic) {
      for (int64_t c = 0; c < d_; ++c)
        for (int64_t q = 0; q < k_; ++q) {
          float total = 0.0f;
          for (int64_t t = 0; t < threads; ++t) {
            const float* proj = S + t * row + 2 * coef_size;
            total += proj[c * (k_ + 8) + q] + proj[d_ * (k_ + 8) + q * d_ + c];
          }
          GP[c * k_ + q] = total;
        }
    }
    return {grad_static, grad_scale, grad_proj};
  }

  Tensor sums(int64_t n, const Tensor& like) const {
    return at::zeros({at::get_num_threads(), 2 * n * kp() + (dynamic ? 2 * d_ * k_ + 8 * d_ : 0)}, like.options());
  }

  const bool dynamic;

  static int64_t padded(int64_t width) { return (width + 7) / 8 * 8; }
  int64_t kp() const { return k_ + 8; }  // row stride of the padded (n, k) matrices and sums

 private:
  const int64_t d_, k_;
  const float eps_;
  const float* static_ = nullptr;
  Tensor proj_t_, proj_padded_, static_padded_, scale_padded_;
  const float* W_ = nullptr;
  const float* Wt_ = nullptr;
  const float* scale_ = nullptr;
};

struct ThreadSums {  // this thread's row of the parameter gradient sums
  float *static_, *scale, *proj, *proj_t;
  ThreadSums(Tensor& sums, int64_t n, int64_t d, int64_t k) {
    static_ = sums.data_ptr<float>() + at::get_thread_num() * sums.size(1);  // (n, k + 8)
    scale = static_ + n * (k + 8);  // (n, k + 8)
    proj = scale + n * (k + 8);     // (d, k + 8): from add_projection_gradient
    proj_t = proj + d * (k + 8);  // (k, d): the rank-1 updates of narrow column ranges
  }
};

// h (T, n, d) -> x (T, m, d), X[j] = Σ_i Å[i, j] H[i]
Tensor read_forward(const Tensor& h, const Tensor& static_coef, const std::optional<Tensor>& proj,
                    const std::optional<Tensor>& scale, int64_t read_slots, double eps) {
  check_input(h, "h", 3);
  const Dims s(h, read_slots);
  const Coefficients mixing(static_coef, proj, scale, s.d, eps);
  Tensor x = at::empty({s.tokens, s.m, s.d}, h.options());
  const float* H = h.data_ptr<float>();
  float* X = x.data_ptr<float>();
  at::parallel_for(0, s.tokens, kGrainTokens, [&](int64_t begin, int64_t end) {
    const int64_t n = s.n, d = s.d, m = s.m;  // locals: loop bounds the compiler can vectorise on
    const int64_t mp = Coefficients::padded(m);
    std::vector<float> pre(mp), read(n * mp), column(n);
    for (int64_t t = begin; t < end; ++t) {
      const float* ht = H + t * n * d;
      float* xt = X + t * m * d;
      for (int64_t i = 0; i < n; ++i) mixing.forward(ht + i * d, i, 0, m, pre.data(), &read[i * mp]);
      for (int64_t j = 0; j < m; ++j) {
        for (int64_t i = 0; i < n; ++i) column[i] = read[i * mp + j];
        row_times_matrix(xt + j * d, column.data(), ht, n, d, d, false);
      }
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
  const Coefficients mixing(static_coef, proj, scale, s.d, eps);
  Tensor sums = mixing.sums(s.n, h);
  Tensor grad_h = at::empty_like(h);
  const float* H = h.data_ptr<float>();
  const float* GX = grad_x.data_ptr<float>();
  float* GH = grad_h.data_ptr<float>();
  at::parallel_for(0, s.tokens, kGrainTokens, [&](int64_t begin, int64_t end) {
    const int64_t n = s.n, d = s.d, k = s.k, m = s.m;  // locals: loop bounds the compiler can vectorise on
    const ThreadSums sum(sums, n, d, k);
    std::vector<float> pre(Coefficients::padded(m)), read(Coefficients::padded(m)), g_read(Coefficients::padded(m)),
        column(n);
    std::vector<float> g_hw(n * Coefficients::padded(m), 0.0f);
    for (int64_t t = begin; t < end; ++t) {
      const float* ht = H + t * n * d;
      const float* gxt = GX + t * m * d;
      float* ght = GH + t * n * d;
      std::fill(ght, ght + n * d, 0.0f);
      for (int64_t i = 0; i < n; ++i) {
        const float* hi = ht + i * d;
        const float r = mixing.forward(hi, i, 0, m, pre.data(), read.data());
        for (int64_t j = 0; j < m; ++j) g_read[j] = dot(hi, gxt + j * d, d);
        row_times_matrix(ght + i * d, read.data(), gxt, m, d, d, true);
        mixing.backward(hi, i, 0, m, pre.data(), r, g_read.data(), ght + i * d, sum.static_, sum.scale,
                        sum.proj_t, &g_hw[i * Coefficients::padded(m)]);
      }
      mixing.add_projection_gradient(sum.proj, g_hw.data(), ht, n, 0, m, column.data());
    }
  });
  auto [grad_static, grad_scale, grad_proj] = mixing.gradients(sums, s.n);
  return {grad_h, grad_static, grad_proj, grad_scale};
}

// h (T, n, d), z (T, m, d) -> new state (T, n, d), H⁺[j] = Σ_i Â[i, j] H[i] + Σ_l Bᵀ[j, l] Z[l]
Tensor write_forward(const Tensor& h, const Tensor& z, const Tensor& static_coef, const std::optional<Tensor>& proj,
                     const std::optional<Tensor>& scale, double eps) {
  check_input(h, "h", 3);
  check_input(z, "z", 3);
  const Dims s(h, z.size(1));
  const Coefficients mixing(static_coef, proj, scale, s.d, eps);
  Tensor out = at::empty_like(h);
  const float* H = h.data_ptr<float>();
  const float* Z = z.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, s.tokens, kGrainTokens, [&](int64_t begin, int64_t end) {
    const int64_t n = s.n, d = s.d, k = s.k, m = s.m;  // locals: loop bounds the compiler can vectorise on
    const int64_t w = k - m;                             // row i: [Â[i, :] (n) | Bᵀ[i, :] (m)]
    const int64_t wp = Coefficients::padded(w);
    std::vector<float> pre(wp), rows(n * wp), column(n);
    for (int64_t t = begin; t < end; ++t) {
      const float* ht = H + t * n * d;
      const float* zt = Z + t * m * d;
      float* ot = O + t * n * d;
      for (int64_t i = 0; i < n; ++i) mixing.forward(ht + i * d, i, m, k, pre.data(), &rows[i * wp]);
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t i = 0; i < n; ++i) column[i] = rows[i * wp + j];  // Â[:, j]
        row_times_matrix(ot + j * d, column.data(), ht, n, d, d, false);
        row_times_matrix(ot + j * d, &rows[j * wp + n], zt, m, d, d, true);
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
  const Coefficients mixing(static_coef, proj, scale, s.d, eps);
  Tensor sums = mixing.sums(s.n, h);
  Tensor grad_h = at::empty_like(h);
  Tensor grad_z = at::empty_like(z);
  const float* H = h.data_ptr<float>();
  const float* Z = z.data_ptr<float>();
  const float* G = grad.data_ptr<float>();
  float* GH = grad_h.data_ptr<float>();
  float* GZ = grad_z.data_ptr<float>();
  // NOTE: with many slots the n x n products <H_i, G_j> are short dot products (d = 8 floats at (8, 64));
  // as H Gᵀ with G transposed per token they become axpys over rows of n instead
  const bool transpose = s.n >= 8;
  at::parallel_for(0, s.tokens, kGrainTokens, [&](int64_t begin, int64_t end) {
    const int64_t n = s.n, d = s.d, k = s.k, m = s.m;  // locals: loop bounds the compiler can vectorise on
    const int64_t w = k - m;
    const ThreadSums sum(sums, n, d, k);
    std::vector<float> pre(Coefficients::padded(w)), row(Coefficients::padded(w)), g_row(Coefficients::padded(w)),
        column(n);
    std::vector<float> g_hw(n * Coefficients::padded(w), 0.0f);
    std::vector<float> grad_t(transpose ? d * n : 0), carry_grad(transpose ? n * n : 0);
    for (int64_t t = begin; t < end; ++t) {
      const float* ht = H + t * n * d;
      const float* zt = Z + t * m * d;
      const float* gt = G + t * n * d;
      float* ght = GH + t * n * d;
      float* gzt = GZ + t * m * d;
      std::fill(ght, ght + n * d, 0.0f);
      std::fill(gzt, gzt + m * d, 0.0f);
      if (transpose) {
        for (int64_t j = 0; j < n; ++j)
          for (int64_t c = 0; c < d; ++c) grad_t[c * n + j] = gt[j * d + c];
        for (int64_t i = 0; i < n; ++i) row_times_matrix(&carry_grad[i * n], ht + i * d, grad_t.data(), d, n, n, false);
      }
      for (int64_t i = 0; i < n; ++i) {
        const float r = mixing.forward(ht + i * d, i, m, k, pre.data(), row.data());
        row_times_matrix(ght + i * d, row.data(), gt, n, d, d, true);
        for (int64_t j = 0; j < n; ++j) g_row[j] = transpose ? carry_grad[i * n + j] : dot(ht + i * d, gt + j * d, d);
        for (int64_t l = 0; l < m; ++l) {
          g_row[n + l] = dot(gt + i * d, zt + l * d, d);
          axpy(gzt + l * d, row[n + l], gt + i * d, d);
        }
        mixing.backward(ht + i * d, i, m, k, pre.data(), r, g_row.data(), ght + i * d, sum.static_,
                        sum.scale, sum.proj_t, &g_hw[i * Coefficients::padded(w)]);
      }
      mixing.add_projection_gradient(sum.proj, g_hw.data(), ht, n, m, w, column.data());
    }
  });
  auto [grad_static, grad_scale, grad_proj] = mixing.gradients(sums, s.n);
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
