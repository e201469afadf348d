"""Fused CPU kernels for the GHC read and write (fp32), from `csrc/ghc.cpp`, built on first use.

`fused_read` and `fused_write` compute what `GeneralizedHyperConnection.read` / `.write` compute on
their reference path, each as one pass over its tensors forward and one backward. The extension is
compiled with `-march=native` once per CPU type (the CPU's flags are part of its name, so a shared
cache on a cluster of mixed nodes keeps one build per type) into torch's extension cache
(`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions). If it cannot be built (no C++ compiler),
`available()` warns once with the reason and returns False, and the model uses the reference path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

SOURCE = Path(__file__).with_name("csrc") / "ghc.cpp"


class MixingParameters(NamedTuple):
    """What the kernels compute a GHC's coefficients from (see `fused_read`)."""

    static: torch.Tensor  # [A | Bᵀ] (n, 2m+n)
    proj: torch.Tensor | None  # W / τ (d_b, 2m+n); None for a static GHC
    scale: torch.Tensor | None  # S (n, 2m+n); None for a static GHC


def _cpu_tag() -> str:
    """A short hash of the CPU's instruction-set flags (Linux), so `-march=native` builds never cross CPU types."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith(("flags", "Features"))), "")
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


_built: bool | None = None  # None until the first `available()`


def _build() -> bool:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the `ninja` package's binary sits next to this Python, maybe not on PATH
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    try:
        cpp_extension.load(name=f"vwn_ghc_{_cpu_tag()}", sources=[str(SOURCE)], is_python_module=False,
                           extra_cflags=["-O3", "-march=native", "-fno-trapping-math", "-ffp-contract=fast",
                                         "-fopenmp"],
                           extra_ldflags=["-fopenmp"])
    except (RuntimeError, OSError) as error:  # no compiler, no ninja, a failed build
        warnings.warn(f"GHC kernels unavailable, using the slower reference path: {error}", stacklevel=3)
        return False
    _register_fake_kernels()
    return True


def available() -> bool:
    """Build (or load the cached build of) the extension on the first call; False, with one warning, if that fails."""
    global _built
    if _built is None:
        _built = _build()
    return _built


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels can take these operands: fp32 CPU tensors, and the extension builds.

    torch.compile cannot trace the build, so while compiling this reads the outcome of an earlier eager call
    (`LanguageModel.compile` makes one)."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    return bool(_built) if torch.compiler.is_compiling() else available()


def _register_fake_kernels() -> None:
    """Shapes of the ops' outputs, for torch.compile (which traces with fake tensors)."""

    def parameter_gradients(static, proj, scale):
        dynamic = proj is not None
        return (torch.empty_like(static), torch.empty_like(proj) if dynamic else static.new_empty(0),
                torch.empty_like(scale) if dynamic else static.new_empty(0))

    @torch.library.register_fake("vwn_ghc::read_forward")
    def _(h, static, proj, scale, m, eps):
        return h.new_empty(h.shape[0], m, h.shape[2])

    @torch.library.register_fake("vwn_ghc::read_backward")
    def _(h, static, proj, scale, eps, grad_x):
        return torch.empty_like(h), *parameter_gradients(static, proj, scale)

    @torch.library.register_fake("vwn_ghc::write_forward")
    def _(h, z, static, proj, scale, eps):
        return torch.empty_like(h)

    @torch.library.register_fake("vwn_ghc::write_backward")
    def _(h, z, static, proj, scale, eps, grad):
        return torch.empty_like(h), torch.empty_like(z), *parameter_gradients(static, proj, scale)


def _parameter_gradients(proj: torch.Tensor | None, grad_static: torch.Tensor, grad_proj: torch.Tensor,
                         grad_scale: torch.Tensor) -> tuple:
    """A static GHC (proj None) has no projection or scale: the ops return empty tensors for those."""
    return (grad_static, grad_proj, grad_scale) if proj is not None else (grad_static, None, None)


class _Read(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, static: torch.Tensor, proj: torch.Tensor | None, scale: torch.Tensor | None,
                m: int, eps: float) -> torch.Tensor:
        ctx.save_for_backward(h, static, proj, scale)
        ctx.eps = eps
        return torch.ops.vwn_ghc.read_forward(h, static, proj, scale, m, eps)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor) -> tuple:
        h, static, proj, scale = ctx.saved_tensors
        grad_h, *params = torch.ops.vwn_ghc.read_backward(h, static, proj, scale, ctx.eps, grad_x.contiguous())
        return grad_h, *_parameter_gradients(proj, *params), None, None


class _Write(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, z: torch.Tensor, static: torch.Tensor, proj: torch.Tensor | None,
                scale: torch.Tensor | None, eps: float) -> torch.Tensor:
        ctx.save_for_backward(h, z, static, proj, scale)
        ctx.eps = eps
        return torch.ops.vwn_ghc.write_forward(h, z, static, proj, scale, eps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        h, z, static, proj, scale = ctx.saved_tensors
        grad_h, grad_z, *params = torch.ops.vwn_ghc.write_backward(h, z, static, proj, scale, ctx.eps,
                                                                  grad.contiguous())
        return grad_h, grad_z, *_parameter_gradients(proj, *params), None


def _tokens_first(h: torch.Tensor) -> torch.Tensor:
    return h.reshape(-1, *h.shape[-2:]).contiguous()


def fused_read(h: torch.Tensor, static: torch.Tensor, proj: torch.Tensor | None, scale: torch.Tensor | None,
               m: int, eps: float) -> torch.Tensor:
    """State h (..., n, d_b) -> sublayer input x (..., m·d_b).

    static (n, 2m+n) = [A | Bᵀ]; proj W (d_b, 2m+n) with the temperature folded in and scale S (n, 2m+n),
    both None for a static GHC."""
    x = _Read.apply(_tokens_first(h), static.contiguous(), _maybe_contiguous(proj), _maybe_contiguous(scale), m, eps)
    return x.view(*h.shape[:-2], -1)


def fused_write(h: torch.Tensor, z: torch.Tensor, static: torch.Tensor, proj: torch.Tensor | None,
                scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    """State h (..., n, d_b) and sublayer output z (..., m·d_b) -> new state (..., n, d_b)."""
    d_slot = h.shape[-1]
    z = z.reshape(h.shape[:-2].numel(), -1, d_slot).contiguous()
    new = _Write.apply(_tokens_first(h), z, static.contiguous(), _maybe_contiguous(proj), _maybe_contiguous(scale),
                       eps)
    return new.view(h.shape)


def _maybe_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()
