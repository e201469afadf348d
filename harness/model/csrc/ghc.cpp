// Fused CPU kernels (fp32) for the generalized hyper-connection's read and write, forward and backward, alone or a
// write with the next GHC's read, and for the MTP module's merge into the state (at the end of this file). The
// maths and the shapes are those of harness/model/ghc.py and MultiTokenPredictor.merged;
// harness/model/cpu_kernels.py builds this file on first use; ghc_autograd.cpp makes the ops autograd nodes, which
// harness/model/ghc_kernel.py calls.
//
// T tokens, n slots of width d, m read slots, k = 2m + n coefficients per slot: row i of a token's
// coefficients is [A[i, :] | B[:, i]] = [Å[i, :] (m) | Â[i, :] (n) | Bᵀ[i, :] (m)]. The ops take the parameters
// as the module holds them, A (n, m + n), B (m, n), W (d, k) and S (n, k), and the temperature τ.
//
//   read:   coef = [A | Bᵀ] + S ∘ tanh(rstd · H W / τ)   (dynamic; [A | Bᵀ] alone otherwise)
//           X[j] = Σ_i coef[i, j] H[i]                 j < m
//   write:  H⁺[j] = Σ_i coef[i, m + j] H[i] + Σ_l coef[j, m + n + l] Z[l]
//
// Tokens are taken a vector register's lanes at a time (16 on AVX-512, 8 on AVX2), one per lane, as "lane
// matrices" (every element a vector of those tokens' values): the state arrives in that layout (lane tiles,
// lane_tiles.h, made by to_tiles), the sublayer's x and z are transposed per tile, and all of the maths, the
// coefficients' reductions over d included, becomes products of lane matrices without a horizontal sum. Nothing
// of size (T, n, k) is stored: a tile's coefficients are recomputed in cache by the backward. Parameter gradients
// are summed per thread and per lane, then reduced.
// NOTE: one token at a time, vectorised along d, the same four ops ran 2-2.5x slower at (2, 3) to (8, 64):
// the reductions over d (rstd, H W, the coefficients' gradients <H_i, G_j>) were short dot products, each
// ending in a horizontal sum, and with n = 3 the loops over slots left each FMA waiting on the last.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "lane_tiles.h"
#include "thread_rows.h"
#include "vector_math.h"

namespace {

using at::Tensor;
using vwn::from_lanes;
using vwn::kLanes;
using vwn::tile_of;
using vwn::to_lanes;
using vwn::vreg;

Tensor as_tiles(const Tensor& t, const char* name) { return vwn::as_tiles(t, "vwn_ghc", name); }
constexpr int64_t kGrainTiles = 4;
constexpr int64_t kSumDepth = 32;  // of the products that sum parameter gradients over a run of tiles (tiles_per_sum)

void check_input(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim,
              "vwn_ghc: ", name, " must be a contiguous float32 CPU tensor of ", dim, " dims, got ", t.sizes(),
              " ", t.scalar_type(), " on ", t.device());
}

// ---- products of lane matrices ----

// A strided lane matrix: element (a, b) at p[a · row + b · column].
template <typename V>
struct Strided {
  V* p;
  int64_t row, column;
  V& operator()(int64_t a, int64_t b) const { return p[a * row + b * column]; }
};
using Lanes = Strided<vreg>;
using ConstLanes = Strided<const vreg>;

// x in every lane
// NOTE: as a shuffle of a one-element vector, which GCC compiles to one vbroadcastss (from memory, in a product's
// loop); `vreg{} + x` compiled to a scalar add of zero (+0 + -0 is +0, so it cannot fold away) before each
// vbroadcastss, and a product with broadcast operands (the coefficients' H W, g_HW Wᵀ) spent two more operations
// per operand.
template <std::size_t... L>
inline vreg splat(float x, std::index_sequence<L...>) {
  const vreg v{x};
  return __builtin_shufflevector(v, v, (L * 0)...);
}
inline vreg broadcast(float x) { return splat(x, std::make_index_sequence<kLanes>{}); }

// A strided matrix of floats, each element given to all lanes: the parameters, alike for every token, held as
// floats rather than as broadcast vectors, so a tile's products keep kLanes times less of them in cache.
struct Broadcast {
  const float* p;
  int64_t row, column;
  vreg operator()(int64_t a, int64_t b) const { return broadcast(p[a * row + b * column]); }
};

// Terms of a sum of lane matrices that `products` computes a block of sums at a time, in registers:
// a product A (rows × depth) · B (depth × cols), B lanes or broadcast floats, ...
template <typename B>
struct Product {
  ConstLanes a;
  B b;
  int64_t depth;
};

// ... or the rows of X each scaled by an element of s (one vector per row), X[a, b] ∘ s[a].
struct ScaledRows {
  ConstLanes x;
  const vreg* scale;
};

// NOTE: the empty asm pins each lane operand used more than once in a register: GCC otherwise folded its load into
// every FMA that used it (a 2 x 4 block's 4 right operands loaded twice each, 10 loads for 8 FMAs), and the
// products were bound by loads. Write + read, the two builds alternated in one process: forward x0.90-0.96, backward
// x0.92-0.95 from (2, 8) to (8, 64) (AMD EPYC Zen 3, 2026-12-06). Not for broadcast operands (on AVX2 a broadcast
// needs a register anyway), nor where the block would not fit in the registers: 3 x 3 blocks spilled more (62 -> 97
// stack accesses in one of their loops) and ran no faster. AVX-512 builds, not measured, are left as they were.
template <int RA, int RB, typename B>
__attribute__((always_inline)) inline void add_to(vreg (&sum)[RA][RB], const Product<B>& t, int64_t a0, int64_t b0) {
  constexpr bool pin = RA * RB + RA + RB <= 14;  // AVX2's 16 registers, two spare
  for (int64_t r = 0; r < t.depth; ++r) {
    vreg left[RA], right[RB];
    for (int i = 0; i < RA; ++i) {
      left[i] = t.a(a0 + i, r);
      if constexpr (pin && RB > 1) vwn::pin_in_register(left[i]);
    }
    for (int j = 0; j < RB; ++j) {
      right[j] = t.b(r, b0 + j);
      if constexpr (pin && RA > 1 && !std::is_same_v<B, Broadcast>) vwn::pin_in_register(right[j]);
    }
    for (int i = 0; i < RA; ++i)
      for (int j = 0; j < RB; ++j) sum[i][j] += left[i] * right[j];
  }
}

template <int RA, int RB>
__attribute__((always_inline)) inline void add_to(vreg (&sum)[RA][RB], const ScaledRows& t, int64_t a0, int64_t b0) {
  for (int i = 0; i < RA; ++i)
    for (int j = 0; j < RB; ++j) sum[i][j] += t.scale[a0 + i] * t.x(a0 + i, b0 + j);
}

// C[a0 : a0 + RA, b0 : b0 + RB] (+)= the terms' sum there, lane by lane
template <int RA, int RB, typename... Terms>
__attribute__((always_inline)) inline void sum_block(Lanes c, int64_t a0, int64_t b0, bool accumulate,
                                                     const Terms&... terms) {
  vreg sum[RA][RB];
  for (int i = 0; i < RA; ++i)
    for (int j = 0; j < RB; ++j) sum[i][j] = accumulate ? c(a0 + i, b0 + j) : vreg{};
  (add_to(sum, terms, a0, b0), ...);
  for (int i = 0; i < RA; ++i)
    for (int j = 0; j < RB; ++j) c(a0 + i, b0 + j) = sum[i][j];
}

// blocks of up to 4 x 4 sums, 4 + 4 operands: 24 of AVX-512's 32 registers; on AVX2 3 x 3 and 3 + 3, 15 of its 16
#ifdef __AVX512F__
constexpr int kBlock = 4;
#else
constexpr int kBlock = 3;
#endif

// Rows [a0, a0 + RA) of C, all columns, a block of kBlock at a time
// NOTE: one call per row block, not per block: with n = 3 most products are 3 x d with a depth of 3 to 5, and
// a call per 3 x 4 block (its set-up, spills and indirect jump) cost as much as the block's FMAs.
template <int RA, typename... Terms>
void sum_rows(Lanes c, int64_t a0, int64_t cols, bool accumulate, const Terms&... terms) {
  int64_t b0 = 0;
  for (; b0 + kBlock <= cols; b0 += kBlock) sum_block<RA, kBlock>(c, a0, b0, accumulate, terms...);
  switch (cols - b0) {
    case 1: return sum_block<RA, 1>(c, a0, b0, accumulate, terms...);
    case 2: return sum_block<RA, 2>(c, a0, b0, accumulate, terms...);
    case 3: return sum_block<RA, 3>(c, a0, b0, accumulate, terms...);
  }
}

// C (rows × cols) (+)= the sum of the terms in RA x RB blocks, rows a multiple of RA and cols of RB
// NOTE: the terms by value: taken by reference, GCC loaded their pointers, strides and depth from memory and
// recomputed the operands' addresses (five multiplies) at every block, a large share of a block of depth d = 8.
// Copies local to the loop stay in registers and the addresses advance by adds: write + read from (8,12) to
// (8,64) x0.93-0.97 backward, x0.95-0.98 forward, at m = 2 x0.96-0.99 (AMD EPYC Zen 3, 2026-12-06). Not in
// sum_rows, whose 3 x 3 blocks leave no registers for them: there a (2,3) backward ran x1.03.
template <int RA, int RB, typename... Terms>
void sum_in_blocks(Lanes c, int64_t rows, int64_t cols, bool accumulate, const Terms... terms) {
  for (int64_t a0 = 0; a0 < rows; a0 += RA)
    for (int64_t b0 = 0; b0 < cols; b0 += RB) sum_block<RA, RB>(c, a0, b0, accumulate, terms...);
}

// C (rows × cols) (+)= the sum of the terms, lane by lane, in one pass over C
// NOTE: on AVX2, 4 x 2 or 2 x 4 blocks (8 sums, 6 operands: 14 of its 16 registers) where they tile C whole: with
// 3 x 3 blocks, the many sides of 8, 16, 32 or 64 (n, d, n + m) left edge blocks of 1 or 2, with as many loads
// and stores per FMA as a full one. Each product of a tile's write + read alone, hot in L1: all of them x0.85 at
// (2, 8) and (8, 16), x0.77 at (2, 4), x0.90 at (8, 64) (2 x 4 first instead: x1.14-1.21, slower).
// NOTE: a write's two products, or a state gradient's three terms, one product each, made two or three passes
// over the (n × d) result, with the depth-m products (m = 2) spending more on C's loads and stores than on FMAs.
template <typename... Terms>
void sum_of(Lanes c, int64_t rows, int64_t cols, bool accumulate, const Terms&... terms) {
#ifndef __AVX512F__
  if (rows % 4 == 0 && cols % 2 == 0) return sum_in_blocks<4, 2>(c, rows, cols, accumulate, terms...);
  if (rows % 2 == 0 && cols % 4 == 0) return sum_in_blocks<2, 4>(c, rows, cols, accumulate, terms...);
#endif
  int64_t a0 = 0;
  for (; a0 + kBlock <= rows; a0 += kBlock) sum_rows<kBlock>(c, a0, cols, accumulate, terms...);
  switch (rows - a0) {
    case 1: return sum_rows<1>(c, a0, cols, accumulate, terms...);
    case 2: return sum_rows<2>(c, a0, cols, accumulate, terms...);
    case 3: return sum_rows<3>(c, a0, cols, accumulate, terms...);
  }
}

// C (rows × cols) (+)= A (rows × depth) · B (depth × cols), lane by lane; B lanes or broadcast floats
template <typename B>
void product(Lanes c, ConstLanes a, B b, int64_t rows, int64_t cols, int64_t depth, bool accumulate) {
  sum_of(c, rows, cols, accumulate, Product<B>{a, b, depth});
}

// A row-major (rows × cols) lane matrix, as a product's operand or its transpose, or as its result
ConstLanes matrix(const vreg* p, int64_t cols) { return {p, cols, 1}; }
ConstLanes transposed(const vreg* p, int64_t cols) { return {p, 1, cols}; }
Lanes result(vreg* p, int64_t cols) { return {p, cols, 1}; }
Broadcast parameters(const float* p, int64_t cols) { return {p, cols, 1}; }
Broadcast parameters_transposed(const float* p, int64_t cols) { return {p, 1, cols}; }

// Per-thread lane-matrix sums (ThreadRows of `count` vregs each), summed over the threads and the lanes: `count` floats
// NOTE: vector adds over the threads, then each vector's lanes pairwise. Element by element, a chain of 16 scalar
// adds each, this was most of a backward op's fixed cost at large n: a write + read backward on one tile took
// x0.66 of the time at (8, 64), x0.73 at (8, 32), x0.83 at (8, 16), x0.89 at (2, 8) with this (Zen 3, 2026-12-06).
std::vector<float> lane_totals(const vwn::ThreadRows& sums, int64_t count) {
  std::vector<float> totals(count);
  for (int64_t e = 0; e < count; ++e) {
    vreg v{};
    for (int64_t t = 0; t < sums.threads(); ++t) v += reinterpret_cast<const vreg*>(sums.row(t))[e];
    totals[e] = vwn::lane_sum(v);
  }
  return totals;
}

// ---- the coefficients ----

// rstd = 1 / √(mean square + eps) of `width` lane-matrix elements, per lane; 0 where the mean square is 0 (an empty
// lane past the last token, with eps = 0: not inf and NaNs)
vreg lanes_rstd(const vreg* x, int64_t width, float eps) {
  vreg squares[4] = {};  // four sums in flight: one would wait on the last FMA at every step
  int64_t f = 0;
  for (; f + 4 <= width; f += 4)
    for (int j = 0; j < 4; ++j) squares[j] += x[f + j] * x[f + j];
  for (; f < width; ++f) squares[0] += x[f] * x[f];
  const vreg mean_square = ((squares[0] + squares[1]) + (squares[2] + squares[3])) / static_cast<float>(width) + eps;
  vreg rstd;
  float* lanes = reinterpret_cast<float*>(&rstd);
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) lanes[l] = mean_square[l] > 0.0f ? 1.0f / std::sqrt(mean_square[l]) : 0.0f;
  return rstd;
}


// A thread's lane matrices for its tiles, left uninitialised: every op writes each element before it reads it.
// NOTE: as zeroed std::vectors, an (8, 64) write + read backward filled 1 MB of them per call; without the filling
// that op on one tile took x0.87 of the time forward, x0.91 backward.
class LaneBuffer {
 public:
  explicit LaneBuffer(int64_t size) : data_(new vreg[size]) {}
  vreg* data() const { return data_.get(); }
  vreg& operator[](int64_t i) const { return data_[i]; }

 private:
  std::unique_ptr<vreg[]> data_;
};

// A tile's coefficients of the column range (n × width lane matrices), and what their backward needs.
struct Coefficients {
  LaneBuffer rstd, pre, coef;  // per slot; H W (the backward's), static + scale ∘ tanh(rstd · H W)
  LaneBuffer norm_term;  // per slot, in the backward: −g_rstd · rstd³ / d, the norm's share of g_H over H
  Coefficients(int64_t n, int64_t width) : rstd(n), pre(n * width), coef(n * width), norm_term(n) {}
};

// A GHC's parameters as its module holds them: A = [Å | Â] (n, m + n), B (m, n), and if dynamic W (d, k) and
// S (n, k), and the temperature τ that W is divided by.
// NOTE: taken apart, not as the torch path's [A | Bᵀ] and W / τ: the concatenation, transpose and division, each
// with its autograd node, cost a (2, 3) read + write forward + backward 0.26-0.46 ms of 0.9-1.5.
struct Parameters {
  const Tensor& a;
  const Tensor& b;
  const std::optional<Tensor>& proj;
  const std::optional<Tensor>& scale;
  double temperature;
};

// Gradients of the parameters, zero outside an op's column range; proj and scale empty if static.
struct ParameterGradients {
  Tensor a, b, proj, scale;
};

// Sizes of an op: the state's tiles and slots, and the sublayer side's tokens and read slots.
struct Dims {
  int64_t tiles, n, d, tokens, m;
  Dims(const Tensor& h_tiles, const Tensor& sublayer_side)
      : tiles(h_tiles.size(0)), n(h_tiles.size(1)), d(h_tiles.size(2)), tokens(sublayer_side.size(0)),
        m(sublayer_side.size(1)) {
    TORCH_CHECK(sublayer_side.size(2) == d && (tokens + kLanes - 1) / kLanes == tiles, "vwn_ghc: ", tokens,
                " tokens of ", sublayer_side.size(1), " x ", sublayer_side.size(2), " for ", tiles, " tiles of ", n,
                " x ", d);
  }
};

enum class Side { read, write };

// The coefficients of one side's columns of every slot's row [Å[i, :] | Â[i, :] | Bᵀ[i, :]] (read: the m columns of
// Å; write: the n + m of Â and Bᵀ), [q0, q0 + width), computed from a tile's state whenever they are needed.
class Mixing {
 public:
  Mixing(const Parameters& p, const Dims& s, double eps, Side side)
      : dynamic(p.proj.has_value()), n(s.n), m(s.m), d(s.d), k(2 * m + n), q0(side == Side::read ? 0 : m),
        width(side == Side::read ? m : n + m), eps_(static_cast<float>(eps)) {
    check_input(p.a, "A", 2);
    check_input(p.b, "B", 2);
    TORCH_CHECK(p.a.size(0) == n && p.a.size(1) == m + n && p.b.size(0) == m && p.b.size(1) == n,
                "vwn_ghc: A must be (n, m + n) and B (m, n), here (", n, ", ", m + n, ") and (", m, ", ", n, "), got ",
                p.a.sizes(), " and ", p.b.sizes());
    const float* A = p.a.data_ptr<float>();
    const float* B = p.b.data_ptr<float>();
    static_ = columns(n, [&](int64_t i, int64_t c) { return c < m + n ? A[i * (m + n) + c] : B[(c - m - n) * n + i]; });
    if (!dynamic) return;
    TORCH_CHECK(p.scale.has_value(), "vwn_ghc: a dynamic GHC needs both proj and scale");
    check_input(*p.proj, "proj", 2);
    check_input(*p.scale, "scale", 2);
    TORCH_CHECK(p.proj->size(0) == d && p.proj->size(1) == k && p.scale->size(0) == n && p.scale->size(1) == k,
                "vwn_ghc: proj must be (", d, ", ", k, ") and scale (", n, ", ", k, "), got ", p.proj->sizes(), " and ",
                p.scale->sizes());
    const float* W = p.proj->data_ptr<float>();
    const float* S = p.scale->data_ptr<float>();
    inverse_temperature_ = static_cast<float>(1.0 / p.temperature);
    proj_ = columns(d, [&](int64_t r, int64_t c) { return W[r * k + c] * inverse_temperature_; });
    scale_ = columns(n, [&](int64_t i, int64_t c) { return S[i * k + c]; });
  }

  // A tile's state h (n × d lanes) -> its coefficients c.coef
  void forward(const vreg* h, Coefficients& c) const {
    if (!dynamic) {
      for (int64_t e = 0; e < n * width; ++e) c.coef[e] = broadcast(static_[e]);
      return;
    }
    project(h, c, c.coef.data());
    for_each_slot_run([&]<int kCount>(int64_t i, int64_t e) {
      vreg activation[kCount];
      for (int j = 0; j < kCount; ++j) activation[j] = vwn::tanh_approx(c.coef[e + j] * c.rstd[i]);
      for (int j = 0; j < kCount; ++j) c.coef[e + j] = static_[e + j] + scale_[e + j] * activation[j];
      return vreg{};
    }, nullptr);
  }

  // A tile's state h and the gradient g (n × width lanes) of its coefficients -> the coefficients again (c.coef), g
  // overwritten by g_HW, c.norm_term, and this thread's sums of the static and scale parameters; `state_gradient`
  // then takes g_HW on. One pass recomputes and differentiates each coefficient:
  //   g_pre = g ∘ scale ∘ (1 - tanh²),  g_HW = rstd · g_pre,  g_rstd · rstd³ = rstd² Σ_q g_pre ∘ rstd · H W
  void backward(const vreg* h, Coefficients& c, vreg* g, vreg* sums) const {
    vreg* sum_static = sums;
    if (!dynamic) {
      for (int64_t e = 0; e < n * width; ++e) {
        c.coef[e] = broadcast(static_[e]);
        sum_static[e] += g[e];
      }
      return;
    }
    vreg* sum_scale = sums + n * width;
    project(h, c, c.pre.data());
    for_each_slot_run([&]<int kCount>(int64_t i, int64_t e) {
      vreg pre[kCount], activation[kCount];
      for (int j = 0; j < kCount; ++j) {
        pre[j] = c.pre[e + j] * c.rstd[i];
        activation[j] = vwn::tanh_approx(pre[j]);
      }
      vreg g_rstd{};
      for (int j = 0; j < kCount; ++j) {
        c.coef[e + j] = static_[e + j] + scale_[e + j] * activation[j];
        sum_static[e + j] += g[e + j];
        sum_scale[e + j] += g[e + j] * activation[j];
        const vreg g_pre = g[e + j] * scale_[e + j] * (1.0f - activation[j] * activation[j]);
        g_rstd += g_pre * pre[j];
        g[e + j] = g_pre * c.rstd[i];
      }
      return g_rstd;
    }, c.norm_term.data());
    for (int64_t i = 0; i < n; ++i) c.norm_term[i] *= c.rstd[i] * c.rstd[i] * (-1.0f / static_cast<float>(d));
  }

  // The state's gradient grad_h (n × d lanes) (+)= the terms (its other paths) + its path through the
  // coefficients, g_HW Wᵀ + norm_term ∘ H, in one pass.
  template <typename... Terms>
  void state_gradient(const vreg* h, const Coefficients& c, const vreg* g_hw, vreg* grad_h, bool accumulate,
                      const Terms&... terms) const {
    if (!dynamic) return sum_of(result(grad_h, d), n, d, accumulate, terms...);
    sum_of(result(grad_h, d), n, d, accumulate, terms...,
           Product<Broadcast>{matrix(g_hw, width), parameters_transposed(proj_.data(), width), width},
           ScaledRows{matrix(h, d), c.norm_term.data()});
  }

  // W's sums += Hᵀ g_HW over a run of consecutive tiles (h the first one's state, the others' following it; g_hw
  // theirs, tiles × n × width lanes), into this thread's sums: one product of depth tiles · n
  void add_projection_sums(const vreg* h, const vreg* g_hw, int64_t tiles, vreg* sums) const {
    if (dynamic)
      product(result(sums + 2 * n * width, width), transposed(h, d), matrix(g_hw, width), d, width, tiles * n, true);
  }

  // Lanes of this thread's parameter sums: [static (n × width) | scale (n × width) | W (d × width)]
  int64_t sum_lanes() const { return dynamic ? (2 * n + d) * width : n * width; }

  // The per-thread sums -> the parameters' gradients
  ParameterGradients gradients(const vwn::ThreadRows& sums, const Tensor& like) const {
    const std::vector<float> totals = lane_totals(sums, sum_lanes());
    ParameterGradients g{at::zeros({n, m + n}, like.options()), at::zeros({m, n}, like.options()),
                         at::empty({0}, like.options()), at::empty({0}, like.options())};
    float* GA = g.a.data_ptr<float>();
    float* GB = g.b.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t q = 0; q < width; ++q) {
        const int64_t c = q0 + q;
        (c < m + n ? GA[i * (m + n) + c] : GB[(c - m - n) * n + i]) = totals[i * width + q];
      }
    if (!dynamic) return g;
    auto fill = [&](int64_t rows, int64_t offset, float factor) {
      Tensor t = at::zeros({rows, k}, like.options());
      float* out = t.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t q = 0; q < width; ++q) out[r * k + q0 + q] = totals[offset + r * width + q] * factor;
      return t;
    };
    g.scale = fill(n, n * width, 1.0f);
    g.proj = fill(d, 2 * n * width, inverse_temperature_);  // the sums are of W / τ's gradient
    return g;
  }

  const bool dynamic;
  const int64_t n, m, d, k, q0, width;

 private:
  // c.rstd of each slot, and H W (n × width lanes) into pre
  void project(const vreg* h, Coefficients& c, vreg* pre) const {
    for (int64_t i = 0; i < n; ++i) c.rstd[i] = lanes_rstd(h + i * d, d, eps_);
    product(result(pre, width), matrix(h, d), parameters(proj_.data(), width), n, width, d, false);
  }

  // body.template operator()<kCount>(slot i, element e) -> vreg for the coefficients e .. e + kCount - 1 of every
  // slot's row, kCount = 4 while the row lasts (then 2, 1); slot_sums[i], if given, = what it returned for slot i,
  // summed
  // NOTE: four at a time, each body loading and evaluating all four before storing any: in place, one element's
  // store would order the next one's load behind it, and the tanh's ~16 dependent operations of four elements
  // overlap only if the core sees them together (the forward's coefficient loop alone at (8, 64), in place: x0.94
  // against one at a time, x0.90 against the three stores a coefficient had before). The slot's sum stays in a
  // register: accumulated in c.norm_term instead, each element's add waited on the last one's store, and a (2, 8)
  // write + read backward ran x1.04 (slower).
  template <typename Body>
  __attribute__((always_inline)) void for_each_slot_run(const Body& body, vreg* slot_sums) const {
    for (int64_t i = 0; i < n; ++i) {
      vreg sum{};
      int64_t q = 0;
      for (; q + 4 <= width; q += 4) sum += body.template operator()<4>(i, i * width + q);
      if (q + 2 <= width) {
        sum += body.template operator()<2>(i, i * width + q);
        q += 2;
      }
      if (q < width) sum += body.template operator()<1>(i, i * width + q);
      if (slot_sums) slot_sums[i] = sum;
    }
  }

  // Columns [q0, q0 + width) of a (rows, k) matrix given elementwise by value(row, column), (rows × width)
  template <typename Value>
  std::vector<float> columns(int64_t rows, const Value& value) const {
    std::vector<float> out(rows * width);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t q = 0; q < width; ++q) out[r * width + q] = value(r, q0 + q);
    return out;
  }

  const float eps_;
  float inverse_temperature_ = 1.0f;
  std::vector<float> static_, scale_, proj_;
};

// A thread's buffers for its tiles: the coefficients of each GHC an op computes, and lane matrices of the given sizes.
struct TileWork {
  std::vector<Coefficients> coefficients;
  std::vector<LaneBuffer> buffers;
  TileWork(std::initializer_list<const Mixing*> mixings, std::initializer_list<int64_t> sizes) {
    for (const Mixing* mixing : mixings) coefficients.emplace_back(mixing->n, mixing->width);
    for (const int64_t size : sizes) buffers.emplace_back(size);
  }
  vreg* operator[](std::size_t i) { return buffers[i].data(); }
};

struct NoFinish {
  void operator()(TileWork&, int64_t, int64_t) const {}
};

// Consecutive tiles of n slots whose parameter gradients (Σ over tokens and slots) one product sums: a depth of
// kSumDepth, or one tile if that alone is half as deep
// NOTE: a product per tile, of depth n, loads and stores all the sums (d x width for a GHC's W, d x 2d for the merge
// weight) for every n FMAs into each. Runs of tiles against one tile at a time, alternated in one process: write +
// read backward x0.79-0.81 at (2, 3), x0.87-0.88 at (2, 4), x0.95 at (2, 8); the merge's backward x0.75-0.82 at
// (2, 3), x0.85 at (2, 4), x0.97 at (2, 8). At n = 16 a run of two made the merge x1.03 (slower), its buffers of
// normed state twice as large; at (8, 64) a run of four tiles' g_HW (590 KB) made the backward x1.10.
int64_t tiles_per_sum(int64_t n) { return n >= kSumDepth / 2 ? 1 : kSumDepth / n; }

// The tiles over the threads, `work` a TileWork of the given GHCs and lane-matrix sizes per thread, in runs of up to
// `run_length` consecutive tiles: body(work, tile, first token, token count, the tile's index in its run) for each,
// then finish(work, the run's first tile, its tile count).
template <typename Body, typename Finish = NoFinish>
void for_each_tile(int64_t tiles, int64_t tokens, int64_t run_length, std::initializer_list<const Mixing*> mixings,
                   std::initializer_list<int64_t> sizes, const Body& body, const Finish& finish = {}) {
  at::parallel_for(0, tiles, kGrainTiles, [&](int64_t begin, int64_t end) {
    TileWork work(mixings, sizes);
    for (int64_t run = begin; run < end; run += run_length) {
      const int64_t run_tiles = std::min(run_length, end - run);
      for (int64_t tile = run; tile < run + run_tiles; ++tile) {
        const int64_t t0 = tile * kLanes;
        body(work, tile, t0, std::clamp<int64_t>(tokens - t0, 0, kLanes), tile - run);
      }
      finish(work, run, run_tiles);
    }
  });
}

vwn::ThreadRows parameter_sums(const Mixing& mixing) { return vwn::ThreadRows(mixing.sum_lanes() * kLanes); }
vreg* thread_sums(vwn::ThreadRows& sums) { return reinterpret_cast<vreg*>(sums.row()); }

// x (T, n, d) -> lane tiles (ceil(T / kLanes), n, d, kLanes)
Tensor to_tiles(const Tensor& x) {
  check_input(x, "x", 3);
  const int64_t tokens = x.size(0), width = x.size(1) * x.size(2);
  Tensor tiles = at::empty({(tokens + kLanes - 1) / kLanes, x.size(1), x.size(2), kLanes}, x.options());
  const float* X = x.data_ptr<float>();
  at::parallel_for(0, tiles.size(0), kGrainTiles, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile)
      to_lanes(X + tile * kLanes * width, width, std::min(kLanes, tokens - tile * kLanes), width, tile_of(tiles, tile));
  });
  return tiles;
}

// lane tiles (tiles, n, d, kLanes) -> x (T, n, d), the first T tokens
Tensor from_tiles(const Tensor& tiles_arg, int64_t tokens) {
  const Tensor tiles = as_tiles(tiles_arg, "tiles");
  TORCH_CHECK(0 <= tokens && tokens <= tiles.size(0) * kLanes, "vwn_ghc: ", tokens, " tokens in ", tiles.size(0),
              " tiles");
  const int64_t width = tiles.size(1) * tiles.size(2);
  Tensor x = at::empty({tokens, tiles.size(1), tiles.size(2)}, tiles.options());
  float* X = x.data_ptr<float>();
  at::parallel_for(0, (tokens + kLanes - 1) / kLanes, kGrainTiles, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile)
      from_lanes(tile_of(tiles, tile), width, std::min(kLanes, tokens - tile * kLanes), X + tile * kLanes * width,
                 width);
  });
  return x;
}

// ---- one tile of a read or a write, forward and backward; c holds the tile's coefficients, computed here ----

// state h (n × d) -> x (m × d), X[j] = Σ_i Å[i, j] H[i]
void read_tile(const Mixing& mixing, const vreg* h, Coefficients& c, vreg* x) {
  mixing.forward(h, c);
  product(result(x, mixing.d), transposed(c.coef.data(), mixing.m), matrix(h, mixing.d), mixing.m, mixing.d, mixing.n,
          false);
}

// gradient gx (m × d) of x -> the state's gradient grad_h (n × d), written, or added with `accumulate`, the static
// and scale parameters' into this thread's sums, and g_coef (n × m lanes) left holding g_HW, for the run's W sums
// (Mixing::add_projection_sums)
// NOTE: a write + read backward copies the gradient through the next write into grad_h and adds to it here;
// adding it as one more term of state_gradient's pass instead ran that backward ×1.03 (slower) at (2, 16) and
// (8, 64), against the copy, in two sittings.
void read_tile_backward(const Mixing& mixing, const vreg* h, const vreg* gx, Coefficients& c, vreg* g_coef,
                        vreg* grad_h, bool accumulate, vreg* sums) {
  const int64_t n = mixing.n, d = mixing.d, m = mixing.m;
  product(result(g_coef, m), matrix(h, d), transposed(gx, d), n, m, d, false);  // <H[i], G_X[j]>
  mixing.backward(h, c, g_coef, sums);
  mixing.state_gradient(h, c, g_coef, grad_h, accumulate,
                        Product<ConstLanes>{matrix(c.coef.data(), m), matrix(gx, d), m});  // Σ_j Å[i, j] G_X[j]
}

// state h (n × d), z (m × d) -> new state out (n × d), H⁺[j] = Σ_i Â[i, j] H[i] + Σ_l Bᵀ[j, l] Z[l]
void write_tile(const Mixing& mixing, const vreg* h, const vreg* z, Coefficients& c, vreg* out) {
  const int64_t n = mixing.n, d = mixing.d, m = mixing.m, width = mixing.width;
  mixing.forward(h, c);
  const vreg* coef = c.coef.data();
  sum_of(result(out, d), n, d, false,
         Product<ConstLanes>{transposed(coef, width), matrix(h, d), n},  // Σ_i Â[i, j] H[i]
         Product<ConstLanes>{matrix(coef + n, width), matrix(z, d), m});  // + Σ_l Bᵀ[j, l] Z[l]
}

// gradient g (n × d) of the new state -> gradients of h (n × d) and z (m × d), the static and scale parameters' into
// this thread's sums, and g_coef (n × (n + m) lanes) left holding g_HW, for the run's W sums
// (Mixing::add_projection_sums)
void write_tile_backward(const Mixing& mixing, const vreg* h, const vreg* z, const vreg* g, Coefficients& c,
                         vreg* g_coef, vreg* grad_h, vreg* grad_z, vreg* sums) {
  const int64_t n = mixing.n, d = mixing.d, m = mixing.m, width = mixing.width;
  product(result(g_coef, width), matrix(h, d), transposed(g, d), n, n, d, false);         // <H[i], G[j]>
  product(result(g_coef + n, width), matrix(g, d), transposed(z, d), n, m, d, false);      // <G[j], Z[l]>
  mixing.backward(h, c, g_coef, sums);
  const vreg* coef = c.coef.data();
  product(result(grad_z, d), transposed(coef + n, width), matrix(g, d), m, d, n, false);  // Σ_j Bᵀ[j, l] G[j]
  mixing.state_gradient(h, c, g_coef, grad_h, false,
                        Product<ConstLanes>{matrix(coef, width), matrix(g, d), n});  // Σ_j Â[i, j] G[j]
}

// ---- the ops ----
//
// A read, a write, and a write followed by the next GHC's read of the state it wrote (every GHC but the first reads
// what the one before it wrote): one pass over the state each way instead of two, and the new state's two gradients
// (through the next write and through the next read) summed in the tile rather than by a pass over the whole state.

// h (tiles) -> x (T, m, d)
Tensor read_forward(const Tensor& h_arg, const Tensor& a, const Tensor& b, const std::optional<Tensor>& proj,
                    const std::optional<Tensor>& scale, double temperature, int64_t tokens, double eps) {
  const Tensor h = as_tiles(h_arg, "h");
  Tensor x = at::empty({tokens, b.size(0), h.size(2)}, h.options());
  const Dims s(h, x);
  const Mixing read({a, b, proj, scale, temperature}, s, eps, Side::read);
  float* X = x.data_ptr<float>();
  const int64_t row = s.m * s.d;
  for_each_tile(s.tiles, s.tokens, 1, {&read}, {row},
                [&](TileWork& work, int64_t tile, int64_t t0, int64_t count, int64_t) {
    read_tile(read, tile_of(h, tile), work.coefficients[0], work[0]);
    from_lanes(work[0], row, count, X + t0 * row, row);
  });
  return x;
}

// gradient of x (T, m, d) -> gradients of h (tiles), A (n, m + n), proj (d, k) and scale (n, k) (the last two
// empty if static); B takes no part in the read
std::tuple<Tensor, Tensor, Tensor, Tensor> read_backward(const Tensor& h_arg, const Tensor& a, const Tensor& b,
                                                         const std::optional<Tensor>& proj,
                                                         const std::optional<Tensor>& scale, double temperature,
                                                         double eps, const Tensor& grad_x) {
  const Tensor h = as_tiles(h_arg, "h");
  check_input(grad_x, "grad_x", 3);
  const Dims s(h, grad_x);
  const Mixing read({a, b, proj, scale, temperature}, s, eps, Side::read);
  vwn::ThreadRows sums = parameter_sums(read);
  Tensor grad_h = at::empty_like(h);
  const float* GX = grad_x.data_ptr<float>();
  const int64_t row = s.m * s.d;
  const int64_t g_lanes = s.n * s.m, run_length = tiles_per_sum(s.n);
  for_each_tile(s.tiles, s.tokens, run_length, {&read}, {row, run_length * g_lanes},
                [&](TileWork& work, int64_t tile, int64_t t0, int64_t count, int64_t in_run) {
    to_lanes(GX + t0 * row, row, count, row, work[0]);
    read_tile_backward(read, tile_of(h, tile), work[0], work.coefficients[0], work[1] + in_run * g_lanes,
                       tile_of(grad_h, tile), false, thread_sums(sums));
  }, [&](TileWork& work, int64_t run, int64_t run_tiles) {
    read.add_projection_sums(tile_of(h, run), work[1], run_tiles, thread_sums(sums));
  });
  const ParameterGradients g = read.gradients(sums, h);
  return {grad_h, g.a, g.proj, g.scale};
}

// h (tiles), z (T, m, d) -> new state (tiles)
Tensor write_forward(const Tensor& h_arg, const Tensor& z, const Tensor& a, const Tensor& b,
                     const std::optional<Tensor>& proj, const std::optional<Tensor>& scale, double temperature,
                     double eps) {
  const Tensor h = as_tiles(h_arg, "h");
  check_input(z, "z", 3);
  const Dims s(h, z);
  const Mixing write({a, b, proj, scale, temperature}, s, eps, Side::write);
  Tensor out = at::empty_like(h);
  const float* Z = z.data_ptr<float>();
  const int64_t row = s.m * s.d;
  for_each_tile(s.tiles, s.tokens, 1, {&write}, {row},
                [&](TileWork& work, int64_t tile, int64_t t0, int64_t count, int64_t) {
    to_lanes(Z + t0 * row, row, count, row, work[0]);
    write_tile(write, tile_of(h, tile), work[0], work.coefficients[0], tile_of(out, tile));
  });
  return out;
}

// gradient g of the new state (tiles) -> gradients of h (tiles), z (T, m, d), A, B, proj and scale
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> write_backward(
    const Tensor& h_arg, const Tensor& z, const Tensor& a, const Tensor& b, const std::optional<Tensor>& proj,
    const std::optional<Tensor>& scale, double temperature, double eps, const Tensor& grad_arg) {
  const Tensor h = as_tiles(h_arg, "h");
  check_input(z, "z", 3);
  const Tensor grad = as_tiles(grad_arg, "grad");
  TORCH_CHECK(grad.sizes() == h.sizes(), "vwn_ghc: grad ", grad.sizes(), " for a state of ", h.sizes());
  const Dims s(h, z);
  const Mixing write({a, b, proj, scale, temperature}, s, eps, Side::write);
  vwn::ThreadRows sums = parameter_sums(write);
  Tensor grad_h = at::empty_like(h);
  Tensor grad_z = at::empty_like(z);
  const float* Z = z.data_ptr<float>();
  float* GZ = grad_z.data_ptr<float>();
  const int64_t row = s.m * s.d;
  const int64_t g_lanes = s.n * write.width, run_length = tiles_per_sum(s.n);
  for_each_tile(s.tiles, s.tokens, run_length, {&write}, {row, row, run_length * g_lanes},
                [&](TileWork& work, int64_t tile, int64_t t0, int64_t count, int64_t in_run) {
    to_lanes(Z + t0 * row, row, count, row, work[0]);
    write_tile_backward(write, tile_of(h, tile), work[0], tile_of(grad, tile), work.coefficients[0],
                        work[2] + in_run * g_lanes, tile_of(grad_h, tile), work[1], thread_sums(sums));
    from_lanes(work[1], row, count, GZ + t0 * row, row);
  }, [&](TileWork& work, int64_t run, int64_t run_tiles) {
    write.add_projection_sums(tile_of(h, run), work[2], run_tiles, thread_sums(sums));
  });
  const ParameterGradients g = write.gradients(sums, h);
  return {grad_h, grad_z, g.a, g.b, g.proj, g.scale};
}

// h (tiles), z (T, m, d) -> the write's new state (tiles) and the next GHC's read of it, x (T, m, d)
std::tuple<Tensor, Tensor> write_read_forward(const Tensor& h_arg, const Tensor& z, const Tensor& a,
                                              const Tensor& b, const std::optional<Tensor>& proj,
                                              const std::optional<Tensor>& scale, double temperature, double eps,
                                              const Tensor& next_a,
                                              const Tensor& next_b, const std::optional<Tensor>& next_proj,
                                              const std::optional<Tensor>& next_scale, double next_temperature,
                                              double next_eps) {
  const Tensor h = as_tiles(h_arg, "h");
  check_input(z, "z", 3);
  const Dims s(h, z);
  const Mixing write({a, b, proj, scale, temperature}, s, eps, Side::write);
  const Mixing read({next_a, next_b, next_proj, next_scale, next_temperature}, s, next_eps, Side::read);
  Tensor out = at::empty_like(h);
  Tensor x = at::empty_like(z);
  const float* Z = z.data_ptr<float>();
  float* X = x.data_ptr<float>();
  const int64_t row = s.m * s.d;
  for_each_tile(s.tiles, s.tokens, 1, {&write, &read}, {row, row},
                [&](TileWork& work, int64_t tile, int64_t t0, int64_t count, int64_t) {
    vreg* out_tile = tile_of(out, tile);
    to_lanes(Z + t0 * row, row, count, row, work[0]);
    write_tile(write, tile_of(h, tile), work[0], work.coefficients[0], out_tile);
    read_tile(read, out_tile, work.coefficients[1], work[1]);
    from_lanes(work[1], row, count, X + t0 * row, row);
  });
  return {out, x};
}

// gradients of the new state out (tiles, through the next write) and of x (T, m, d) -> gradients of h (tiles),
// z (T, m, d), this GHC's A, B, proj and scale, and the next GHC's A, proj and scale
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> write_read_backward(
    const Tensor& h_arg, const Tensor& z, const Tensor& out_arg, const Tensor& a, const Tensor& b,
    const std::optional<Tensor>& proj, const std::optional<Tensor>& scale, double temperature, double eps,
    const Tensor& next_a, const Tensor& next_b, const std::optional<Tensor>& next_proj,
    const std::optional<Tensor>& next_scale, double next_temperature, double next_eps, const Tensor& grad_out_arg,
    const Tensor& grad_x) {
  const Tensor h = as_tiles(h_arg, "h");
  const Tensor out = as_tiles(out_arg, "out");
  const Tensor grad_out = as_tiles(grad_out_arg, "grad_out");
  check_input(z, "z", 3);
  check_input(grad_x, "grad_x", 3);
  TORCH_CHECK(out.sizes() == h.sizes() && grad_out.sizes() == h.sizes() && grad_x.sizes() == z.sizes(),
              "vwn_ghc: out ", out.sizes(), ", grad_out ", grad_out.sizes(), " and grad_x ", grad_x.sizes(),
              " for a state of ", h.sizes(), " and z of ", z.sizes());
  const Dims s(h, z);
  const Mixing write({a, b, proj, scale, temperature}, s, eps, Side::write);
  const Mixing read({next_a, next_b, next_proj, next_scale, next_temperature}, s, next_eps, Side::read);
  vwn::ThreadRows write_sums = parameter_sums(write), read_sums = parameter_sums(read);
  Tensor grad_h = at::empty_like(h);
  Tensor grad_z = at::empty_like(z);
  const float *Z = z.data_ptr<float>(), *GX = grad_x.data_ptr<float>();
  float* GZ = grad_z.data_ptr<float>();
  const int64_t n = s.n, d = s.d, row = s.m * s.d;
  const int64_t write_g_lanes = n * write.width, read_g_lanes = n * read.width, run_length = tiles_per_sum(n);
  for_each_tile(s.tiles, s.tokens, run_length, {&write, &read},
                {row, row, row, n * d, run_length * write_g_lanes, run_length * read_g_lanes},
                [&](TileWork& work, int64_t tile, int64_t t0, int64_t count, int64_t in_run) {
    vreg *zt = work[0], *gxt = work[1], *gzt = work[2], *g = work[3];
    to_lanes(Z + t0 * row, row, count, row, zt);
    to_lanes(GX + t0 * row, row, count, row, gxt);
    const vreg* grad_out_tile = tile_of(grad_out, tile);
    std::copy(grad_out_tile, grad_out_tile + n * d, g);
    read_tile_backward(read, tile_of(out, tile), gxt, work.coefficients[1], work[5] + in_run * read_g_lanes, g, true,
                       thread_sums(read_sums));
    write_tile_backward(write, tile_of(h, tile), zt, g, work.coefficients[0], work[4] + in_run * write_g_lanes,
                        tile_of(grad_h, tile), gzt, thread_sums(write_sums));
    from_lanes(gzt, row, count, GZ + t0 * row, row);
  }, [&](TileWork& work, int64_t run, int64_t run_tiles) {
    read.add_projection_sums(tile_of(out, run), work[5], run_tiles, thread_sums(read_sums));
    write.add_projection_sums(tile_of(h, run), work[4], run_tiles, thread_sums(write_sums));
  });
  const ParameterGradients w = write.gradients(write_sums, h), r = read.gradients(read_sums, h);
  return {grad_h, grad_z, w.a, w.b, w.proj, w.scale, r.a, r.proj, r.scale};
}

// ---- the MTP module's merge, from the trunk's final state and straight into the MTP block's, as lane tiles ----
//
//   Ĥ = RMSNorm(H) ∘ γ_h,  Ê = RMSNorm(E) ∘ γ_e   over each token's n · d channels
//   M[i] = W_h Ĥ[i] + W_e Ê[i]                     each slot i, W = [W_h | W_e] (d, 2d) shared by the slots
// NOTE: one pass each way; the torch code (two norms at D', two products, a sum, the conversion to tiles) made
// about ten passes over (T, n, d) tensors, 8.8 ms forward + backward at (2, 16), 2048 tokens.

struct MergeDims {
  int64_t tokens, n, d, tiles;
  explicit MergeDims(const Tensor& e)
      : tokens(e.size(0)), n(e.size(1)), d(e.size(2)), tiles((tokens + kLanes - 1) / kLanes) {}
};

void check_merge_operands(const Tensor& h, const Tensor& e, const Tensor& gamma_h, const Tensor& gamma_e,
                          const Tensor& weight) {
  check_input(e, "embed", 3);
  check_input(gamma_h, "hidden norm weight", 1);
  check_input(gamma_e, "embed norm weight", 1);
  check_input(weight, "merge weight", 2);
  const int64_t width = e.size(1) * e.size(2), d = e.size(2);
  TORCH_CHECK(h.size(0) == MergeDims(e).tiles && h.size(1) == e.size(1) && h.size(2) == d &&
                  gamma_h.size(0) == width && gamma_e.size(0) == width && weight.size(0) == d && weight.size(1) == 2 * d,
              "vwn_ghc: mtp_merge takes hidden as the lane tiles of embed's (T, n, d), norm weights (n·d) and a (d, 2d) "
              "merge weight, got ", h.sizes(), ", ", e.sizes(), ", ", gamma_h.sizes(), ", ", gamma_e.sizes(), ", ",
              weight.sizes());
}

// hidden (lane tiles of T tokens of n × d), embed (T, n, d), norm weights (n·d), merge weight (d, 2d) -> merged state
// as lane tiles, and the two rstd (T) for the backward
std::tuple<Tensor, Tensor, Tensor> mtp_merge_forward(const Tensor& hidden, const Tensor& e, const Tensor& gamma_h,
                                                     const Tensor& gamma_e, const Tensor& weight, double eps) {
  const Tensor h = as_tiles(hidden, "hidden");
  check_merge_operands(h, e, gamma_h, gamma_e, weight);
  const MergeDims s(e);
  const int64_t n = s.n, d = s.d, width = n * d;
  Tensor tiles = at::empty_like(h);
  Tensor rstd_h = at::empty({s.tokens}, e.options()), rstd_e = at::empty({s.tokens}, e.options());
  const float *E = e.data_ptr<float>(), *W = weight.data_ptr<float>();
  const float *GH = gamma_h.data_ptr<float>(), *GE = gamma_e.data_ptr<float>();
  float *RH = rstd_h.data_ptr<float>(), *RE = rstd_e.data_ptr<float>();
  for_each_tile(s.tiles, s.tokens, 1, {}, {width, 2 * width},
                [&](TileWork& work, int64_t tile, int64_t t0, int64_t count, int64_t) {
    vreg *embed = work[0], *normed = work[1];  // normed: [Ĥ[i] | Ê[i]] per slot, n × 2d
    to_lanes(E + t0 * width, width, count, width, embed);
    int64_t side = 0;
    for (auto [x, gamma, rstd_out] : {std::tuple{tile_of(h, tile), GH, RH},
                                      std::tuple{static_cast<const vreg*>(embed), GE, RE}}) {
      const vreg rstd = lanes_rstd(x, width, static_cast<float>(eps));
      for (int64_t i = 0; i < n; ++i)
        for (int64_t f = 0; f < d; ++f) normed[i * 2 * d + side * d + f] = x[i * d + f] * rstd * gamma[i * d + f];
      for (int64_t l = 0; l < count; ++l) rstd_out[t0 + l] = rstd[l];
      ++side;
    }
    // M[i] = [Ĥ[i] | Ê[i]] Wᵀ, one product of depth 2d
    // NOTE: as two products of depth d (Ĥ[i] W_hᵀ + Ê[i] W_eᵀ) summed in one pass, with add_to's operands pinned
    // in registers, GCC spilled (55 stack accesses of vector registers in the loop, 3 before): x1.26-1.68 (slower).
    // This one against the two before the pinning: x0.81-0.93 from (2, 3) to (2, 16).
    product(result(tile_of(tiles, tile), d), matrix(normed, 2 * d), Broadcast{W, 1, 2 * d}, n, d, 2 * d, false);
  });
  return {tiles, rstd_h, rstd_e};
}

// gradient of the merged state (lane tiles) -> gradients of hidden (lane tiles), embed (T, n, d), the two norm
// weights and the merge weight
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mtp_merge_backward(const Tensor& grad_arg, const Tensor& hidden,
                                                                      const Tensor& e, const Tensor& gamma_h,
                                                                      const Tensor& gamma_e, const Tensor& weight,
                                                                      const Tensor& rstd_h, const Tensor& rstd_e) {
  const Tensor h = as_tiles(hidden, "hidden");
  check_merge_operands(h, e, gamma_h, gamma_e, weight);
  const Tensor grad = as_tiles(grad_arg, "grad");
  const MergeDims s(e);
  const int64_t n = s.n, d = s.d, width = n * d;
  TORCH_CHECK(grad.sizes() == h.sizes(), "vwn_ghc: grad ", grad.sizes(), " for a merged state of ", h.sizes());
  Tensor grad_h = at::empty_like(h), grad_e = at::empty_like(e);
  const float *E = e.data_ptr<float>(), *W = weight.data_ptr<float>();
  const float *GH = gamma_h.data_ptr<float>(), *GE = gamma_e.data_ptr<float>();
  const float *RH = rstd_h.data_ptr<float>(), *RE = rstd_e.data_ptr<float>();
  float* DE = grad_e.data_ptr<float>();
  // per thread and lane: [W (d × 2d) | γ_h (n·d) | γ_e (n·d)]
  const int64_t weight_lanes = 2 * d * d;
  vwn::ThreadRows sums((weight_lanes + 2 * width) * kLanes);
  const int64_t run_length = tiles_per_sum(n);
  for_each_tile(s.tiles, s.tokens, run_length, {}, {width, 2 * width, 2 * run_length * width},
                [&](TileWork& work, int64_t tile, int64_t t0, int64_t count, int64_t in_run) {
    vreg *embed = work[0], *grad_normed = work[1], *sum = thread_sums(sums);
    vreg* normed = work[2] + in_run * 2 * width;  // [Ĥ[i] | Ê[i]] per slot (n × 2d), for the run's W sums
    const vreg* g = tile_of(grad, tile);
    to_lanes(E + t0 * width, width, count, width, embed);  // its gradient replaces it, then goes back to rows
    // [d Ĥ[i] | d Ê[i]] = G[i] W
    product(result(grad_normed, 2 * d), matrix(g, d), Broadcast{W, 2 * d, 1}, n, 2 * d, d, false);
    int64_t side = 0;
    for (auto [x, gamma, rstd_in, dx] : {std::tuple{tile_of(h, tile), GH, RH, tile_of(grad_h, tile)},
                                         std::tuple{static_cast<const vreg*>(embed), GE, RE, embed}}) {
      vreg rstd{};
      for (int64_t l = 0; l < count; ++l) rstd[l] = rstd_in[t0 + l];
      // RMSNorm backward: u = d Ĥ ∘ γ;  d x = rstd · u − rstd³ / (n·d) · x · Σ u ∘ x;  d γ += d Ĥ ∘ x · rstd
      vreg* sum_gamma = sum + weight_lanes + side * width;
      vreg dot{};
      for (int64_t i = 0; i < n; ++i)
        for (int64_t f = 0; f < d; ++f) {
          const int64_t c = i * d + f, j = i * 2 * d + side * d + f;
          normed[j] = x[c] * rstd * gamma[c];
          sum_gamma[c] += grad_normed[j] * x[c] * rstd;
          grad_normed[j] *= gamma[c];
          dot += grad_normed[j] * x[c];
        }
      const vreg correction = dot * rstd * rstd * rstd / static_cast<float>(width);
      for (int64_t i = 0; i < n; ++i)  // 0 past the last token
        for (int64_t f = 0; f < d; ++f)
          dx[i * d + f] = rstd * grad_normed[i * 2 * d + side * d + f] - correction * x[i * d + f];
      ++side;
    }
    from_lanes(embed, width, count, DE + t0 * width, width);
  }, [&](TileWork& work, int64_t run, int64_t run_tiles) {
    // W's gradient Σ G[i]ᵀ [Ĥ[i] | Ê[i]] over the run's tiles and slots: the tiles' gradients follow each other, so
    // the run is one product of depth run_tiles · n
    product(Lanes{thread_sums(sums), 2 * d, 1}, transposed(tile_of(grad, run), d), matrix(work[2], 2 * d), d, 2 * d,
            run_tiles * n, true);
  });
  const std::vector<float> totals = lane_totals(sums, weight_lanes + 2 * width);
  Tensor grad_weight = at::empty_like(weight), grad_gamma_h = at::empty_like(gamma_h);
  Tensor grad_gamma_e = at::empty_like(gamma_e);
  float* DW = grad_weight.data_ptr<float>();
  for (int64_t i = 0; i < weight_lanes; ++i) DW[i] = totals[i];
  for (int64_t f = 0; f < width; ++f) {
    grad_gamma_h.data_ptr<float>()[f] = totals[weight_lanes + f];
    grad_gamma_e.data_ptr<float>()[f] = totals[weight_lanes + width + f];
  }
  return {grad_h, grad_e, grad_gamma_h, grad_gamma_e, grad_weight};
}

}  // namespace

TORCH_LIBRARY(vwn_ghc, lib) {
  lib.def("lanes() -> int", [] { return kLanes; });  // tokens per lane tile, for harness/model/ghc_kernel.py
  lib.def("to_tiles(Tensor x) -> Tensor");
  lib.def("mtp_merge_forward(Tensor hidden, Tensor embed, Tensor gamma_h, Tensor gamma_e, Tensor weight, float eps)"
          " -> (Tensor, Tensor, Tensor)");
  lib.def("mtp_merge_backward(Tensor grad, Tensor hidden, Tensor embed, Tensor gamma_h, Tensor gamma_e, "
          "Tensor weight, Tensor rstd_h, Tensor rstd_e) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  lib.def("from_tiles(Tensor tiles, int tokens) -> Tensor");
  lib.def("read_forward(Tensor h, Tensor a, Tensor b, Tensor? proj, Tensor? scale, float temperature, int tokens, "
          "float eps) -> Tensor");
  lib.def("read_backward(Tensor h, Tensor a, Tensor b, Tensor? proj, Tensor? scale, float temperature, float eps, "
          "Tensor grad_x) -> (Tensor, Tensor, Tensor, Tensor)");
  lib.def("write_forward(Tensor h, Tensor z, Tensor a, Tensor b, Tensor? proj, Tensor? scale, float temperature, "
          "float eps) -> Tensor");
  lib.def("write_backward(Tensor h, Tensor z, Tensor a, Tensor b, Tensor? proj, Tensor? scale, float temperature, "
          "float eps, Tensor grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  lib.def("write_read_forward(Tensor h, Tensor z, Tensor a, Tensor b, Tensor? proj, Tensor? scale, float temperature, "
          "float eps, Tensor next_a, Tensor next_b, Tensor? next_proj, Tensor? next_scale, float next_temperature, "
          "float next_eps) -> (Tensor, Tensor)");
  lib.def("write_read_backward(Tensor h, Tensor z, Tensor out, Tensor a, Tensor b, Tensor? proj, Tensor? scale, "
          "float temperature, float eps, Tensor next_a, Tensor next_b, Tensor? next_proj, Tensor? next_scale, "
          "float next_temperature, float next_eps, Tensor grad_out, Tensor grad_x) "
          "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vwn_ghc, CPU, lib) {
  lib.impl("to_tiles", &to_tiles);
  lib.impl("mtp_merge_forward", &mtp_merge_forward);
  lib.impl("mtp_merge_backward", &mtp_merge_backward);
  lib.impl("from_tiles", &from_tiles);
  lib.impl("read_forward", &read_forward);
  lib.impl("read_backward", &read_backward);
  lib.impl("write_forward", &write_forward);
  lib.impl("write_backward", &write_backward);
  lib.impl("write_read_forward", &write_read_forward);
  lib.impl("write_read_backward", &write_read_backward);
}
