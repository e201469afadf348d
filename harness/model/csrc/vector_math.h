// Vector helpers of the fused CPU kernels: eight- and sixteen-lane blocks, and exp, tanh and the SwiGLU gate in
// single precision written so the compiler vectorises loops that call them (std::exp and std::tanh stop it).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#ifdef __AVX__
#include <immintrin.h>
#endif

namespace vwn {

// Eight-lane blocks through GCC's vector extension (one AVX register; two NEON registers elsewhere): the
// rows here are often 8 to 32 floats long, where an auto-vectorised loop spends its time in set-up and
// remainder handling.
typedef float v8 __attribute__((vector_size(32)));

// count rounded up to whole eight-lane vectors
inline int64_t whole_vectors(int64_t count) { return (count + 7) / 8 * 8; }

// Sixteen lanes (one AVX-512 register, two AVX ones).
typedef float v16 __attribute__((vector_size(64)));

// One vector register of floats: v16 on AVX-512, else v8.
// NOTE: GCC holds a vector wider than the CPU's registers in memory and expands each operation on it piecewise
// through the stack: on AVX2 (AMD EPYC Zen 3, 2026-12-02) the sixteen-lane register tiles of gemm_tiles.h ran at
// 3 GFLOP/s, where MKL reached 100-114.
#ifdef __AVX512F__
typedef v16 vreg;
#else
typedef v8 vreg;
#endif
constexpr int kRegisterLanes = sizeof(vreg) / sizeof(float);

// Keeps x in a vector register where it is used: GCC may otherwise fold its load into each instruction that uses it
// and load it again every time. On AVX2 without AVX-512, where it was measured (ghc.cpp's add_to); a no-op elsewhere.
__attribute__((always_inline)) inline void pin_in_register(vreg& x) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  asm("" : "+x"(x));
#endif
}

// The sum of a vector's lanes, pairwise (for eight: two shuffles and adds, then one add), not lane after lane
inline float lane_sum(v8 v) {
  const v8 a = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  const v8 b = a + __builtin_shufflevector(a, a, 2, 3, 0, 1, 6, 7, 4, 5);
  return b[0] + b[1];
}
inline float lane_sum(v16 v) {
  return lane_sum(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}

// A vector V (v8 or v16) from p, and back; unaligned
template <typename V>
inline V load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
inline void store(float* p, V v) { __builtin_memcpy(p, &v, sizeof v); }

typedef int32_t v8i __attribute__((vector_size(32)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline int32_t to_int(float x) { return static_cast<int32_t>(x); }  // truncating, as a conversion
inline v8i to_int(v8 x) { return __builtin_convertvector(x, v8i); }
inline v16i to_int(v16 x) { return __builtin_convertvector(x, v16i); }
inline float to_float(int32_t x) { return static_cast<float>(x); }
inline v8 to_float(v8i x) { return __builtin_convertvector(x, v8); }
inline v16 to_float(v16i x) { return __builtin_convertvector(x, v16); }

// exp(u) for u ≤ 0, of a float or of eight lanes; relative error < 1e-7 down to u = -86 (below, the value of
// exp(-86) ≈ 4e-38, kept above fp32's subnormals, whose arithmetic is slow): exp(u) = 2^k · exp(r) by range
// reduction, |r| ≤ ln2 / 2, with a degree-7 Taylor polynomial for exp(r).
template <typename F>
__attribute__((always_inline)) inline F exp_nonpositive(F u) {
  const F lowest = F{} - 86.0f;
  u = u > lowest ? u : lowest;
  const auto k = -to_int(0.5f - u * 1.44269504f);  // round(u / ln 2); a conversion, unlike floor,
  const F r = u - to_float(k) * 0.693147181f;      // vectorises without -fno-trapping-math
  F p = F{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * std::bit_cast<F>((k + 127) << 23);
}

// 1 / (1 + exp(-x)), of a float or of eight lanes, from exp of the non-positive -|x| (no overflow either way)
template <typename F>
__attribute__((always_inline)) inline F sigmoid(F x) {
  const F zero{};
  const F e = exp_nonpositive(x < zero ? x : -x);
  const F s = 1.0f / (1.0f + e);
  return x < zero ? e * s : s;
}

// The SwiGLU gate silu(g) ∘ u, of a float or of lanes
template <typename F>
__attribute__((always_inline)) inline F gated(F g, F u) {
  return g * sigmoid(g) * u;
}

// (d gate, d up) from the gradient r of silu(g) ∘ u
template <typename F>
__attribute__((always_inline)) inline void gated_gradient(F g, F u, F r, F& d_gate, F& d_up) {
  const F s = sigmoid(g);
  d_gate = r * u * s * (1.0f + g * (1.0f - s));
  d_up = r * g * s;
}

// x clamped to [-limit, limit], lane by lane; NaN goes to limit, as `x < limit ? x : limit` takes it
template <typename F>
__attribute__((always_inline)) inline F clamp_symmetric(F x, float limit) {
  x = x < limit ? x : limit;
  return x > -limit ? x : -limit;
}
// NOTE: GCC compiles those comparisons of vectors to a compare and a blend each, not to the min and max
// instructions (which take NaN the same way): four of the tanh's ~16 operations, a GHC's coefficient loop alone
// at (8, 64) x0.84-0.93 with these (AMD EPYC Zen 3, 2026-12-06).
#ifdef __AVX__
inline v8 clamp_symmetric(v8 x, float limit) {
  return (v8)_mm256_max_ps(_mm256_min_ps((__m256)x, _mm256_set1_ps(limit)), _mm256_set1_ps(-limit));
}
#endif
#ifdef __AVX512F__
inline v16 clamp_symmetric(v16 x, float limit) {
  return (v16)_mm512_max_ps(_mm512_min_ps((__m512)x, _mm512_set1_ps(limit)), _mm512_set1_ps(-limit));
}
#endif

// tanh of a float or of lanes: x · P(x²) / Q(x²), P and Q of degree 4 fitted by scripts/fit_tanh.py on [0, 9]
// (float64 relative error 2.3e-8), x clamped to ±8.0017, where the fp32 evaluation reaches 1 (|tanh| ≤ 1; the
// rational function alone would pass it). In fp32: |error| < 3.2e-7 (5 units in the last place below 1),
// relative error below |x| = 0.1 < 2.1e-7 (tested).
// NOTE: the exp-based form before it, tanh|x| = (1 - e) / (1 + e) with e = exp(-2|x|) and a Taylor branch below
// 0.1 (|error| < 2e-7), took about 40 vector operations to this one's 13: without any tanh, a GHC write + read
// forward ran ×0.81 at (2, 8), ×0.53 at (8, 16) (AMD EPYC Zen 3, 2026-12-06).
template <typename F>
__attribute__((always_inline)) inline F tanh_approx(F x) {
  x = clamp_symmetric(x, 8.00166225f);
  const F t = x * x;
  const F p = (((1.33968232e-08f * t + 2.0646663e-05f) * t + 0.00349819195f) * t + 0.133833289f) * t + 1.0f;
  const F q = (((7.79591062e-07f * t + 0.000328966591f) * t + 0.0258872285f) * t + 0.467166513f) * t + 1.0f;
  return x * p / q;
}

}  // namespace vwn
