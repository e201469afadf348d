// Lane tiles: the layout in which the fused CPU kernels keep the GHC state, and its conversions to and from
// token-major rows (ghc.cpp's ops, and layer_norm.cpp's norm of the state's channel groups).
//
// A state of T tokens of n × d floats is held as tiles (⌈T / L⌉, n, d, L), L = kLanes, the lanes of one vector
// register: tile t holds tokens Lt .. Lt + L - 1, lane l token Lt + l, zeros past the last token. Each element
// of a tile is then one vector of L tokens' values, and per-token maths runs L tokens at a time without a
// horizontal sum. Transposing the state in and out of every GHC op took 40-50 % of the ops' time at (2, 3) and
// (2, 16); now only the ends of a stack of blocks convert.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "vector_math.h"

namespace vwn {

constexpr int64_t kLanes = kRegisterLanes;  // tokens per tile

// One stage of the kLanes x kLanes transpose on rows (x, y) = (i, i + B), i without bit B: the element in column c
// moves to the other row when bit B of c differs from the row's, which swaps bit B of row and column indices.
template <int B, std::size_t... C>
inline void exchange(vreg& x, vreg& y, std::index_sequence<C...>) {
  const vreg low = __builtin_shufflevector(x, y, ((C & B) ? kLanes + C - B : C)...);
  const vreg high = __builtin_shufflevector(x, y, ((C & B) ? kLanes + C : C + B)...);
  x = low;
  y = high;
}

// the stages B = kLanes / 2, ..., 2, 1
template <int B = kLanes / 2>
inline void transpose(vreg* rows) {
  for (int i = 0; i < kLanes; ++i)
    if (!(i & B)) exchange<B>(rows[i], rows[i + B], std::make_index_sequence<kLanes>{});
  if constexpr (B > 1) transpose<B / 2>(rows);
}

// `count` ≤ kLanes tokens' rows (row l at src + l · stride, `width` floats each) -> lanes[f][l] = row l's float f;
// lanes of missing tokens are zero (a zero state and gradient add nothing to the parameter gradients).
inline void to_lanes(const float* src, int64_t stride, int64_t count, int64_t width, vreg* lanes) {
  int64_t f0 = 0;
  if (count == kLanes) {
    for (; f0 + kLanes <= width; f0 += kLanes) {
      vreg rows[kLanes];
      for (int l = 0; l < kLanes; ++l) rows[l] = load<vreg>(src + l * stride + f0);
      transpose(rows);
      for (int c = 0; c < kLanes; ++c) lanes[f0 + c] = rows[c];
    }
  }
  for (int64_t f = f0; f < width; ++f) {
    vreg v{};
    for (int64_t l = 0; l < count; ++l) v[l] = src[l * stride + f];
    lanes[f] = v;
  }
}

// lanes[f][l] -> float f of the row of token l < count (at dst + l · stride), f < width
inline void from_lanes(const vreg* lanes, int64_t width, int64_t count, float* dst, int64_t stride) {
  int64_t f0 = 0;
  if (count == kLanes) {
    for (; f0 + kLanes <= width; f0 += kLanes) {
      vreg rows[kLanes];
      for (int c = 0; c < kLanes; ++c) rows[c] = lanes[f0 + c];
      transpose(rows);
      for (int l = 0; l < kLanes; ++l) store(dst + l * stride + f0, rows[l]);
    }
  }
  for (int64_t f = f0; f < width; ++f)
    for (int64_t l = 0; l < count; ++l) dst[l * stride + f] = lanes[f][l];
}

// t as tiles the kernels can load whole: t itself if contiguous and on a vector's boundary (every tensor torch's CPU
// allocator makes), else a copy that is (a view at an offset, which autograd or inductor may hand over); `op` and
// `name` for the error if t is not float32 lane tiles on the CPU.
inline at::Tensor as_tiles(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 && t.size(3) == kLanes, op,
              ": ", name, " must be float32 CPU lane tiles (tiles, n, d, ", kLanes, "), got ", t.sizes(), " ",
              t.scalar_type(), " on ", t.device());
  const bool aligned = reinterpret_cast<std::uintptr_t>(t.data_ptr()) % sizeof(vreg) == 0;
  return t.is_contiguous() && aligned ? t : at::empty(t.sizes(), t.options()).copy_(t);
}

// Tile `tile` of tiles (tiles, n, d, kLanes): n × d lanes
inline const vreg* tile_of(const at::Tensor& tiles, int64_t tile) {
  return reinterpret_cast<const vreg*>(tiles.data_ptr<float>()) + tile * tiles.size(1) * tiles.size(2);
}
inline vreg* tile_of(at::Tensor& tiles, int64_t tile) {
  return reinterpret_cast<vreg*>(tiles.data_ptr<float>()) + tile * tiles.size(1) * tiles.size(2);
}

}  // namespace vwn
