// Fused CPU kernels (fp32) for causal self-attention with rotary positions, forward and backward, for the
// small head widths of this project's models; the maths and the reference code are harness/model/
// transformer.py's (`apply_rotary`, then scaled_dot_product_attention with is_causal).
//
// B batch, T positions, H heads of width hd (a multiple of 8), D = H·hd. One (batch, head) pair at a time per
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
using vwn::load8;
using vwn::store8;
using vwn::v8;

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
// (hd, P), values by row (T, hd) and by column (hd, P); P = T rounded up to whole vectors, the columns past T
// zero (never written), so score rows can be computed a vector at a time.
struct PairBuffers {
  int64_t positions, padded, head_width;
  std::vector<float> q, k, k_t, v, v_t;
  PairBuffers(int64_t positions, int64_t head_width)
      : positions(positions), padded((positions + 7) / 8 * 8), head_width(head_width),
        q(positions * head_width), k(positions * head_width), k_t(head_width * padded, 0.0f),
        v(positions * head_width), v_t(head_width * padded, 0.0f) {}

  void load(const float* qkv, const float* cos, const float* sin, const Shape& s, int64_t b, int64_t h) {
    const int64_t hd = head_width, half = hd / 2;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    for (int64_t t = 0; t < positions; ++t) {
      const float* row = qkv + (b * positions + t) * 3 * s.width + h * hd;
      const float* c = cos + t * hd;
      const float* sn = sin + t * hd;
      for (int64_t i = 0; i < hd; ++i) {
        const int64_t partner = (i + half) % hd;
        q[t * hd + i] = scale * (row[i] * c[i] + row[partner] * sn[i]);
        k[t * hd + i] = k_t[i * padded + t] = row[s.width + i] * c[i] + row[s.width + partner] * sn[i];
        v[t * hd + i] = v_t[i * padded + t] = row[2 * s.width + i];
      }
    }
  }
};

// scores (the first `count` of `out`, count rounded up to whole vectors) of query row qi (hd) against the
// keys' columns k_t (hd, T): out[j] = Σ_c qi[c] k_t[c, j]
// NOTE: four vectors of scores in flight: one alone waits on its own sum (16 dependent FMAs per 8 scores at
// hd = 16) and made the forward three times slower
inline void scores(float* __restrict out, const float* __restrict qi, const float* __restrict k_t, int64_t hd,
                   int64_t positions, int64_t count) {
  int64_t j = 0;
  for (; j + 32 <= count; j += 32) {
    v8 acc[4] = {};
    for (int64_t c = 0; c < hd; ++c)
      for (int u = 0; u < 4; ++u) acc[u] += qi[c] * load8(k_t + c * positions + j + 8 * u);
    for (int u = 0; u < 4; ++u) store8(out + j + 8 * u, acc[u]);
  }
  for (; j < count; j += 8) {
    v8 acc{};
    for (int64_t c = 0; c < hd; ++c) acc += qi[c] * load8(k_t + c * positions + j);
    store8(out + j, acc);
  }
}

// out (hd) = Σ_{j < count} w[j] · rows[j] (rows: count × hd), four rows in flight
inline void weighted_rows(float* __restrict out, const float* __restrict w, const float* __restrict rows,
                          int64_t count, int64_t hd) {
  for (int64_t c = 0; c < hd; c += 8) {
    v8 acc[4] = {};
    int64_t j = 0;
    for (; j + 4 <= count; j += 4)
      for (int u = 0; u < 4; ++u) acc[u] += w[j + u] * load8(rows + (j + u) * hd + c);
    for (; j < count; ++j) acc[0] += w[j] * load8(rows + j * hd + c);
    store8(out + c, (acc[0] + acc[1]) + (acc[2] + acc[3]));
  }
}

// rows[j] += w[j] · x for j < count (rows: count × hd)
inline void add_outer(float* __restrict rows, const float* __restrict w, const float* __restrict x, int64_t count,
                      int64_t hd) {
  for (int64_t j = 0; j < count; ++j)
    for (int64_t c = 0; c < hd; c += 8) store8(rows + j * hd + c, load8(rows + j * hd + c) + w[j] * load8(x + c));
}

// qkv (B, T, 3D), rotary tables (T, hd) -> y (B, T, D), logsumexp of each query's scores (B, H, T)
std::tuple<Tensor, Tensor> attention_forward(const Tensor& qkv, const Tensor& cos, const Tensor& sin, int64_t heads) {
  check_operands(qkv, cos, sin, heads);
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
    std::vector<float> p(pair.padded);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / heads, h = index % heads;
      pair.load(QKV, COS, SIN, s, b, h);
      for (int64_t i = 0; i < T; ++i) {
        const int64_t count = i + 1;
        scores(p.data(), &pair.q[i * hd], pair.k_t.data(), hd, pair.padded, (count + 7) / 8 * 8);
        const float peak = *std::max_element(p.begin(), p.begin() + count);
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < count; ++j) {
          p[j] = vwn::exp_nonpositive(p[j] - peak);
          total += p[j];
        }
        float* yi = Y + (b * T + i) * s.width + h * hd;
        weighted_rows(yi, p.data(), pair.v.data(), count, hd);
        const float inverse = 1.0f / total;
        for (int64_t c = 0; c < hd; ++c) yi[c] *= inverse;
        LSE[index * T + i] = peak + std::log(total);
      }
    }
  });
  return {y, lse};
}

// gradient of y (B, T, D), and qkv, tables, y and lse of the forward -> gradient of qkv (B, T, 3D)
Tensor attention_backward(const Tensor& grad_y, const Tensor& qkv, const Tensor& cos, const Tensor& sin,
                          const Tensor& y, const Tensor& lse, int64_t heads) {
  check_operands(qkv, cos, sin, heads);
  const Shape s(qkv, heads);
  TORCH_CHECK(grad_y.is_contiguous() && grad_y.sizes() == y.sizes() && y.is_contiguous() &&
                  y.size(2) == s.width && lse.is_contiguous(),
              "vwn_attn: grad_y and y must be contiguous (B, T, D), got ", grad_y.sizes(), " and ", y.sizes());
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
    std::vector<float> p(pair.padded), ds(pair.padded), dq(T * hd), dk(T * hd), dv(T * hd);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / heads, h = index % heads;
      pair.load(QKV, COS, SIN, s, b, h);
      std::fill(dk.begin(), dk.end(), 0.0f);
      std::fill(dv.begin(), dv.end(), 0.0f);
      for (int64_t i = 0; i < T; ++i) {
        const int64_t count = i + 1, whole = (count + 7) / 8 * 8;
        const float* doi = DY + (b * T + i) * s.width + h * hd;
        const float* oi = Y + (b * T + i) * s.width + h * hd;
        float do_dot_o = 0.0f;
        for (int64_t c = 0; c < hd; ++c) do_dot_o += doi[c] * oi[c];
        const float lse_i = LSE[index * T + i];
        scores(p.data(), &pair.q[i * hd], pair.k_t.data(), hd, pair.padded, whole);
        scores(ds.data(), doi, pair.v_t.data(), hd, pair.padded, whole);  // dp
#pragma omp simd
        for (int64_t j = 0; j < count; ++j) {
          p[j] = vwn::exp_nonpositive(p[j] - lse_i);
          ds[j] = p[j] * (ds[j] - do_dot_o);
        }
        weighted_rows(&dq[i * hd], ds.data(), pair.k.data(), count, hd);
        add_outer(dk.data(), ds.data(), &pair.q[i * hd], count, hd);
        add_outer(dv.data(), p.data(), doi, count, hd);
      }
      // rot's transpose: dx[c] = cos[c] · dr[c] + sin[c'] · dr[c'], c' = (c + hd/2) mod hd; dq' carries the scale
      for (int64_t t = 0; t < T; ++t) {
        float* row = DQKV + (b * T + t) * 3 * s.width + h * hd;
        const float* c = COS + t * hd;
        const float* sn = SIN + t * hd;
        for (int64_t i = 0; i < hd; ++i) {
          const int64_t partner = (i + half) % hd;
          row[i] = scale * (c[i] * dq[t * hd + i] + sn[partner] * dq[t * hd + partner]);
          row[s.width + i] = c[i] * dk[t * hd + i] + sn[partner] * dk[t * hd + partner];
          row[2 * s.width + i] = dv[t * hd + i];
        }
      }
    }
  });
  return grad_qkv;
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
