// Fused CPU kernels (fp32) for causal self-attention with rotary positions, forward and backward, for the
// small head widths of this project's models; the maths and the reference code are harness/model/
// transformer.py's (`apply_rotary`, then scaled_dot_product_attention with is_causal).
//
// B batch, T positions, H heads of width hd (a multiple of 8), D = H·hd; the vectors are sixteen lanes on AVX-512
// when hd is a multiple of 16, else eight. One (batch, head) pair at a time per
// thread, all of it in L1/L2 (T = 128, hd = 16: q, k, v and their gradients are 8 KB each):
//   rot(x)[c] = x[c] · cos[t, c] + x[(c + hd/2) mod hd] · sin[t, c]     (tables [cos | cos], [-sin | sin])
//   q' = rot(q) / √hd,  k' = rot(k);   s_ij = q'_i · k'_j (j ≤ i),  p_ij = exp(s_ij − lse_i),  o_i = Σ_j p_ij v_j
//   backward:  dp_ij = do_i · v_j,  ds_ij = p_ij (dp_ij − do_i · o_i),
//              dq'_i = Σ_j ds_ij k'_j,  dk'_j = Σ_i ds_ij q'_i,  dv_j = Σ_i p_ij do_i,  then rot's transpose
// It reads q, k and v straight from the qkv projection's (B, T, 3D) output and writes (B, T, D), where torch's
// path made the heads contiguous, rotated with a roll, ran its flash kernel (built for wide heads: ~2 ms per
// layer at T = 128, hd = 16) and transposed back.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "vector_math.h"

namespace {

using at::Tensor;
using vwn::load;
using vwn::store;
using vwn::v16;
using vwn::v8;

template <typename V>
constexpr int64_t kLanes = sizeof(V) / sizeof(float);

// count rounded up to whole vectors of V
template <typename V>
constexpr int64_t whole(int64_t count) {
  return (count + kLanes<V> - 1) / kLanes<V> * kLanes<V>;
}

struct Shape {
  int64_t batch, positions, heads, head_width, width;  // B, T, H, hd, D
  Shape(const Tensor& qkv, int64_t heads)
      : batch(qkv.size(0)), positions(qkv.size(1)), heads(heads), head_width(qkv.size(2) / 3 / heads),
        width(qkv.size(2) / 3) {}
};

void check_operands(const Tensor& qkv, const Tensor& cos, const Tensor& sin, int64_t heads) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.is_contiguous() && qkv.dim() == 3,
              "vwn_attn: qkv must be a contiguous (B, T, 3D) float32 CPU tensor, got ", qkv.sizes(), " ",
              qkv.scalar_type());
  TORCH_CHECK(heads > 0 && qkv.size(2) % (3 * heads) == 0 && qkv.size(2) / (3 * heads) % 8 == 0,
              "vwn_attn: 3D = ", qkv.size(2), " must split into 3 x ", heads, " heads of a multiple of 8");
  const int64_t head_width = qkv.size(2) / (3 * heads);
  for (const Tensor* table : {&cos, &sin})
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->is_contiguous() && table->dim() == 2 &&
                    table->size(0) >= qkv.size(1) && table->size(1) == head_width,
                "vwn_attn: rotary tables must be contiguous float32 (>= ", qkv.size(1), ", ", head_width, "), got ",
                table->sizes());
}

// One (batch, head) pair's rotated and scaled queries q' (T, hd), rotated keys k' by row (T, hd) and by column
// (hd, P), values by row (T, hd) and by column (hd, P); P = T rounded up to whole sixteen-lane vectors, the
// columns past T zero (never written), so score rows can be computed a vector at a time.
struct PairBuffers {
  int64_t positions, padded, head_width;
  std::vector<float> q, k, k_t, v, v_t;
  PairBuffers(int64_t positions, int64_t head_width)
      : positions(positions), padded(whole<v16>(positions)), head_width(head_width),
        q(positions * head_width), k(positions * head_width), k_t(head_width * padded, 0.0f),
        v(positions * head_width), v_t(head_width * padded, 0.0f) {}

  void load(const float* qkv, const float* cos, const float* sin, const Shape& s, int64_t b, int64_t h) {
    const int64_t hd = head_width, half = hd / 2;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    for (int64_t t = 0; t < positions; ++t) {
      const float* row = qkv + (b * positions + t) * 3 * s.width + h * hd;
      const float* c = cos + t * hd;
      const float* sn = sin + t * hd;
      const float *qi = row, *ki = row + s.width, *vi = row + 2 * s.width;
      float *qo = &q[t * hd], *ko = &k[t * hd], *vo = &v[t * hd];
      // the partner of column c is c + hd/2 in the first half, c - hd/2 in the second
      for (int64_t i = 0; i < half; ++i) {
        qo[i] = scale * (qi[i] * c[i] + qi[i + half] * sn[i]);
        qo[i + half] = scale * (qi[i + half] * c[i + half] + qi[i] * sn[i + half]);
        ko[i] = ki[i] * c[i] + ki[i + half] * sn[i];
        ko[i + half] = ki[i + half] * c[i + half] + ki[i] * sn[i + half];
      }
      for (int64_t i = 0; i < hd; ++i) {
        vo[i] = vi[i];
        k_t[i * padded + t] = ko[i];
        v_t[i * padded + t] = vi[i];
      }
    }
  }
};

// The kernels below take query rows a block of R at a time (R = kBlock, then single rows for the last
// T mod kBlock), so every key, value and gradient row loaded serves R rows: row at a time, the value products
// loaded two operands per multiply-add, the key / value gradient updates stored one vector per multiply-add,
// and a scalar max over each row of scores took as long as its products (tiny layer, 2 threads, 30
// alternations: forward 1.54 -> 1.13 ms, backward 3.59 -> 2.22 ms, at R = 4 in eight lanes).
// NOTE: eight rows, not four, since sixteen-lane vectors (2 x 8 sums in flight fill half the AVX-512
// registers): against four rows of eight lanes, tiny layer 40 alternations, forward x0.75, backward x0.65;
// sixteen rows gained nothing more there (the causal blocks compute more masked scores)
constexpr int kBlock = 8;

// out (R × P) = scores of R rows q (R × hd) against the keys' columns k_t (hd × P), columns [0, count),
// count a multiple of V's lanes: out[r, j] = Σ_c q[r, c] k_t[c, j]
// NOTE: two vectors of keys per pass, so 2R independent sums are in flight (R alone left the multiply-adds
// waiting on their own latency)
template <typename V, int R>
inline void block_scores(float* __restrict out, const float* __restrict q, const float* __restrict k_t, int64_t hd,
                         int64_t padded, int64_t count) {
  constexpr int64_t L = kLanes<V>;
  int64_t j = 0;
  for (; j + 2 * L <= count; j += 2 * L) {
    V acc[R][2] = {};
    for (int64_t c = 0; c < hd; ++c) {
      const V k0 = load<V>(k_t + c * padded + j), k1 = load<V>(k_t + c * padded + j + L);
      for (int r = 0; r < R; ++r) {
        acc[r][0] += q[r * hd + c] * k0;
        acc[r][1] += q[r * hd + c] * k1;
      }
    }
    for (int r = 0; r < R; ++r) {
      store(out + r * padded + j, acc[r][0]);
      store(out + r * padded + j + L, acc[r][1]);
    }
  }
  if (j < count) {
    V acc[R] = {};
    for (int64_t c = 0; c < hd; ++c) {
      const V k0 = load<V>(k_t + c * padded + j);
      for (int r = 0; r < R; ++r) acc[r] += q[r * hd + c] * k0;
    }
    for (int r = 0; r < R; ++r) store(out + r * padded + j, acc[r]);
  }
}

// out (R × hd) = w (R × P) times rows (count × hd): out[r] = Σ_{j < count} w[r, j] rows[j]
template <typename V, int R>
inline void block_weighted_rows(float* __restrict out, const float* __restrict w, int64_t padded,
                                const float* __restrict rows, int64_t count, int64_t hd) {
  for (int64_t c = 0; c < hd; c += kLanes<V>) {
    V acc[R][2] = {};  // even and odd rows apart: 2R sums in flight
    int64_t j = 0;
    for (; j + 2 <= count; j += 2) {
      const V v0 = load<V>(rows + j * hd + c), v1 = load<V>(rows + (j + 1) * hd + c);
      for (int r = 0; r < R; ++r) {
        acc[r][0] += w[r * padded + j] * v0;
        acc[r][1] += w[r * padded + j + 1] * v1;
      }
    }
    if (j < count) {
      const V v0 = load<V>(rows + j * hd + c);
      for (int r = 0; r < R; ++r) acc[r][0] += w[r * padded + j] * v0;
    }
    for (int r = 0; r < R; ++r) store(out + r * hd + c, acc[r][0] + acc[r][1]);
  }
}

// rows[j] += Σ_r w[r, j] x[r] for j < count (rows: count × hd, w: R × P, x: R × hd)
template <typename V, int R>
inline void block_add_outer(float* __restrict rows, const float* __restrict w, int64_t padded,
                            const float* __restrict x, int64_t count, int64_t hd) {
  for (int64_t c = 0; c < hd; c += kLanes<V>) {
    V xr[R];
    for (int r = 0; r < R; ++r) xr[r] = load<V>(x + r * hd + c);
    for (int64_t j = 0; j < count; ++j) {
      V acc = load<V>(rows + j * hd + c);
      for (int r = 0; r < R; ++r) acc += w[r * padded + j] * xr[r];
      store(rows + j * hd + c, acc);
    }
  }
}

// The largest of x[0, count)
template <typename V>
inline float row_max(const float* __restrict x, int64_t count) {
  constexpr int64_t L = kLanes<V>;
  V lanes = V{} - std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + L <= count; j += L) {
    const V block = load<V>(x + j);
    lanes = block > lanes ? block : lanes;
  }
  float peak = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < L; ++i) peak = std::max(peak, lanes[i]);
  for (; j < count; ++j) peak = std::max(peak, x[j]);
  return peak;
}

// x[j] = exp(x[j] - shift) for j < valid (x[j] <= shift there), 0 for valid <= j < count (count a multiple of
// V's lanes: the masked scores, later keys and the padding); returns the sum
template <typename V>
inline float exp_row(float* __restrict x, float shift, int64_t valid, int64_t count) {
  constexpr int64_t L = kLanes<V>;
  for (int64_t j = valid; j < count; ++j) x[j] = -std::numeric_limits<float>::infinity();
  V sums[2] = {};
  for (int64_t j = 0; j < count; j += L) {
    const V e = vwn::exp_nonpositive(load<V>(x + j) - shift);
    store(x + j, e);
    sums[(j / L) % 2] += e;
  }
  // NOTE: exp_nonpositive of -inf is exp(-86) ≈ 4e-38, not 0: zeroed here; the at most 10 of them in the sum
  // are far below its last bit (the sum is at least 1 in the forward, unused in the backward)
  for (int64_t j = valid; j < count; ++j) x[j] = 0.0f;
  float sum = 0.0f;
  for (int i = 0; i < L; ++i) sum += sums[0][i] + sums[1][i];
  return sum;
}

// One (batch, head) pair's forward for query rows [i0, i0 + R): y rows and their logsumexp.
// scores (R × P) and out (R × hd) are workspace.
template <typename V, int R>
void forward_block(const PairBuffers& pair, float* __restrict scores, float* __restrict out, int64_t i0,
                   float* __restrict y_rows, int64_t y_stride, float* __restrict lse) {
  const int64_t hd = pair.head_width, P = pair.padded, count = whole<V>(i0 + R);
  block_scores<V, R>(scores, &pair.q[i0 * hd], pair.k_t.data(), hd, P, count);
  float inverse[R];
  for (int r = 0; r < R; ++r) {
    const int64_t valid = i0 + r + 1;
    const float peak = row_max<V>(scores + r * P, valid);
    const float total = exp_row<V>(scores + r * P, peak, valid, count);
    inverse[r] = 1.0f / total;
    lse[i0 + r] = peak + std::log(total);
  }
  block_weighted_rows<V, R>(out, scores, P, pair.v.data(), i0 + R, hd);
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < hd; ++c) y_rows[(i0 + r) * y_stride + c] = out[r * hd + c] * inverse[r];
}

// qkv (B, T, 3D), rotary tables (T, hd) -> y (B, T, D), logsumexp of each query's scores (B, H, T); vectors V
template <typename V>
std::tuple<Tensor, Tensor> forward_with(const Tensor& qkv, const Tensor& cos, const Tensor& sin, int64_t heads) {
  const Shape s(qkv, heads);
  const int64_t T = s.positions, hd = s.head_width;
  Tensor y = at::empty({s.batch, T, s.width}, qkv.options());
  Tensor lse = at::empty({s.batch, heads, T}, qkv.options());
  const float* QKV = qkv.data_ptr<float>();
  const float* COS = cos.data_ptr<float>();
  const float* SIN = sin.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  float* LSE = lse.data_ptr<float>();
  at::parallel_for(0, s.batch * heads, 1, [&](int64_t begin, int64_t end) {
    PairBuffers pair(T, hd);
    std::vector<float> scores(kBlock * pair.padded), out(kBlock * hd);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / heads, h = index % heads;
      pair.load(QKV, COS, SIN, s, b, h);
      float* y_rows = Y + b * T * s.width + h * hd;
      float* lse_rows = LSE + index * T;
      int64_t i0 = 0;
      for (; i0 + kBlock <= T; i0 += kBlock)
        forward_block<V, kBlock>(pair, scores.data(), out.data(), i0, y_rows, s.width, lse_rows);
      for (; i0 < T; ++i0) forward_block<V, 1>(pair, scores.data(), out.data(), i0, y_rows, s.width, lse_rows);
    }
  });
  return {y, lse};
}

// Sixteen lanes where the CPU has AVX-512 registers and they divide the head width; else eight
bool sixteen_lanes(int64_t head_width) {
#ifdef __AVX512F__
  return head_width % 16 == 0;
#else
  return false;
#endif
}

std::tuple<Tensor, Tensor> attention_forward(const Tensor& qkv, const Tensor& cos, const Tensor& sin, int64_t heads) {
  check_operands(qkv, cos, sin, heads);
  return sixteen_lanes(Shape(qkv, heads).head_width) ? forward_with<v16>(qkv, cos, sin, heads)
                                                     : forward_with<v8>(qkv, cos, sin, heads);
}

// Per-thread workspace of the backward: R rows of scores and of their gradients, the R rows' output gradient,
// and the pair's gradients of q', k' and v (T × hd each).
struct BackwardBuffers {
  std::vector<float> p, ds, grad_out, dq, dk, dv;
  BackwardBuffers(const PairBuffers& pair)
      : p(kBlock * pair.padded), ds(kBlock * pair.padded), grad_out(kBlock * pair.head_width),
        dq(pair.positions * pair.head_width), dk(pair.positions * pair.head_width),
        dv(pair.positions * pair.head_width) {}
};

// One pair's backward for query rows [i0, i0 + R): dq' of those rows, and their terms of dk' and dv.
template <typename V, int R>
void backward_block(const PairBuffers& pair, BackwardBuffers& work, int64_t i0, const float* __restrict dy_rows,
                    const float* __restrict y_rows, int64_t stride, const float* __restrict lse) {
  const int64_t hd = pair.head_width, P = pair.padded, keys = i0 + R, count = whole<V>(keys);
  float* __restrict grad_out = work.grad_out.data();
  float do_dot_o[R];
  for (int r = 0; r < R; ++r) {
    const float* dyi = dy_rows + (i0 + r) * stride;
    const float* yi = y_rows + (i0 + r) * stride;
    float dot = 0.0f;
    for (int64_t c = 0; c < hd; ++c) {
      grad_out[r * hd + c] = dyi[c];
      dot += dyi[c] * yi[c];
    }
    do_dot_o[r] = dot;
  }
  float* __restrict p = work.p.data();
  float* __restrict ds = work.ds.data();
  block_scores<V, R>(p, &pair.q[i0 * hd], pair.k_t.data(), hd, P, count);
  block_scores<V, R>(ds, grad_out, pair.v_t.data(), hd, P, count);  // dp
  for (int r = 0; r < R; ++r) {
    float* pr = p + r * P;
    float* dsr = ds + r * P;
    exp_row<V>(pr, lse[i0 + r], i0 + r + 1, count);
    for (int64_t j = 0; j < count; j += kLanes<V>)
      store(dsr + j, load<V>(pr + j) * (load<V>(dsr + j) - do_dot_o[r]));
  }
  block_weighted_rows<V, R>(&work.dq[i0 * hd], ds, P, pair.k.data(), keys, hd);
  block_add_outer<V, R>(work.dk.data(), ds, P, &pair.q[i0 * hd], keys, hd);
  block_add_outer<V, R>(work.dv.data(), p, P, grad_out, keys, hd);
}

// gradient of y (B, T, D), and qkv, tables, y and lse of the forward -> gradient of qkv (B, T, 3D); vectors V
template <typename V>
Tensor backward_with(const Tensor& grad_y, const Tensor& qkv, const Tensor& cos, const Tensor& sin, const Tensor& y,
                     const Tensor& lse, int64_t heads) {
  const Shape s(qkv, heads);
  const int64_t T = s.positions, hd = s.head_width, half = hd / 2;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  Tensor grad_qkv = at::empty_like(qkv);
  const float* QKV = qkv.data_ptr<float>();
  const float* COS = cos.data_ptr<float>();
  const float* SIN = sin.data_ptr<float>();
  const float* DY = grad_y.data_ptr<float>();
  const float* Y = y.data_ptr<float>();
  const float* LSE = lse.data_ptr<float>();
  float* DQKV = grad_qkv.data_ptr<float>();
  at::parallel_for(0, s.batch * heads, 1, [&](int64_t begin, int64_t end) {
    PairBuffers pair(T, hd);
    BackwardBuffers work(pair);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / heads, h = index % heads;
      pair.load(QKV, COS, SIN, s, b, h);
      std::fill(work.dk.begin(), work.dk.end(), 0.0f);
      std::fill(work.dv.begin(), work.dv.end(), 0.0f);
      const float* dy_rows = DY + b * T * s.width + h * hd;
      const float* y_rows = Y + b * T * s.width + h * hd;
      int64_t i0 = 0;
      for (; i0 + kBlock <= T; i0 += kBlock) backward_block<V, kBlock>(pair, work, i0, dy_rows, y_rows, s.width, LSE + index * T);
      for (; i0 < T; ++i0) backward_block<V, 1>(pair, work, i0, dy_rows, y_rows, s.width, LSE + index * T);
      // rot's transpose: dx[c] = cos[c] · dr[c] + sin[c'] · dr[c'], c' = (c + hd/2) mod hd; dq' carries the scale
      const float* dq = work.dq.data();
      const float* dk = work.dk.data();
      const float* dv = work.dv.data();
      for (int64_t t = 0; t < T; ++t) {
        float* row = DQKV + (b * T + t) * 3 * s.width + h * hd;
        const float* c = COS + t * hd;
        const float* sn = SIN + t * hd;
        const float *dqt = dq + t * hd, *dkt = dk + t * hd, *dvt = dv + t * hd;
        for (int64_t i = 0; i < half; ++i) {
          row[i] = scale * (c[i] * dqt[i] + sn[i + half] * dqt[i + half]);
          row[i + half] = scale * (c[i + half] * dqt[i + half] + sn[i] * dqt[i]);
          row[s.width + i] = c[i] * dkt[i] + sn[i + half] * dkt[i + half];
          row[s.width + i + half] = c[i + half] * dkt[i + half] + sn[i] * dkt[i];
        }
        for (int64_t i = 0; i < hd; ++i) row[2 * s.width + i] = dvt[i];
      }
    }
  });
  return grad_qkv;
}

Tensor attention_backward(const Tensor& grad_y, const Tensor& qkv, const Tensor& cos, const Tensor& sin,
                          const Tensor& y, const Tensor& lse, int64_t heads) {
  check_operands(qkv, cos, sin, heads);
  const Shape s(qkv, heads);
  TORCH_CHECK(grad_y.is_contiguous() && grad_y.sizes() == y.sizes() && y.is_contiguous() &&
                  y.size(2) == s.width && lse.is_contiguous(),
              "vwn_attn: grad_y and y must be contiguous (B, T, D), got ", grad_y.sizes(), " and ", y.sizes());
  return sixteen_lanes(s.head_width) ? backward_with<v16>(grad_y, qkv, cos, sin, y, lse, heads)
                                     : backward_with<v8>(grad_y, qkv, cos, sin, y, lse, heads);
}

}  // namespace

TORCH_LIBRARY(vwn_attn, lib) {
  lib.def("attention_forward(Tensor qkv, Tensor cos, Tensor sin, int heads) -> (Tensor, Tensor)");
  lib.def("attention_backward(Tensor grad_y, Tensor qkv, Tensor cos, Tensor sin, Tensor y, Tensor lse, int heads)"
          " -> Tensor");
}

TORCH_LIBRARY_IMPL(vwn_attn, CPU, lib) {
  lib.impl("attention_forward", &attention_forward);
  lib.impl("attention_backward", &attention_backward);
}
