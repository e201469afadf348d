// Fused CPU kernels (fp32) for SwiGLU experts, forward and backward: each expert's rows through both products
// and the gate a block of 64 rows at a time, in the register tiles of gemm_tiles.h; the maths and the
// reference code are harness/model/moe.py's (`swiglu`, `expert_matmul`, `gated_silu`). A dense SwiGLU is one
// expert holding every row.
//
//   expert e, its rows x (R, D):  pre = x W_in[e] (R, 2F) = [gate | up],  h = silu(gate) ∘ up,  y = h W_out[e]
//   backward:  dh = dy W_out[e]ᵀ,  d pre = gated_silu's gradient,  dx = d pre W_in[e]ᵀ,
//              dW_out[e] = hᵀ dy,  dW_in[e] = xᵀ d pre
//
// The torch path runs each product as a GEMM over all rows and the gate as separate passes over (R, 2F) and
// (R, F) tensors each way; here a block's pre, h and their gradients stay in L2 between the products, only pre
// is kept for the backward (h is recomputed from it), and no expert's rows are padded or copied.
// NOTE: 64 rows per block: at 8, each block re-read the expert's weights (1 MB for W_in at D = 256, F = 512),
// the small config's experts took 47 ms forward + backward against oneDNN's 39; at 64, 34 against 35.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "gemm_tiles.h"

namespace {

using at::Tensor;
using vwn::Left;
using vwn::load;
using vwn::store;
using vwn::vreg;

constexpr int64_t kBlockRows = 64;

struct Shape {
  int64_t rows, width, hidden;  // N, D, F
};

// One block of rows of one expert: [first, first + count) of the grouped rows, all of expert `expert`
struct Block {
  int64_t expert, first, count;
};

Shape check_operands(const Tensor& x, const Tensor& w_in, const Tensor& w_out, at::IntArrayRef ends) {
  for (const auto& [t, name, dims] : {std::tuple{&x, "x", 2}, std::tuple{&w_in, "w_in", 3}, std::tuple{&w_out, "w_out", 3}})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == dims,
                "vwn_ffn: ", name, " must be a contiguous ", dims, "-D float32 CPU tensor, got ", t->sizes(), " ",
                t->scalar_type());
  const int64_t experts = w_in.size(0), width = x.size(1), hidden = w_out.size(1);
  TORCH_CHECK(w_in.size(1) == width && w_in.size(2) == 2 * hidden && w_out.size(0) == experts &&
                  w_out.size(2) == width && static_cast<int64_t>(ends.size()) == experts,
              "vwn_ffn: w_in must be (E, D, 2F) and w_out (E, F, D) for x (N, D) and E ends, got ", w_in.sizes(), ", ",
              w_out.sizes(), ", ", x.sizes(), " and ", ends.size(), " ends");
  TORCH_CHECK(width % 16 == 0 && hidden % 16 == 0, "vwn_ffn: D and F must be multiples of 16, got ", width, " and ",
              hidden);
  TORCH_CHECK(experts == 0 || ends[experts - 1] == x.size(0), "vwn_ffn: the last end must be N = ", x.size(0));
  return {x.size(0), width, hidden};
}

// each expert's end row (E,), int32 (a tensor, not a list of ints, so that torch.compile traces the ops without
// reading it)
std::vector<int64_t> end_rows(const Tensor& ends) {
  TORCH_CHECK(ends.device().is_cpu() && ends.scalar_type() == at::kInt && ends.is_contiguous() && ends.dim() == 1,
              "vwn_ffn: ends must be a contiguous 1-D int32 CPU tensor, got ", ends.sizes(), " ", ends.scalar_type());
  const int32_t* e = ends.data_ptr<int32_t>();
  return std::vector<int64_t>(e, e + ends.size(0));
}

std::vector<Block> blocks_of(at::IntArrayRef ends) {
  std::vector<Block> blocks;
  int64_t start = 0;
  for (int64_t e = 0; e < static_cast<int64_t>(ends.size()); ++e) {
    TORCH_CHECK(ends[e] >= start, "vwn_ffn: ends must not decrease, got ", ends);
    for (int64_t first = start; first < ends[e]; first += kBlockRows)
      blocks.push_back({e, first, std::min(kBlockRows, ends[e] - first)});
    start = ends[e];
  }
  return blocks;
}

// h (count, F) = silu(gate) ∘ up of pre (count, 2F)
void gate_rows(float* __restrict h, const float* __restrict pre, int64_t count, int64_t hidden) {
  for (int64_t r = 0; r < count; ++r)
    for (int64_t c = 0; c < hidden; c += vwn::kRegisterLanes) {
      store(h + r * hidden + c, vwn::gated(load<vreg>(pre + r * 2 * hidden + c), load<vreg>(pre + r * 2 * hidden + hidden + c)));
    }
}

// x (N, D) grouped by expert, w_in (E, D, 2F), w_out (E, F, D), ends (E,) -> y (N, D), pre (N, 2F)
std::tuple<Tensor, Tensor> swiglu_forward(const Tensor& x, const Tensor& w_in, const Tensor& w_out,
                                          const Tensor& end_tensor) {
  const std::vector<int64_t> ends = end_rows(end_tensor);
  const Shape s = check_operands(x, w_in, w_out, ends);
  const int64_t D = s.width, F = s.hidden;
  Tensor y = at::empty({s.rows, D}, x.options());
  Tensor pre = at::empty({s.rows, 2 * F}, x.options());
  const std::vector<Block> blocks = blocks_of(ends);
  const float* X = x.data_ptr<float>();
  const float* WI = w_in.data_ptr<float>();
  const float* WO = w_out.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  float* P = pre.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(kBlockRows * F);
    for (int64_t i = begin; i < end; ++i) {
      const Block b = blocks[i];
      float* p = P + b.first * 2 * F;
      vwn::block_product(p, 2 * F, Left<false>{X + b.first * D, D}, WI + b.expert * D * 2 * F, 2 * F, b.count, D,
                         2 * F, false);
      gate_rows(h.data(), p, b.count, F);
      vwn::block_product(Y + b.first * D, D, Left<false>{h.data(), F}, WO + b.expert * F * D, D, b.count, F, D, false);
    }
  });
  return {y, pre};
}

// gradient of y (N, D), and x, pre, w_in, w_out, ends of the forward -> gradients of x, w_in and w_out
std::tuple<Tensor, Tensor, Tensor> swiglu_backward(const Tensor& grad_y, const Tensor& x, const Tensor& pre,
                                                   const Tensor& w_in, const Tensor& w_out,
                                                   const Tensor& end_tensor) {
  const std::vector<int64_t> ends = end_rows(end_tensor);
  const Shape s = check_operands(x, w_in, w_out, ends);
  const int64_t D = s.width, F = s.hidden, experts = w_in.size(0);
  TORCH_CHECK(grad_y.is_contiguous() && grad_y.sizes() == x.sizes() && pre.is_contiguous() && pre.dim() == 2 &&
                  pre.size(0) == s.rows && pre.size(1) == 2 * F,
              "vwn_ffn: grad_y must be contiguous (N, D) and pre (N, 2F), got ", grad_y.sizes(), " and ", pre.sizes());
  Tensor grad_x = at::empty_like(x);
  Tensor grad_w_in = at::empty_like(w_in);
  Tensor grad_w_out = at::empty_like(w_out);
  Tensor grad_pre = at::empty_like(pre);               // (N, 2F), for W_in's gradient
  Tensor h = at::empty({s.rows, F}, x.options());       // (N, F), for W_out's gradient
  const Tensor w_in_t = w_in.transpose(1, 2).contiguous();    // (E, 2F, D)
  const Tensor w_out_t = w_out.transpose(1, 2).contiguous();  // (E, D, F)
  const std::vector<Block> blocks = blocks_of(ends);
  const float* DY = grad_y.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  const float* P = pre.data_ptr<float>();
  float* DX = grad_x.data_ptr<float>();
  float* DP = grad_pre.data_ptr<float>();
  float* H = h.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> dh(kBlockRows * F);
    for (int64_t i = begin; i < end; ++i) {
      const Block b = blocks[i];
      vwn::block_product(dh.data(), F, Left<false>{DY + b.first * D, D}, w_out_t.data_ptr<float>() + b.expert * D * F, F,
                         b.count, D, F, false);
      for (int64_t r = 0; r < b.count; ++r) {
        const float* gate = P + (b.first + r) * 2 * F;
        const float* up = gate + F;
        float* d_gate = DP + (b.first + r) * 2 * F;
        float* d_up = d_gate + F;
        float* hr = H + (b.first + r) * F;
        for (int64_t c = 0; c < F; c += vwn::kRegisterLanes) {
          const vreg g = load<vreg>(gate + c), u = load<vreg>(up + c);
          vreg dg, du;
          vwn::gated_gradient(g, u, load<vreg>(dh.data() + r * F + c), dg, du);
          store(hr + c, vwn::gated(g, u));
          store(d_gate + c, dg);
          store(d_up + c, du);
        }
      }
      vwn::block_product(DX + b.first * D, D, Left<false>{DP + b.first * 2 * F, 2 * F},
                         w_in_t.data_ptr<float>() + b.expert * 2 * F * D, D, b.count, 2 * F, D, false);
    }
  });
  // weight gradients: each expert's over its rows, the experts spread over the threads (one expert: its rows)
  float* DWI = grad_w_in.data_ptr<float>();
  float* DWO = grad_w_out.data_ptr<float>();
  auto expert_rows = [&](int64_t e) { return std::pair{e == 0 ? 0 : ends[e - 1], ends[e]}; };
  if (experts >= at::get_num_threads()) {
    at::parallel_for(0, experts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        const auto [first, last] = expert_rows(e);
        vwn::transposed_product_range(DWO + e * F * D, H + first * F, DY + first * D, 0, last - first, F, D);
        vwn::transposed_product_range(DWI + e * D * 2 * F, X + first * D, DP + first * 2 * F, 0, last - first, D,
                                      2 * F);
      }
    });
  } else {
    for (int64_t e = 0; e < experts; ++e) {
      const auto [first, last] = expert_rows(e);
      vwn::transposed_product(DWO + e * F * D, H + first * F, DY + first * D, last - first, F, D);
      vwn::transposed_product(DWI + e * D * 2 * F, X + first * D, DP + first * 2 * F, last - first, D, 2 * F);
    }
  }
  return {grad_x, grad_w_in, grad_w_out};
}

}  // namespace

TORCH_LIBRARY(vwn_swiglu, lib) {
  lib.def("swiglu_forward(Tensor x, Tensor w_in, Tensor w_out, Tensor ends) -> (Tensor, Tensor)");
  lib.def("swiglu_backward(Tensor grad_y, Tensor x, Tensor pre, Tensor w_in, Tensor w_out, Tensor ends)"
          " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vwn_swiglu, CPU, lib) {
  lib.impl("swiglu_forward", &swiglu_forward);
  lib.impl("swiglu_backward", &swiglu_backward);
}
