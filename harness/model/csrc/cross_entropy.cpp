// Fused CPU kernel (fp32) for the cross-entropy of a linear LM head, computed a chunk of rows at a time; the
// maths and the reference code are harness/model/loss.py's.
//
//   loss = Σ_t [ logsumexp(W h_t) - (W h_t)[y_t] ]            h (N, D), W (V, D), y (N,)
//   with gradients:  g_t = softmax(W h_t) - onehot(y_t),  grad_h = G W,  grad_W = Gᵀ H
//
// Per chunk: the logits by one GEMM, then one parallel pass over the chunk's rows turning each row, in
// place and in L1, into its gradient (max, exp and sum, scale, minus one at the target), then the two
// gradient GEMMs while the chunk is in cache. The pass replaces about ten torch ops per chunk (amax, sub,
// exp, sum, log, gather, div, an indexed subtract, ...), each a separate pass over the chunk.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros_like.h>
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

// One row of logits x (V) -> its loss term logsumexp(x) - x[target]; with `to_gradient`, x becomes
// softmax(x) - onehot(target) in place.
// NOTE: four vectors in flight in the max and sum loops: with one, each step waits on the last (4-cycle
// latency) and the row pass took as long as the chunk's GEMMs; `omp simd` reductions compiled to one.
inline double row_loss(float* __restrict x, int64_t vocab, int64_t target, bool to_gradient) {
  using vwn::load8, vwn::store8, vwn::v8;
  const int64_t whole = vocab / 32 * 32;
  v8 lanes[4];
  for (auto& l : lanes) l = v8{} - std::numeric_limits<float>::infinity();
  for (int64_t v = 0; v < whole; v += 32)
    for (int j = 0; j < 4; ++j) {
      const v8 block = load8(x + v + 8 * j);
      lanes[j] = block > lanes[j] ? block : lanes[j];
    }
  float peak = -std::numeric_limits<float>::infinity();
  for (const auto& l : lanes)
    for (int i = 0; i < 8; ++i) peak = std::max(peak, l[i]);
  for (int64_t v = whole; v < vocab; ++v) peak = std::max(peak, x[v]);

  const float target_logit = x[target];
  v8 sums[4] = {};
  for (int64_t v = 0; v < whole; v += 32)
    for (int j = 0; j < 4; ++j) {
      const v8 e = vwn::exp_nonpositive(load8(x + v + 8 * j) - peak);
      if (to_gradient) store8(x + v + 8 * j, e);
      sums[j] += e;
    }
  float sum = 0.0f;
  for (const auto& s : sums)
    for (int i = 0; i < 8; ++i) sum += s[i];
  for (int64_t v = whole; v < vocab; ++v) {
    const float e = vwn::exp_nonpositive(x[v] - peak);
    if (to_gradient) x[v] = e;
    sum += e;
  }
  if (to_gradient) {
    const float inverse = 1.0f / sum;
#pragma omp simd
    for (int64_t v = 0; v < vocab; ++v) x[v] *= inverse;
    x[target] -= 1.0f;
  }
  return static_cast<double>(peak) + std::log(static_cast<double>(sum)) - target_logit;
}

// hidden (N, D), weight (V, D), targets (N,) int64 -> summed loss (scalar, fp32) and, if with_grads, the
// gradients of that sum w.r.t. hidden (N, D) and weight (V, D) (else empty tensors)
std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy(const Tensor& hidden, const Tensor& weight,
                                                        const Tensor& targets, int64_t chunk_rows, bool with_grads) {
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

  Tensor grad_hidden = with_grads ? at::empty_like(hidden) : at::empty({0}, hidden.options());
  Tensor grad_weight = with_grads ? at::zeros_like(weight) : at::empty({0}, weight.options());
  Tensor logits = at::empty({std::min(chunk_rows, rows), vocab}, hidden.options());
  std::vector<double> row_losses(rows);
  for (int64_t start = 0; start < rows; start += chunk_rows) {
    const int64_t count = std::min(chunk_rows, rows - start);
    const Tensor h = hidden.narrow(0, start, count);
    Tensor chunk = logits.narrow(0, 0, count);
    at::mm_out(chunk, h, weight.t());
    float* X = chunk.data_ptr<float>();
    at::parallel_for(0, count, kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        row_losses[start + r] = row_loss(X + r * vocab, vocab, Y[start + r], with_grads);
    });
    if (with_grads) {
      Tensor grad_h = grad_hidden.narrow(0, start, count);
      at::mm_out(grad_h, chunk, weight);
      grad_weight.addmm_(chunk.t(), h);
    }
  }
  double total = 0.0;
  for (const double term : row_losses) total += term;
  return {at::scalar_tensor(total, hidden.options()), grad_hidden, grad_weight};
}

}  // namespace

TORCH_LIBRARY(vwn_ce, lib) {
  lib.def("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor targets, int chunk_rows, bool with_grads)"
          " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vwn_ce, CPU, lib) { lib.impl("linear_cross_entropy", &linear_cross_entropy); }
