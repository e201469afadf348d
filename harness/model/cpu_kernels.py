"""The fused CPU kernels (fp32) of `csrc/`, built on first use into one extension.

- `csrc/ghc.cpp`: the GHC read and write, forward and backward (ops `vwn_ghc::*`), and `csrc/ghc_autograd.cpp`
  their autograd (the ops `ghc_kernel` calls);
- `csrc/cross_entropy.cpp`: the chunked LM-head cross-entropy with its gradients (`vwn_ce::*`, used by `loss`);
- `csrc/rms_norm.cpp`: RMSNorm forward and backward (`vwn_norm::*`, used by `norm`);
- `csrc/gated_silu.cpp`: the SwiGLU gate silu(gate) ∘ up, forward and backward (`vwn_ffn::*`, used by `moe`);
- `csrc/swiglu.cpp`: SwiGLU experts (or one dense SwiGLU), both products and the gate, forward and backward
  (`vwn_swiglu::*`, used by `moe` on AVX2 and AVX-512);
- `csrc/layer_norm.cpp`: a layer norm without affine, the reduce head's GroupNorm (`vwn_layer_norm::*`, used by
  `norm.layer_norm`);
- `csrc/moe_routing.cpp`: the MoE's routing, dispatch and combine (`vwn_moe::*`, used by `routing`);
- `csrc/attention.cpp`: rotary + causal attention from the qkv projection, forward and backward (`vwn_attn::*`,
  used by `transformer.Attention`);
- `csrc/weight_grad.cpp`: aᵀ b over token rows, the linears' and experts' weight gradients (`vwn_gemm::*`, used
  by `gemm.weight_grad`).

The extension is compiled with `-march=native` once per CPU type, compile flags and source version (all hashed
into its name, so a shared cache on a cluster of mixed nodes keeps one build per type, and an edited source or
flag never loads a stale build) into torch's extension cache (`TORCH_EXTENSIONS_DIR`, default
~/.cache/torch_extensions). If it cannot be built (no C++ compiler), `available()` warns once with the reason
and returns False, and the model takes its torch code instead.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).with_name("csrc")
SOURCES = sorted(SOURCE_DIR.glob("*.cpp"))


# NOTE: -fno-math-errno lets sqrt vectorise (the GHC kernels' rstd); nothing here reads errno
COMPILE_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp"]


def _build_tag() -> str:
    """A short hash of the CPU's instruction-set flags (Linux), the compile flags and the sources, headers included."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith(("flags", "Features"))), "")
    digest = hashlib.sha1(f"{platform.machine()} {flags} {COMPILE_FLAGS}".encode())
    for path in sorted(SOURCE_DIR.iterdir()):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


_built: bool | None = None  # None until the first `available()`
_fake_registrations: list[Callable[[], None]] = []


def on_build(register_fakes: Callable[[], None]) -> None:
    """Call `register_fakes` (it registers the output shapes of some ops for torch.compile) once the extension
    is loaded: now, if it is."""
    _fake_registrations.append(register_fakes)
    if _built:
        register_fakes()


def _build() -> bool:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the `ninja` package's binary sits next to this Python, maybe not on PATH
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    try:
        cpp_extension.load(name=f"vwn_kernels_{_build_tag()}", sources=[str(s) for s in SOURCES],
                           is_python_module=False,
                           extra_cflags=COMPILE_FLAGS,
                           extra_ldflags=["-fopenmp"])
    except (RuntimeError, OSError) as error:  # no compiler, no ninja, a failed build
        warnings.warn(f"fused CPU kernels unavailable, using the slower torch code: {error}", stacklevel=3)
        return False
    for register_fakes in _fake_registrations:
        register_fakes()
    return True


def available() -> bool:
    """Build (or load the cached build of) the extension on the first call; False, with one warning, if that fails."""
    global _built
    if _built is None:
        _built = _build()
    return _built


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these operands: fp32 CPU tensors, and the extension builds.

    torch.compile cannot trace the build, so while compiling this reads the outcome of an earlier eager call
    (`LanguageModel.compile` makes one)."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    return bool(_built) if torch.compiler.is_compiling() else available()
