// Fused CPU kernel (fp32) for the weight gradients of the model's linears and MoE experts: c = aᵀ b, with a
// (K, M) and b (K, N) two row-major activations of the same K token rows and c (M, N) small (M, N ≤ a few
// hundred, K in the thousands).
//
// MKL (its AVX2 code on AMD) and oneDNN both ran these shapes at 140-250 GFLOP/s on 2 cores of an AVX-512 AMD EPYC,
// where this kernel reaches 410-430 (an FMA loop peaks at 511): each thread sums its own half of the rows into
// its own c, in register tiles of 8 rows × 32 columns (16 sixteen-lane sums: one vector load of b and eight
// broadcasts of a per row k feed sixteen multiply-adds), 256 rows of a and b at a time so they stay in L2;
// the threads' c are added up at the end.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vector_math.h"

namespace {

using at::Tensor;
using vwn::load;
using vwn::store;
using vwn::v16;

constexpr int64_t kRowsPerPass = 256;

// c (MR × 16·NR, row stride n) = (first ? 0 : c) + Σ_{k < rows} a[k, 0:MR]ᵀ b[k, 0:16·NR]; a's rows have stride m,
// b's stride n
template <int MR, int NR>
inline void tile(float* __restrict c, const float* __restrict a, const float* __restrict b, int64_t rows, int64_t m,
                 int64_t n, bool first) {
  v16 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = first ? v16{} : load<v16>(c + r * n + 16 * j);
  for (int64_t k = 0; k < rows; ++k) {
    v16 bk[NR];
    for (int j = 0; j < NR; ++j) bk[j] = load<v16>(b + k * n + 16 * j);
    for (int r = 0; r < MR; ++r) {
      const float ar = a[k * m + r];
      for (int j = 0; j < NR; ++j) acc[r][j] += ar * bk[j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) store(c + r * n + 16 * j, acc[r][j]);
}

// MR rows of c, all n columns (n a multiple of 16)
template <int MR>
inline void row_block(float* c, const float* a, const float* b, int64_t rows, int64_t m, int64_t n, bool first) {
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) tile<MR, 2>(c + j, a, b + j, rows, m, n, first);
  if (j < n) tile<MR, 1>(c + j, a, b + j, rows, m, n, first);
}

// c (m × n) = a[k0:k1]ᵀ b[k0:k1]
void rows_product(float* c, const float* a, const float* b, int64_t k0, int64_t k1, int64_t m, int64_t n) {
  if (k0 == k1) {
    std::fill(c, c + m * n, 0.0f);
    return;
  }
  for (int64_t start = k0; start < k1; start += kRowsPerPass) {
    const int64_t rows = std::min(kRowsPerPass, k1 - start);
    const float* a_rows = a + start * m;
    const float* b_rows = b + start * n;
    int64_t i = 0;
    for (; i + 8 <= m; i += 8) row_block<8>(c + i * n, a_rows + i, b_rows, rows, m, n, start == k0);
    for (; i + 4 <= m; i += 4) row_block<4>(c + i * n, a_rows + i, b_rows, rows, m, n, start == k0);
    for (; i < m; ++i) row_block<1>(c + i * n, a_rows + i, b_rows, rows, m, n, start == k0);
  }
}

// a (K, M), b (K, N), contiguous fp32, N a multiple of 16 -> aᵀ b (M, N)
Tensor weight_grad(const Tensor& a, const Tensor& b) {
  for (const auto* t : {&a, &b})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2,
                "vwn_gemm: operands must be contiguous 2-D float32 CPU tensors, got ", t->sizes(), " ",
                t->scalar_type());
  TORCH_CHECK(a.size(0) == b.size(0) && b.size(1) % 16 == 0, "vwn_gemm: aᵀ b needs equal rows and b's columns a ",
              "multiple of 16, got ", a.sizes(), " and ", b.sizes());
  const int64_t K = a.size(0), M = a.size(1), N = b.size(1);
  const int64_t threads = at::get_num_threads();
  Tensor out = at::empty({M, N}, a.options());
  std::vector<float> others((threads - 1) * M * N);  // the other threads' sums; thread 0 writes out
  const float* A = a.data_ptr<float>();
  const float* B = b.data_ptr<float>();
  float* C = out.data_ptr<float>();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      rows_product(t == 0 ? C : others.data() + (t - 1) * M * N, A, B, K * t / threads, K * (t + 1) / threads, M, N);
  });
  for (int64_t t = 1; t < threads; ++t) {
    const float* sums = others.data() + (t - 1) * M * N;
#pragma omp simd
    for (int64_t i = 0; i < M * N; ++i) C[i] += sums[i];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(vwn_gemm, lib) { lib.def("weight_grad(Tensor a, Tensor b) -> Tensor"); }

TORCH_LIBRARY_IMPL(vwn_gemm, CPU, lib) { lib.impl("weight_grad", &weight_grad); }
