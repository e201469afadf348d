// Fused CPU kernel (fp32) for the weight gradients of the model's linears and MoE experts: c = aᵀ b, with a
// (K, M) and b (K, N) two row-major activations of the same K token rows and c (M, N) small (M, N ≤ a few
// hundred, K in the thousands).
//
// MKL (its AVX2 code on AMD) and oneDNN both ran these shapes at 140-250 GFLOP/s on 2 cores of an AVX-512 AMD EPYC,
// where this kernel reaches 410-430 (an FMA loop peaks at 511): each thread sums its own half of the rows into
// its own c, in the register tiles of gemm_tiles.h, 256 rows of a and b at a time so they stay in L2; the
// threads' c are added up at the end.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "gemm_tiles.h"

namespace {

using at::Tensor;

// a (K, M), b (K, N), contiguous fp32, N a multiple of 16 -> aᵀ b (M, N)
Tensor weight_grad(const Tensor& a, const Tensor& b) {
  for (const auto* t : {&a, &b})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2,
                "vwn_gemm: operands must be contiguous 2-D float32 CPU tensors, got ", t->sizes(), " ",
                t->scalar_type());
  TORCH_CHECK(a.size(0) == b.size(0) && b.size(1) % 16 == 0, "vwn_gemm: aᵀ b needs equal rows and b's columns a ",
              "multiple of 16, got ", a.sizes(), " and ", b.sizes());
  Tensor out = at::empty({a.size(1), b.size(1)}, a.options());
  vwn::transposed_product(out.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(), a.size(0), a.size(1),
                          b.size(1));
  return out;
}

}  // namespace

TORCH_LIBRARY(vwn_gemm, lib) { lib.def("weight_grad(Tensor a, Tensor b) -> Tensor"); }

TORCH_LIBRARY_IMPL(vwn_gemm, CPU, lib) { lib.impl("weight_grad", &weight_grad); }
