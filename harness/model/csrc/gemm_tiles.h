// Register-tile products for the fused kernels' small GEMMs (weight_grad.cpp, swiglu.cpp): tiles of kTileRows rows
// × two registers of columns, each row k of the right factor loaded once as two vectors and each left entry
// broadcast against them. On AVX-512 (32 registers of 16 lanes) 8 × 32: sixteen multiply-adds take two loads and
// eight broadcasts; on AVX2 (16 registers of 8 lanes) 6 × 16, twelve registers of sums, which leaves room for the
// two loads and a broadcast.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vector_math.h"

namespace vwn {

#ifdef __AVX512F__
constexpr int kTileRows = 8;
#else
constexpr int kTileRows = 6;
#endif
constexpr int64_t kTileColumns = 2 * kRegisterLanes;

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

// c (MR × L·NR, rows of stride ldc) = (accumulate ? c : 0) + Σ_{k < depth} a(r, k) b[k, 0:L·NR], b's rows of
// stride ldb, L = kRegisterLanes
template <int MR, int NR, bool Transposed>
inline void tile_product(float* __restrict c, int64_t ldc, Left<Transposed> a, const float* __restrict b,
                         int64_t ldb, int64_t depth, bool accumulate) {
  constexpr int L = kRegisterLanes;
  vreg acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = accumulate ? load<vreg>(c + r * ldc + L * j) : vreg{};
  for (int64_t k = 0; k < depth; ++k) {
    vreg bk[NR];
    for (int j = 0; j < NR; ++j) bk[j] = load<vreg>(b + k * ldb + L * j);
    for (int r = 0; r < MR; ++r) {
      const float ar = a(r, k);
      for (int j = 0; j < NR; ++j) acc[r][j] += ar * bk[j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) store(c + r * ldc + L * j, acc[r][j]);
}

// c (rows × L·NR) of the same
template <int NR, bool Transposed>
inline void column_panel(float* c, int64_t ldc, Left<Transposed> a, const float* b, int64_t ldb, int64_t rows,
                         int64_t depth, bool accumulate) {
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    tile_product<kTileRows, NR>(c + r * ldc, ldc, a.rows_from(r), b, ldb, depth, accumulate);
  for (; r + 4 <= rows; r += 4) tile_product<4, NR>(c + r * ldc, ldc, a.rows_from(r), b, ldb, depth, accumulate);
  for (; r < rows; ++r) tile_product<1, NR>(c + r * ldc, ldc, a.rows_from(r), b, ldb, depth, accumulate);
}

// c (rows × columns) = (accumulate ? c : 0) + a (rows × depth) · b (depth × columns); columns a multiple of 16
// NOTE: a panel of a tile's columns at a time through all rows, so the panel of b stays in L1 while the rows
// pass: row blocks outermost re-read all of b per block (at D = 256, 2F = 1024 an expert's W_in is 1 MB)
template <bool Transposed>
inline void block_product(float* c, int64_t ldc, Left<Transposed> a, const float* b, int64_t ldb, int64_t rows,
                          int64_t depth, int64_t columns, bool accumulate) {
  int64_t j = 0;
  for (; j + kTileColumns <= columns; j += kTileColumns)
    column_panel<2>(c + j, ldc, a, b + j, ldb, rows, depth, accumulate);
  for (; j < columns; j += kRegisterLanes) column_panel<1>(c + j, ldc, a, b + j, ldb, rows, depth, accumulate);
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
