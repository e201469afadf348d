// Fused CPU kernels (fp32) for the SwiGLU's gate, forward and backward; the maths and the reference code are
// harness/model/moe.py's `gated_silu`.
//
//   hidden (R, 2F) = [gate | up] -> silu(gate) ∘ up (R, F),   silu(g) = g · σ(g)
//   d gate = grad ∘ up ∘ σ(g) · (1 + g · (1 − σ(g))),   d up = grad ∘ silu(g)
//
// One pass each way, the gradient written straight into its (R, 2F) tensor: the torch code's chunk, silu and
// product make five passes and a concatenation backward (~1.2 ms at 4096 rows of 128, this ~0.2 ms).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>

#include "vector_math.h"

namespace {

using at::Tensor;
using vwn::load;
using vwn::store;
using vwn::gated;
using vwn::gated_gradient;
using vwn::v8;

constexpr int64_t kGrainRows = 64;

void check_operand(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2,
              "vwn_ffn: ", name, " must be a contiguous 2-D float32 CPU tensor, got ", t.sizes(), " ",
              t.scalar_type());
}

// hidden (R, 2F) -> (R, F)
Tensor gated_silu_forward(const Tensor& hidden) {
  check_operand(hidden, "hidden");
  TORCH_CHECK(hidden.size(1) % 2 == 0, "vwn_ffn: hidden must hold [gate | up], an even width, got ", hidden.size(1));
  const int64_t rows = hidden.size(0), width = hidden.size(1) / 2;
  Tensor out = at::empty({rows, width}, hidden.options());
  const float* H = hidden.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = H + r * 2 * width;
      const float* up = gate + width;
      float* o = O + r * width;
      int64_t c = 0;
      for (; c + 8 <= width; c += 8) store(o + c, gated(load<v8>(gate + c), load<v8>(up + c)));
      for (; c < width; ++c) o[c] = gated(gate[c], up[c]);
    }
  });
  return out;
}

// gradient (R, F) of the output and hidden (R, 2F) -> gradient of hidden (R, 2F)
Tensor gated_silu_backward(const Tensor& grad, const Tensor& hidden) {
  check_operand(grad, "grad");
  check_operand(hidden, "hidden");
  const int64_t rows = hidden.size(0), width = hidden.size(1) / 2;
  TORCH_CHECK(grad.size(0) == rows && grad.size(1) == width, "vwn_ffn: grad must be (", rows, ", ", width,
              "), got ", grad.sizes());
  Tensor grad_hidden = at::empty_like(hidden);
  const float* G = grad.data_ptr<float>();
  const float* H = hidden.data_ptr<float>();
  float* GH = grad_hidden.data_ptr<float>();
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = H + r * 2 * width;
      const float* up = gate + width;
      const float* g = G + r * width;
      float* d_gate = GH + r * 2 * width;
      float* d_up = d_gate + width;
      int64_t c = 0;
      for (; c + 8 <= width; c += 8) {
        v8 dg, du;
        gated_gradient(load<v8>(gate + c), load<v8>(up + c), load<v8>(g + c), dg, du);
        store(d_gate + c, dg);
        store(d_up + c, du);
      }
      for (; c < width; ++c) gated_gradient(gate[c], up[c], g[c], d_gate[c], d_up[c]);
    }
  });
  return grad_hidden;
}

}  // namespace

TORCH_LIBRARY(vwn_ffn, lib) {
  lib.def("gated_silu_forward(Tensor hidden) -> Tensor");
  lib.def("gated_silu_backward(Tensor grad, Tensor hidden) -> Tensor");
}

TORCH_LIBRARY_IMPL(vwn_ffn, CPU, lib) {
  lib.impl("gated_silu_forward", &gated_silu_forward);
  lib.impl("gated_silu_backward", &gated_silu_backward);
}
