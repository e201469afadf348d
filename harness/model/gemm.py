"""Which fp32 GEMM library runs the LM head's cross-entropy products on CPU: MKL (torch's default) or oneDNN.

torch runs fp32 matmuls on CPU through MKL, whose sgemm takes its AVX-512 code only on Intel CPUs. On an AMD
EPYC with AVX-512 (Zen 5, 2 cores, 2026-12-01) it runs its AVX2 code: a 4096² product at 189 GFLOP/s, where
oneDNN, which torch also carries (`mkldnn::_linear_pointwise`, inductor's fused linear), reaches 396; the
cross-entropy's per-chunk products ((128, 64) × (64, 4096) and its two gradients) went from 166-182 to 315-413
GFLOP/s, and one loss forward + backward at 2048 tokens from 23.8 to 11.6 ms. MKL on Intel was measured well by
this project before (238-314 GFLOP/s at 4096²), so the choice is by CPU vendor:

    VWN_CPU_GEMM = auto (default) | mkl | onednn
    auto: oneDNN on x86-64 CPUs with AVX-512 that are not Intel's, where torch has it; MKL everywhere else

The rest of the model stays on torch's matmuls (MKL), measured: its linears through oneDNN gained nothing in the
step, and oneDNN compiles a kernel for every new shape (~0.5 ms each), which the MoE's per-expert products, whose
row counts change every step, would pay again and again. The choice is made once per process (a resumed run on
the same machine makes the same one); the libraries sum in other orders, so the gradients differ in the last
bits (relative 6e-7).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

BACKENDS = ("auto", "mkl", "onednn")
CPUINFO = Path("/proc/cpuinfo")


def _cpu_is_non_intel_with_avx512() -> bool:
    if not CPUINFO.exists():  # not Linux: MKL
        return False
    lines = CPUINFO.read_text().splitlines()
    vendor = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return vendor != "GenuineIntel" and "avx512f" in flags


@functools.cache
def use_onednn() -> bool:
    """Whether CPU fp32 products go through oneDNN (`VWN_CPU_GEMM`, see the module docstring)."""
    choice = os.environ.get("VWN_CPU_GEMM", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"VWN_CPU_GEMM={choice!r}: allowed values are {', '.join(BACKENDS)}")
    if not torch.backends.mkldnn.is_available():
        if choice == "onednn":
            raise RuntimeError("VWN_CPU_GEMM=onednn: this torch build has no oneDNN (torch.backends.mkldnn)")
        return False
    return choice == "onednn" or (choice == "auto" and _cpu_is_non_intel_with_avx512())


def backend() -> str:
    """'onednn' or 'mkl': what the model's fp32 CPU products run on in this process (recorded in each run)."""
    return "onednn" if use_onednn() else "mkl"


def _plain(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix, or a contiguous copy unless it is row- or column-major.

    NOTE: oneDNN takes any strides but runs others (a column slice of a wider matrix) on its reference code:
    (2048, 64) times a (64, 64) slice of a (64, 128) weight took 96 ms, against 53 µs contiguous."""
    return matrix if matrix.is_contiguous() or matrix.T.is_contiguous() else matrix.contiguous()


def onednn_linear(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) · bᵀ, b (N, K) -> (M, N), through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(_plain(a), _plain(b), None, "none", [], "")
