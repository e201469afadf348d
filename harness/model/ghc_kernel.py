"""Autograd functions around the fused CPU GHC kernels (`csrc/ghc.cpp`, built by `cpu_kernels`).

`fused_read` and `fused_write` compute what `GeneralizedHyperConnection.read` / `.write` compute on
their reference path, each as one pass over its tensors forward and one backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from harness.model import cpu_kernels


class MixingParameters(NamedTuple):
    """What the kernels compute a GHC's coefficients from (see `fused_read`)."""

    static: torch.Tensor  # [A | Bᵀ] (n, 2m+n)
    proj: torch.Tensor | None  # W / τ (d_b, 2m+n); None for a static GHC
    scale: torch.Tensor | None  # S (n, 2m+n); None for a static GHC


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


cpu_kernels.on_build(_register_fake_kernels)


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
