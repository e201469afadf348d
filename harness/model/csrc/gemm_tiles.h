// Register-tile products in sixteen-lane vectors for the fused kernels' small GEMMs (weight_grad.cpp,
// swiglu.cpp): tiles of 8 rows × 32 columns, 16 sums in flight, each row k of the right factor loaded once as
// two vectors and each left entry broadcast, so sixteen multiply-adds take two loads and eight broadcasts.
// Sized for AVX-512's 32 registers (on AVX2 each vector is two registers and the tiles spill).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vector_math.h"

namespace vwn {

// The left factor of a product: a row-major (R, K) matrix (Transposed = false; entry (r, k) at
// data[r * stride + k]) or the transpose of a row-major (K, R) one (true; at data[k * stride + r]). The layout
// is a template parameter: with both strides at run time the tiles ran 25-30 % slower (address arithmetic per
// broadcast).
template <bool Transposed>
struct Left {
  const float* data;
  int64_t stride;
  float operator()(int64_t r, int64_t k) const { return Transposed ? data[k * stride + r] : data[r * stride + k]; }
  Left rows_from(int64_t r) const { return {Transposed ? data + r : data + r * stride, stride}; }
};

// c (MR × 16·NR, rows of stride ldc) = (accumulate ? c : 0) + Σ_{k < depth} a(r, k) b[k, 0:16·NR], b's rows of
// stride ldb
template <int MR, int NR, bool Transposed>
inline void tile_product(float* __restrict c, int64_t ldc, Left<Transposed> a, const float* __restrict b,
                         int64_t ldb, int64_t depth, bool accumulate) {
  v16 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = accumulate ? load<v16>(c + r * ldc + 16 * j) : v16{};
  for (int64_t k = 0; k < depth; ++k) {
    v16 bk[NR];
    for (int j = 0; j < NR; ++j) bk[j] = load<v16>(b + k * ldb + 16 * j);
    for (int r = 0; r < MR; ++r) {
      const float ar = a(r, k);
      for (int j = 0; j < NR; ++j) acc[r][j] += ar * bk[j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) store(c + r * ldc + 16 * j, acc[r][j]);
}

// c (rows × 16·NR) of the same
template <int NR, bool Transposed>
inline void column_panel(float* c, int64_t ldc, Left<Transposed> a, const float* b, int64_t ldb, int64_t rows,
                         int64_t depth, bool accumulate) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) tile_product<8, NR>(c + r * ldc, ldc, a.rows_from(r), b, ldb, depth, accumulate);
  for (; r + 4 <= rows; r += 4) tile_product<4, NR>(c + r * ldc, ldc, a.rows_from(r), b, ldb, depth, accumulate);
  for (; r < rows; ++r) tile_product<1, NR>(c + r * ldc, ldc, a.rows_from(r), b, ldb, depth, accumulate);
}

// c (rows × columns) = (accumulate ? c : 0) + a (rows × depth) · b (depth × columns); columns a multiple of 16
// NOTE: a panel of 32 columns at a time through all rows, so the panel of b (depth × 32) stays in L1 while the
// rows pass: row blocks outermost re-read all of b per block (at D = 256, 2F = 1024 an expert's W_in is 1 MB)
template <bool Transposed>
inline void block_product(float* c, int64_t ldc, Left<Transposed> a, const float* b, int64_t ldb, int64_t rows,
                          int64_t depth, int64_t columns, bool accumulate) {
  int64_t j = 0;
  for (; j + 32 <= columns; j += 32) column_panel<2>(c + j, ldc, a, b + j, ldb, rows, depth, accumulate);
  if (j < columns) column_panel<1>(c + j, ldc, a, b + j, ldb, rows, depth, accumulate);
}

constexpr int64_t kDepthPerPass = 256;  // rows of a and b per pass of the tiles, so both stay in L2

// c (M × N) = a[k0:k1]ᵀ b[k0:k1], a (K, M) and b (K, N) row-major, in one thread
inline void transposed_product_range(float* c, const float* a, const float* b, int64_t k0, int64_t k1, int64_t m,
                                     int64_t n) {
  if (k0 == k1) {
    std::fill(c, c + m * n, 0.0f);
    return;
  }
  for (int64_t start = k0; start < k1; start += kDepthPerPass) {
    const Left<true> columns_of_a{a + start * m, m};
    block_product(c, n, columns_of_a, b + start * n, n, m, std::min(kDepthPerPass, k1 - start), n, start != k0);
  }
}

// c (M × N) = aᵀ b, a (K, M) and b (K, N) row-major: each thread sums its share of the K rows into its own c,
// added up at the end
inline void transposed_product(float* c, const float* a, const float* b, int64_t k, int64_t m, int64_t n) {
  const int64_t threads = at::get_num_threads();
  std::vector<float> others((threads - 1) * m * n);  // the other threads' sums; thread 0 writes c
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      transposed_product_range(t == 0 ? c : others.data() + (t - 1) * m * n, a, b, k * t / threads,
                               k * (t + 1) / threads, m, n);
  });
  for (int64_t t = 1; t < threads; ++t) {
    const float* sums = others.data() + (t - 1) * m * n;
#pragma omp simd
    for (int64_t i = 0; i < m * n; ++i) c[i] += sums[i];
  }
}

}  // namespace vwn
