// Fused CPU kernels (fp32) for the MoE's token-choice routing, dispatch and combine; the maths and the
// reference code are harness/model/routing.py's.
//
// N tokens, E experts, k choices per token, M = N·k assignments, D the model width.
//   route:    logits = x Wᵀ (N, E) of the router input x (N, D) and weight W (E, D); p = softmax(logits);
//             the k experts of largest p + bias (bias only steers the choice);
//             gates = p of the chosen, renormalised = softmax of the chosen logits (N, k);
//             assignments sorted by expert, stably (token order): token_of (M), position (N, k) of each
//             (token, choice) in that order, counts and ends (E); and the balancing terms
//             balance = E · Σ_e f_e · mean_t p_e (f_e = counts_e / M) and z = mean_t logsumexp(logits)²
//   dispatch: routed[s] = x[token_of[s]]            (M, D); backward a gather-sum over position
//   combine:  out[t] = Σ_j gates[t, j] · y[position[t, j]]   (N, D)
//
// The torch code makes each of these a chain of small ops (linear, softmax, topk, gather, sum, div, argsort,
// floor-divide, index_add, cumsum, index_select, mul, zeros, index_add, mean, logsumexp, ... and their
// backward nodes): most of what a tiny MoE layer spent beyond its expert GEMMs.
// NOTE: the router's product is in the route op: as a Linear of E = 4 outputs (oneDNN, and its autograd node)
// it cost the tiny layer 105 µs forward + backward, where the dot products here take a few.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "thread_rows.h"
#include "vector_math.h"

namespace {

using at::Tensor;

constexpr int64_t kGrainTokens = 64;

void check_float(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim,
              "vwn_moe: ", name, " must be a contiguous float32 CPU tensor of ", dim, " dims, got ", t.sizes(), " ",
              t.scalar_type());
}

void check_index(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.is_contiguous() && t.dim() == dim,
              "vwn_moe: ", name, " must be a contiguous int64 CPU tensor of ", dim, " dims, got ", t.sizes(), " ",
              t.scalar_type());
}

// x (N, D), weight (E, D), bias (E) or none, k -> gates (N, k), chosen (N, k), token_of (M), position (N, k),
// counts (E) int64, ends (E) int32, probs (N, E), logsumexp (N), balance and z-loss (scalars)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> route(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, int64_t k) {
  check_float(x, "x", 2);
  check_float(weight, "router weight", 2);
  const int64_t tokens = x.size(0), width = x.size(1), experts = weight.size(0);
  TORCH_CHECK(weight.size(1) == width, "vwn_moe: the router weight is ", weight.sizes(), " for x of ", x.sizes());
  TORCH_CHECK(0 < k && k <= experts, "vwn_moe: k = ", k, " choices among ", experts, " experts");
  if (bias) {
    check_float(*bias, "bias", 1);
    TORCH_CHECK(bias->size(0) == experts, "vwn_moe: bias has ", bias->size(0), " entries for ", experts, " experts");
  }
  const auto options = x.options();
  const auto long_options = options.dtype(at::kLong);
  Tensor gates = at::empty({tokens, k}, options), chosen = at::empty({tokens, k}, long_options);
  Tensor probs = at::empty({tokens, experts}, options), lse = at::empty({tokens}, options);
  Tensor token_of = at::empty({tokens * k}, long_options), position = at::empty({tokens, k}, long_options);
  Tensor counts = at::empty({experts}, long_options), ends = at::empty({experts}, options.dtype(at::kInt));
  const float* X = x.data_ptr<float>();
  const float* W = weight.data_ptr<float>();
  const float* B = bias ? bias->data_ptr<float>() : nullptr;
  float* G = gates.data_ptr<float>();
  float* P = probs.data_ptr<float>();
  float* LSE = lse.data_ptr<float>();
  int64_t* C = chosen.data_ptr<int64_t>();
  vwn::ThreadRows sums(experts + 1);  // Σ_t p (E) and Σ_t logsumexp², per thread
  at::parallel_for(0, tokens, kGrainTokens, [&](int64_t begin, int64_t end) {
    float* __restrict sum = sums.row();
    std::vector<float> score(experts);
    for (int64_t t = begin; t < end; ++t) {
      const float* __restrict xt = X + t * width;
      float* p = P + t * experts;  // the logits, then their softmax
      for (int64_t e = 0; e < experts; ++e) {
        const float* __restrict we = W + e * width;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < width; ++c) dot += xt[c] * we[c];
        p[e] = dot;
      }
      const float peak = *std::max_element(p, p + experts);
      float total = 0.0f;
      for (int64_t e = 0; e < experts; ++e) total += (p[e] = vwn::exp_nonpositive(p[e] - peak));
      for (int64_t e = 0; e < experts; ++e) p[e] /= total;
      LSE[t] = peak + std::log(total);
      for (int64_t e = 0; e < experts; ++e) {
        sum[e] += p[e];
        score[e] = B ? p[e] + B[e] : p[e];
      }
      sum[experts] += LSE[t] * LSE[t];
      // the k largest scores, largest first (ties: the lower expert, as a stable sort would)
      int64_t* c = C + t * k;
      float chosen_total = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = 0;
        for (int64_t e = 1; e < experts; ++e)
          if (score[e] > score[best]) best = e;
        c[j] = best;
        score[best] = -std::numeric_limits<float>::infinity();
        chosen_total += p[best];
      }
      for (int64_t j = 0; j < k; ++j) G[t * k + j] = p[c[j]] / chosen_total;
    }
  });
  // counting sort of the assignments by expert, in (token, choice) order within each
  int64_t* counts_ = counts.data_ptr<int64_t>();
  int32_t* ends_ = ends.data_ptr<int32_t>();
  std::fill(counts_, counts_ + experts, 0);
  for (int64_t a = 0; a < tokens * k; ++a) ++counts_[C[a]];
  std::vector<int64_t> next(experts);
  for (int64_t e = 0, start = 0; e < experts; ++e) {
    next[e] = start;
    start += counts_[e];
    ends_[e] = static_cast<int32_t>(start);
  }
  int64_t* T = token_of.data_ptr<int64_t>();
  int64_t* S = position.data_ptr<int64_t>();
  for (int64_t t = 0, a = 0; t < tokens; ++t)
    for (int64_t j = 0; j < k; ++j, ++a) {
      const int64_t slot = next[C[a]]++;
      T[slot] = t;
      S[a] = slot;
    }
  double balance = 0.0;  // E · Σ_e f_e · mean_t p_e
  for (int64_t e = 0; e < experts; ++e)
    balance += static_cast<double>(counts_[e]) / (tokens * k) * sums.total(e) / tokens;
  return {gates, chosen, token_of, position, counts, ends, probs, lse,
          at::scalar_tensor(experts * balance, options), at::scalar_tensor(sums.total(experts) / tokens, options)};
}

// gradients of gates (N, k), the balance and the z-loss (scalars), and what the forward saved -> gradients of x
// (N, D) and of the router weight (E, D), through the logits' gradient dl:
//   gates = softmax of the chosen logits:  dl_c[j] += g_j (dg_j − Σ_i g_i dg_i)
//   balance = E Σ_e f_e · mean_t p_e:       dl += p ∘ (v − <p, v>),  v_e = d balance · E · f_e / N
//   z = mean lse²:                         dl += p · 2 lse · dz / N
//   d x = dl W,  d W = Σ_t dl_tᵀ x_t
std::tuple<Tensor, Tensor> route_backward(const Tensor& grad_gates, const Tensor& grad_balance, const Tensor& grad_z,
                                          const Tensor& gates, const Tensor& chosen, const Tensor& probs,
                                          const Tensor& lse, const Tensor& counts, const Tensor& x,
                                          const Tensor& weight) {
  check_float(grad_gates, "grad_gates", 2);
  check_float(gates, "gates", 2);
  check_index(chosen, "chosen", 2);
  check_float(probs, "probs", 2);
  check_float(lse, "lse", 1);
  check_index(counts, "counts", 1);
  check_float(x, "x", 2);
  check_float(weight, "router weight", 2);
  const int64_t tokens = probs.size(0), experts = probs.size(1), k = gates.size(1), width = x.size(1);
  Tensor grad_x = at::empty_like(x);
  const float* DG = grad_gates.data_ptr<float>();
  const float d_balance = grad_balance.item<float>(), dz = grad_z.item<float>();
  const float* G = gates.data_ptr<float>();
  const int64_t* C = chosen.data_ptr<int64_t>();
  const int64_t* counts_ = counts.data_ptr<int64_t>();
  const float* P = probs.data_ptr<float>();
  const float* LSE = lse.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  const float* W = weight.data_ptr<float>();
  float* DX = grad_x.data_ptr<float>();
  std::vector<float> v(experts);  // d mean_t p_e
  for (int64_t e = 0; e < experts; ++e)
    v[e] = d_balance * experts * static_cast<float>(counts_[e]) / (tokens * k) / tokens;
  vwn::ThreadRows weight_sums(experts * width);
  at::parallel_for(0, tokens, kGrainTokens, [&](int64_t begin, int64_t end) {
    float* __restrict dw = weight_sums.row();
    std::vector<float> dl(experts);
    for (int64_t t = begin; t < end; ++t) {
      const float* p = P + t * experts;
      float p_dot_v = 0.0f;
      for (int64_t e = 0; e < experts; ++e) p_dot_v += p[e] * v[e];
      const float z_term = 2.0f * LSE[t] * dz / tokens;
      for (int64_t e = 0; e < experts; ++e) dl[e] = p[e] * (v[e] - p_dot_v) + p[e] * z_term;
      const float* g = G + t * k;
      const float* dg = DG + t * k;
      float g_dot_dg = 0.0f;
      for (int64_t j = 0; j < k; ++j) g_dot_dg += g[j] * dg[j];
      for (int64_t j = 0; j < k; ++j) dl[C[t * k + j]] += g[j] * (dg[j] - g_dot_dg);
      const float* __restrict xt = X + t * width;
      float* __restrict dxt = DX + t * width;
      std::fill(dxt, dxt + width, 0.0f);
      for (int64_t e = 0; e < experts; ++e) {
        const float* __restrict we = W + e * width;
        float* __restrict dwe = dw + e * width;
        const float de = dl[e];
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) {
          dxt[c] += de * we[c];
          dwe[c] += de * xt[c];
        }
      }
    }
  });
  Tensor grad_weight = at::empty_like(weight);
  float* DW = grad_weight.data_ptr<float>();
  for (int64_t i = 0; i < experts * width; ++i) DW[i] = weight_sums.total(i);
  return {grad_x, grad_weight};
}

// rows (R, D) and index (M) -> out (M, D), out[s] = rows[index[s]]
Tensor gather_rows(const Tensor& rows, const Tensor& index) {
  check_float(rows, "rows", 2);
  check_index(index, "index", 1);
  const int64_t width = rows.size(1), count = index.size(0), available = rows.size(0);
  Tensor out = at::empty({count, width}, rows.options());
  const float* R = rows.data_ptr<float>();
  const int64_t* I = index.data_ptr<int64_t>();
  float* O = out.data_ptr<float>();
  for (int64_t s = 0; s < count; ++s)
    TORCH_CHECK(0 <= I[s] && I[s] < available, "vwn_moe: row ", I[s], " out of range [0, ", available, ")");
  at::parallel_for(0, count, kGrainTokens, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) std::copy(R + I[s] * width, R + (I[s] + 1) * width, O + s * width);
  });
  return out;
}

// y (M, D), weights (N, k) or none, position (N, k) -> out (N, D), out[t] = Σ_j weights[t, j] · y[position[t, j]]
// (weights 1 without them): the combine, and the dispatch's backward
Tensor weighted_row_sums(const Tensor& y, const std::optional<Tensor>& weights, const Tensor& position) {
  check_float(y, "y", 2);
  check_index(position, "position", 2);
  if (weights) check_float(*weights, "weights", 2);
  const int64_t tokens = position.size(0), k = position.size(1), width = y.size(1);
  Tensor out = at::empty({tokens, width}, y.options());
  const float* Y = y.data_ptr<float>();
  const float* W = weights ? weights->data_ptr<float>() : nullptr;
  const int64_t* S = position.data_ptr<int64_t>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, tokens, kGrainTokens, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* __restrict o = O + t * width;
      std::fill(o, o + width, 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const float w = W ? W[t * k + j] : 1.0f;
        const float* __restrict row = Y + S[t * k + j] * width;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) o[c] += w * row[c];
      }
    }
  });
  return out;
}

// gradient (N, D) of the combine's output, y (M, D), weights (N, k), position (N, k) -> gradients of y (M, D)
// and of the weights (N, k)
std::tuple<Tensor, Tensor> combine_backward(const Tensor& grad, const Tensor& y, const Tensor& weights,
                                            const Tensor& position) {
  check_float(grad, "grad", 2);
  check_float(y, "y", 2);
  check_float(weights, "weights", 2);
  check_index(position, "position", 2);
  const int64_t tokens = position.size(0), k = position.size(1), width = y.size(1);
  Tensor grad_y = at::empty_like(y);  // every row is some (token, choice)'s: all written below
  Tensor grad_weights = at::empty_like(weights);
  const float* DO = grad.data_ptr<float>();
  const float* Y = y.data_ptr<float>();
  const float* W = weights.data_ptr<float>();
  const int64_t* S = position.data_ptr<int64_t>();
  float* DY = grad_y.data_ptr<float>();
  float* DW = grad_weights.data_ptr<float>();
  at::parallel_for(0, tokens, kGrainTokens, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* __restrict g = DO + t * width;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = S[t * k + j];
        const float w = W[t * k + j];
        const float* __restrict row = Y + slot * width;
        float* __restrict d_row = DY + slot * width;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < width; ++c) {
          d_row[c] = w * g[c];
          dot += row[c] * g[c];
        }
        DW[t * k + j] = dot;
      }
    }
  });
  return {grad_y, grad_weights};
}

}  // namespace

TORCH_LIBRARY(vwn_moe, lib) {
  lib.def("route(Tensor x, Tensor weight, Tensor? bias, int k) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
          "Tensor, Tensor, Tensor, Tensor)");
  lib.def("route_backward(Tensor grad_gates, Tensor grad_balance, Tensor grad_z, Tensor gates, Tensor chosen, "
          "Tensor probs, Tensor lse, Tensor counts, Tensor x, Tensor weight) -> (Tensor, Tensor)");
  lib.def("gather_rows(Tensor rows, Tensor index) -> Tensor");
  lib.def("weighted_row_sums(Tensor y, Tensor? weights, Tensor position) -> Tensor");
  lib.def("combine_backward(Tensor grad, Tensor y, Tensor weights, Tensor position) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vwn_moe, CPU, lib) {
  lib.impl("route", &route);
  lib.impl("route_backward", &route_backward);
  lib.impl("gather_rows", &gather_rows);
  lib.impl("weighted_row_sums", &weighted_row_sums);
  lib.impl("combine_backward", &combine_backward);
}
