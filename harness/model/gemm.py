"""Which fp32 GEMM library the model's CPU products run on, MKL (torch's default) or oneDNN, and `linear` on it.

torch runs fp32 matmuls on CPU through MKL, whose sgemm takes its AVX-512 code only on Intel CPUs. On an AMD
EPYC with AVX-512 (Zen 5, 2 cores, 2026-12-01) it runs its AVX2 code: a 4096² product at 189 GFLOP/s, where
oneDNN, which torch also carries (`mkldnn::_linear_pointwise`, inductor's fused linear), reaches 396; the LM
head's per-chunk products ((128, 64) × (64, 4096) and its two gradients) went from 166-182 to 315-413 GFLOP/s.
On an AMD EPYC with AVX2 only (Zen 3, 2.45 GHz, 2026-12-02) the two libraries ran the model's linears alike
(60-78 GFLOP/s) and 4096² within each other's noise (102-122 against 70-122 GFLOP/s over the day), but oneDNN
ran the cross-entropy op in 45-49 ms against 65-69 (the tiny step, alternated in one process, ×0.88 at r = 1,
×0.95 at (2,8)). MKL on Intel was measured well by this
project before (238-314 GFLOP/s at 4096²), so the choice is by CPU vendor:

    VWN_CPU_GEMM = auto (default) | mkl | onednn
    auto: oneDNN on x86-64 CPUs with AVX2 that are not Intel's, where torch has it; MKL everywhere else

On oneDNN go the cross-entropy's products (inside its C++ op), every `Linear` / `linear`, forward and input
gradient, and each MoE expert's SwiGLU products with a token row (`moe._OneDNNExperts`, where the fused SwiGLU
op, `moe._FusedSwiGLU` on AVX2 and AVX-512, does not take them). In the training step:
the cross-entropy 23.8 → 11.6 ms at the tiny config; the rest, the same model's step alternated with and without
it in one process, tiny × 0.93 (r = 1, (2,3), (2,8)), small × 0.74-0.77. The choice is made once per process (a
resumed run on the same machine makes the same one); the libraries sum in other orders, so results differ in the
last bits.

Their weight gradients, aᵀ b over the token rows with a small result, run at 140-250 GFLOP/s on either library
here; `weight_grad` takes them to the fused kernel `csrc/weight_grad.cpp` (410-430) on CPUs with AVX2 or AVX-512
(on an AVX2 AMD EPYC, Zen 3, 2026-12-02: 94-124 GFLOP/s, MKL 85-118).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

from harness.model import cpu_kernels

BACKENDS = ("auto", "mkl", "onednn")
CPUINFO = Path("/proc/cpuinfo")


def _cpu() -> tuple[str, list[str]]:
    """The CPU's vendor id and instruction-set flags from /proc/cpuinfo (empty where there is none: not Linux)."""
    if not CPUINFO.exists():
        return "", []
    lines = CPUINFO.read_text().splitlines()
    vendor = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return vendor, flags


def _cpu_is_non_intel_with_avx2() -> bool:
    vendor, flags = _cpu()
    return vendor not in ("", "GenuineIntel") and "avx2" in flags


# NOTE: the choices are made once per process (the cached functions) and read through functions that
# torch.compile traces as their value (assume_constant_result): reading /proc/cpuinfo or torch.backends inside a
# graph would break it, and dynamo traces through functools.cache, with a warning, rather than call it
@functools.cache
def _cpu_has_avx2() -> bool:
    return "avx2" in _cpu()[1]


@functools.cache
def _onednn_chosen() -> bool:
    choice = os.environ.get("VWN_CPU_GEMM", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"VWN_CPU_GEMM={choice!r}: allowed values are {', '.join(BACKENDS)}")
    if not torch.backends.mkldnn.is_available():
        if choice == "onednn":
            raise RuntimeError("VWN_CPU_GEMM=onednn: this torch build has no oneDNN (torch.backends.mkldnn)")
        return False
    return choice == "onednn" or (choice == "auto" and _cpu_is_non_intel_with_avx2())


@torch.compiler.assume_constant_result
def has_avx2() -> bool:
    """Whether the CPU has AVX2 (AVX-512 CPUs have it too): the register tiles of the fused GEMM kernels are sized
    for AVX2's registers or AVX-512's."""
    return _cpu_has_avx2()


@torch.compiler.assume_constant_result
def use_onednn() -> bool:
    """Whether CPU fp32 products go through oneDNN (`VWN_CPU_GEMM`, see the module docstring)."""
    return _onednn_chosen()


def forget_choices() -> None:
    """Make the next `use_onednn` / `has_avx2` read VWN_CPU_GEMM and the CPU again (their choices are cached)."""
    _cpu_has_avx2.cache_clear()
    _onednn_chosen.cache_clear()


def backend() -> str:
    """'onednn' or 'mkl': what the model's fp32 CPU products run on in this process (recorded in each run)."""
    return "onednn" if use_onednn() else "mkl"


def _plain(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix, or a contiguous copy unless it is row- or column-major.

    NOTE: oneDNN takes any strides but runs others (a column slice of a wider matrix) on its reference code:
    (2048, 64) times a (64, 64) slice of a (64, 128) weight took 96 ms, against 53 µs contiguous."""
    return matrix if matrix.is_contiguous() or matrix.T.is_contiguous() else matrix.contiguous()


# NOTE: a custom op for torch.compile, opaque to inductor, whose lowering of mkldnn::_linear_pointwise expects a
# weight it packed itself; eager calls the op directly (a custom op's Python dispatch costs more than this product at
# the tiny config)
@torch.library.custom_op("vwn::onednn_linear", mutates_args=())
def _compiled_onednn_linear(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


@_compiled_onednn_linear.register_fake
def _(a, b, bias):
    return a.new_empty(a.shape[0], b.shape[0])


def onednn_linear(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) · bᵀ (+ bias (N,)), b (N, K) -> (M, N), through oneDNN."""
    if torch.compiler.is_compiling():
        return _compiled_onednn_linear(_plain(a), _plain(b), bias)
    return torch.ops.mkldnn._linear_pointwise(_plain(a), _plain(b), bias, "none", [], "")


def tiles_take(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels built on `csrc/gemm_tiles.h` (`weight_grad`, the MoE's SwiGLU op) can take these
    operands: on a CPU with AVX2 or AVX-512, fp32 CPU tensors, the extension built."""
    return has_avx2() and cpu_kernels.applies(*tensors)


def _register_fake_kernels() -> None:
    @torch.library.register_fake("vwn_gemm::weight_grad")
    def _(a, b):
        return a.new_empty(a.shape[1], b.shape[1])


cpu_kernels.on_build(_register_fake_kernels)


def weight_grad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aᵀ b, a (K, M), b (K, N) -> (M, N): a weight's gradient from its layer's input and output gradient rows; on
    the fused kernel where it `tiles_take`s them (contiguous, N a multiple of 16), else torch's matmul."""
    if b.shape[1] % 16 == 0 and a.is_contiguous() and b.is_contiguous() and tiles_take(a, b):
        return torch.ops.vwn_gemm.weight_grad(a, b)
    return a.T @ b


def takes(*tensors: torch.Tensor) -> bool:
    """Whether these operands' product goes through oneDNN: `use_onednn`, and fp32 CPU tensors outside autocast (in
    a torch.compile graph too, as an opaque op: inductor's own choice here ran torch's matmuls, MKL's AVX2 code)."""
    return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and not torch.is_autocast_enabled("cpu") and use_onednn())


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = onednn_linear(grad, weight.T) if ctx.needs_input_grad[0] else None
        grad_weight = weight_grad(grad, x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) · weightᵀ + bias, weight (N, K), bias (N,) or None -> (..., N): F.linear, on oneDNN where it
    `takes` them."""
    if takes(x, weight, *([] if bias is None else [bias])):
        out = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return nn.functional.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear without bias, its product through `linear` (the same parameter and state-dict key)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
