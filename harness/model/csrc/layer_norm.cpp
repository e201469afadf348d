// Fused CPU kernels (fp32) for a layer norm without affine over the last dimension, forward and backward: the
// reduce head's GroupNorm (a layer norm over each group of D channels, its affine folded into the reduce); the
// maths and the reference code are harness/model/norm.py's `layer_norm` (F.layer_norm).
//
//   y = (x − mean(x)) · rstd,  rstd = 1 / √(var(x) + ε)                          per row of G
//   dx = rstd · (g − mean(g) − y ∘ mean(g ∘ y))
//
// torch's CPU kernels take ~50 ns per row of 64 around their arithmetic (a (2048, 4, 64) state: 0.5 ms forward);
// the backward here reads y and rstd, not x and the mean, so it needs no second pass to rebuild y.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "lane_tiles.h"

namespace {

using at::Tensor;

using vwn::kLanes;

constexpr int64_t kGrainRows = 256;
constexpr int64_t kGrainTiles = 32;

void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2,
              "vwn_layer_norm: ", name, " must be a contiguous 2-D float32 CPU tensor, got ", t.sizes(), " ",
              t.scalar_type());
}

// One row x (width) -> its normalised y; returns its rstd
inline float normalize_row(const float* __restrict x, float* __restrict y, int64_t width, float epsilon) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < width; ++c) sum += x[c];
  const float mean = sum / width;
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t c = 0; c < width; ++c) squares += (x[c] - mean) * (x[c] - mean);
  const float rstd = 1.0f / std::sqrt(squares / width + epsilon);
#pragma omp simd
  for (int64_t c = 0; c < width; ++c) y[c] = (x[c] - mean) * rstd;
  return rstd;
}

// One row's gradient g of y, its y and rstd -> the gradient of its x
inline void row_gradient(const float* __restrict g, const float* __restrict y, float rstd, float* __restrict grad_x,
                         int64_t width) {
  float sum = 0.0f, dot = 0.0f;
#pragma omp simd reduction(+ : sum, dot)
  for (int64_t c = 0; c < width; ++c) {
    sum += g[c];
    dot += g[c] * y[c];
  }
  const float mean = sum / width, mean_dot = dot / width;
#pragma omp simd
  for (int64_t c = 0; c < width; ++c) grad_x[c] = rstd * (g[c] - mean - y[c] * mean_dot);
}

// x (R, G) -> y (R, G), rstd (R,)
std::tuple<Tensor, Tensor> layer_norm_forward(const Tensor& x, double eps) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), width = x.size(1);
  Tensor y = at::empty_like(x);
  Tensor rstd = at::empty({rows}, x.options());
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  float* R = rstd.data_ptr<float>();
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      R[row] = normalize_row(X + row * width, Y + row * width, width, static_cast<float>(eps));
  });
  return {y, rstd};
}

void check_backward_operands(const Tensor& grad, const Tensor& y, const Tensor& rstd) {
  check_rows(grad, "grad");
  check_rows(y, "y");
  TORCH_CHECK(grad.sizes() == y.sizes() && rstd.is_contiguous() && rstd.numel() % std::max<int64_t>(1, y.size(0)) == 0,
              "vwn_layer_norm: grad must be shaped like y ", y.sizes(), " and rstd hold as many entries per row, got ",
              grad.sizes(), " and ", rstd.sizes());
}

// gradient g (R, G) of y, and y, rstd of the forward -> gradient of x (R, G)
Tensor layer_norm_backward(const Tensor& grad, const Tensor& y, const Tensor& rstd) {
  check_backward_operands(grad, y, rstd);
  TORCH_CHECK(rstd.numel() == y.size(0), "vwn_layer_norm: ", y.size(0), " rows with ", rstd.numel(), " rstd");
  const int64_t rows = y.size(0), width = y.size(1);
  Tensor grad_x = at::empty_like(y);
  const float *G = grad.data_ptr<float>(), *Y = y.data_ptr<float>(), *R = rstd.data_ptr<float>();
  float* GX = grad_x.data_ptr<float>();
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      row_gradient(G + row * width, Y + row * width, R[row], GX + row * width, width);
  });
  return grad_x;
}

// ---- the GHC state's channel groups, from and to its lane tiles (lane_tiles.h) ----
// NOTE: the untiling and the norm in one pass each way: the state's rows are made a tile at a time in cache, where
// untiling it first wrote them out and the norm read them back (the gradient likewise, tiled after the norm's
// backward).

// The lane tiles (⌈T / kLanes⌉, n, d, kLanes) of T tokens -> each token's n·d channels layer-normalised in `groups`
// groups, y (T, n·d), and rstd (T · groups)
std::tuple<Tensor, Tensor> tiles_layer_norm_forward(const Tensor& tiles_arg, int64_t tokens, int64_t groups,
                                                    double eps) {
  const Tensor tiles = vwn::as_tiles(tiles_arg, "vwn_layer_norm", "tiles");
  const int64_t width = tiles.size(1) * tiles.size(2);
  TORCH_CHECK((tokens + kLanes - 1) / kLanes == tiles.size(0) && groups > 0 && width % groups == 0,
              "vwn_layer_norm: ", tokens, " tokens in ", groups, " groups for tiles of ", tiles.sizes());
  const int64_t group = width / groups;
  Tensor y = at::empty({tokens, width}, tiles.options());
  Tensor rstd = at::empty({tokens * groups}, tiles.options());
  float *Y = y.data_ptr<float>(), *R = rstd.data_ptr<float>();
  at::parallel_for(0, tiles.size(0), kGrainTiles, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(kLanes * width);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * kLanes, count = std::min(kLanes, tokens - t0);
      vwn::from_lanes(vwn::tile_of(tiles, tile), width, count, rows.data(), width);
      for (int64_t r = 0; r < count * groups; ++r)  // group r % groups of token t0 + r / groups
        R[t0 * groups + r] = normalize_row(rows.data() + r * group, Y + t0 * width + r * group, group,
                                           static_cast<float>(eps));
    }
  });
  return {y, rstd};
}

// gradient g (T, n·d) of y, and y, rstd of tiles_layer_norm_forward -> gradient of its tiles, n = `slots`
Tensor tiles_layer_norm_backward(const Tensor& grad, const Tensor& y, const Tensor& rstd, int64_t slots) {
  check_backward_operands(grad, y, rstd);
  const int64_t tokens = y.size(0), width = y.size(1), groups = tokens ? rstd.numel() / tokens : 1;
  TORCH_CHECK(slots > 0 && width % slots == 0 && width % groups == 0, "vwn_layer_norm: ", width,
              " channels in ", slots, " slots and ", groups, " groups");
  const int64_t group = width / groups;
  Tensor grad_tiles = at::empty({(tokens + kLanes - 1) / kLanes, slots, width / slots, kLanes}, y.options());
  const float *G = grad.data_ptr<float>(), *Y = y.data_ptr<float>(), *R = rstd.data_ptr<float>();
  at::parallel_for(0, grad_tiles.size(0), kGrainTiles, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(kLanes * width);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * kLanes, count = std::min(kLanes, tokens - t0);
      for (int64_t r = 0; r < count * groups; ++r)
        row_gradient(G + t0 * width + r * group, Y + t0 * width + r * group, R[t0 * groups + r],
                     rows.data() + r * group, group);
      vwn::to_lanes(rows.data(), width, count, width, vwn::tile_of(grad_tiles, tile));  // zero past the last token
    }
  });
  return grad_tiles;
}

}  // namespace

TORCH_LIBRARY(vwn_layer_norm, lib) {
  lib.def("layer_norm_forward(Tensor x, float eps) -> (Tensor, Tensor)");
  lib.def("layer_norm_backward(Tensor grad, Tensor y, Tensor rstd) -> Tensor");
  lib.def("tiles_layer_norm_forward(Tensor tiles, int tokens, int groups, float eps) -> (Tensor, Tensor)");
  lib.def("tiles_layer_norm_backward(Tensor grad, Tensor y, Tensor rstd, int slots) -> Tensor");
}

TORCH_LIBRARY_IMPL(vwn_layer_norm, CPU, lib) {
  lib.impl("layer_norm_forward", &layer_norm_forward);
  lib.impl("layer_norm_backward", &layer_norm_backward);
  lib.impl("tiles_layer_norm_forward", &tiles_layer_norm_forward);
  lib.impl("tiles_layer_norm_backward", &tiles_layer_norm_backward);
}
