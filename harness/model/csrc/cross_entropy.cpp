// Fused CPU kernel (fp32) for the cross-entropy of a linear LM head, computed a chunk of rows at a time; the
// maths and the reference code are harness/model/loss.py's.
//
//   loss = Σ_t [ logsumexp(W h_t) - (W h_t)[y_t] ]            h (N, D), W (V, D), y (N,)
//   with gradients:  g_t = softmax(W h_t) - onehot(y_t),  grad_h = G W,  grad_W = Gᵀ H
//
// Per chunk: the logits by one GEMM, then one parallel pass over the chunk's rows turning each row, in
// place and in L1, into e_t = exp(W h_t - max), then the two gradient GEMMs while the chunk is in cache. The
// softmax's 1 / Σ e_t and the one-hot are applied to the (rows, D) sides instead of the (rows, V) chunk:
//   grad_h_t = (E W)_t / Σ e_t - W[y_t],    grad_W = Eᵀ (h_t / Σ e_t) - Σ_t onehot(y_t) h_tᵀ
// which saves a pass over the chunk; the row pass replaces about ten torch ops per chunk (amax, sub, exp,
// sum, log, gather, div, an indexed subtract, ...), each a separate pass over the chunk.
// The GEMMs run on MKL (at::mm) or on oneDNN (torch's mkldnn::_linear_pointwise), as harness/model/gemm.py
// chooses for the CPU.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "vector_math.h"

namespace {

using at::Tensor;

constexpr int64_t kGrainRows = 8;

// a (M, K) · bᵀ with b (N, K), either strided -> a new (M, N) tensor, through oneDNN
Tensor onednn_linear(const Tensor& a, const Tensor& b) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, std::string_view,
                        c10::List<std::optional<at::Scalar>>, std::optional<std::string_view>)>();
  return op.call(a, b, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), "");
}

// One row of logits x (V) -> its loss term logsumexp(x) - x[target]; with `to_exp`, x becomes exp(x - max x)
// in place and *inverse_sum = 1 / Σ exp(x - max x), so that softmax(x) = x · *inverse_sum.
// NOTE: four vectors in flight in the max and sum loops: with one, each step waits on the last (4-cycle
// latency) and the row pass took as long as the chunk's GEMMs; `omp simd` reductions compiled to one.
inline double row_loss(float* __restrict x, int64_t vocab, int64_t target, bool to_exp, float* inverse_sum) {
  using vwn::load, vwn::store, vwn::vreg;
  constexpr int64_t L = vwn::kRegisterLanes;
  const int64_t whole = vocab / (4 * L) * (4 * L);
  vreg lanes[4];
  for (auto& l : lanes) l = vreg{} - std::numeric_limits<float>::infinity();
  for (int64_t v = 0; v < whole; v += 4 * L)
    for (int j = 0; j < 4; ++j) {
      const vreg block = load<vreg>(x + v + L * j);
      lanes[j] = block > lanes[j] ? block : lanes[j];
    }
  float peak = -std::numeric_limits<float>::infinity();
  for (const auto& l : lanes)
    for (int i = 0; i < L; ++i) peak = std::max(peak, l[i]);
  for (int64_t v = whole; v < vocab; ++v) peak = std::max(peak, x[v]);

  const float target_logit = x[target];
  vreg sums[4] = {};
  for (int64_t v = 0; v < whole; v += 4 * L)
    for (int j = 0; j < 4; ++j) {
      const vreg e = vwn::exp_nonpositive(load<vreg>(x + v + L * j) - peak);
      if (to_exp) store(x + v + L * j, e);
      sums[j] += e;
    }
  float sum = 0.0f;
  for (const auto& s : sums)
    for (int i = 0; i < L; ++i) sum += s[i];
  for (int64_t v = whole; v < vocab; ++v) {
    const float e = vwn::exp_nonpositive(x[v] - peak);
    if (to_exp) x[v] = e;
    sum += e;
  }
  *inverse_sum = 1.0f / sum;
  return static_cast<double>(peak) + std::log(static_cast<double>(sum)) - target_logit;
}

// hidden (N, D), weight (V, D), targets (N,) int64 -> summed loss (scalar, fp32) and, if with_grads, the
// gradients of that sum w.r.t. hidden (N, D) and weight (V, D) (else empty tensors); the GEMMs on oneDNN if
// `onednn`, else on MKL
std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy(const Tensor& hidden, const Tensor& weight,
                                                        const Tensor& targets, int64_t chunk_rows, bool with_grads,
                                                        bool onednn) {
  for (const auto& [t, name] : {std::pair{&hidden, "hidden"}, std::pair{&weight, "weight"}})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2,
                "vwn_ce: ", name, " must be a contiguous 2-D float32 CPU tensor, got ", t->sizes(), " ",
                t->scalar_type());
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.dim() == 1 &&
                  targets.size(0) == hidden.size(0),
              "vwn_ce: targets must be a contiguous int64 vector of ", hidden.size(0), " entries, got ",
              targets.sizes(), " ", targets.scalar_type());
  TORCH_CHECK(hidden.size(1) == weight.size(1), "vwn_ce: hidden has ", hidden.size(1), " columns, weight ",
              weight.size(1));
  const int64_t rows = hidden.size(0), vocab = weight.size(0);
  const int64_t* Y = targets.data_ptr<int64_t>();
  for (int64_t t = 0; t < rows; ++t)
    TORCH_CHECK(0 <= Y[t] && Y[t] < vocab, "vwn_ce: target ", Y[t], " out of range [0, ", vocab, ")");

  const int64_t dim = hidden.size(1), chunk_capacity = std::min(chunk_rows, rows);
  Tensor grad_hidden = with_grads ? at::empty_like(hidden) : at::empty({0}, hidden.options());
  // NOTE: Wᵀ's gradient, (D, V): MKL's GEMM adds hᵀ E, the chunk E the untransposed right operand, faster
  // than Eᵀ h into (V, D) (16 chunks of 128 rows, V = 4096, D = 64: 7.8-7.9 against 10.2-10.9 ms)
  Tensor grad_weight_t = with_grads ? at::zeros({dim, vocab}, weight.options()) : at::empty({0}, weight.options());
  Tensor logits = at::empty({onednn ? 0 : chunk_capacity, vocab}, hidden.options());  // oneDNN makes its own
  Tensor scaled_hidden = at::empty({chunk_capacity, dim}, hidden.options());  // h_t / Σ e_t
  std::vector<double> row_losses(rows);
  std::vector<float> inverse_sums(chunk_capacity);
  const float* H = hidden.data_ptr<float>();
  const float* W = weight.data_ptr<float>();
  for (int64_t start = 0; start < rows; start += chunk_rows) {
    const int64_t count = std::min(chunk_rows, rows - start);
    const Tensor h = hidden.narrow(0, start, count);
    Tensor chunk = onednn ? onednn_linear(h, weight) : logits.narrow(0, 0, count);
    if (!onednn) at::mm_out(chunk, h, weight.t());
    float* X = chunk.data_ptr<float>();
    at::parallel_for(0, count, kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        row_losses[start + r] = row_loss(X + r * vocab, vocab, Y[start + r], with_grads, &inverse_sums[r]);
    });
    if (!with_grads) continue;
    Tensor grad_h = grad_hidden.narrow(0, start, count);
    // E W, into grad_h (MKL) or a new tensor that the scaling pass below moves into grad_h (oneDNN)
    const Tensor product = onednn ? onednn_linear(chunk, weight.t()) : at::mm_out(grad_h, chunk, weight);
    const float* P = product.data_ptr<float>();
    float* GH = grad_h.data_ptr<float>();
    float* HS = scaled_hidden.data_ptr<float>();
    for (int64_t r = 0; r < count; ++r) {
      const float inverse = inverse_sums[r];
      const float* hr = H + (start + r) * dim;
      const float* w_target = W + Y[start + r] * dim;
#pragma omp simd
      for (int64_t c = 0; c < dim; ++c) {
        GH[r * dim + c] = P[r * dim + c] * inverse - w_target[c];
        HS[r * dim + c] = hr[c] * inverse;
      }
    }
    const Tensor scaled = scaled_hidden.narrow(0, 0, count);
    if (onednn)
      grad_weight_t.add_(onednn_linear(scaled.t(), chunk.t()));
    else
      grad_weight_t.addmm_(scaled.t(), chunk);
  }
  Tensor grad_weight = with_grads ? grad_weight_t.t().contiguous() : grad_weight_t;
  if (with_grads) {
    float* GW = grad_weight.data_ptr<float>();
    for (int64_t t = 0; t < rows; ++t) {  // - onehot(y_t) h_tᵀ, in order: targets repeat
      float* gw_target = GW + Y[t] * dim;
      const float* ht = H + t * dim;
#pragma omp simd
      for (int64_t c = 0; c < dim; ++c) gw_target[c] -= ht[c];
    }
  }
  double total = 0.0;
  for (const double term : row_losses) total += term;
  return {at::scalar_tensor(total, hidden.options()), grad_hidden, grad_weight};
}

}  // namespace

TORCH_LIBRARY(vwn_ce, lib) {
  lib.def("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor targets, int chunk_rows, bool with_grads,"
          " bool onednn) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vwn_ce, CPU, lib) { lib.impl("linear_cross_entropy", &linear_cross_entropy); }
