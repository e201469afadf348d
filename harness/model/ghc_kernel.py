"""Autograd functions around the fused CPU GHC kernels (`csrc/ghc.cpp`, built by `cpu_kernels`).

The kernels keep the GHC state in lane tiles (`LaneTiles`): sixteen tokens per tile, one per vector lane, so
that no op transposes the state; `to_tiles` and `from_tiles` convert at the ends of a stack of GHC-wrapped
blocks. `fused_read` and `fused_write` compute what `GeneralizedHyperConnection.read` / `.write` compute on
their reference path, each as one pass over its tensors forward and one backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from harness.model import cpu_kernels

LANES = 16  # tokens per tile


class MixingParameters(NamedTuple):
    """What the kernels compute a GHC's coefficients from (see `fused_read`)."""

    static: torch.Tensor  # [A | Bᵀ] (n, 2m+n)
    proj: torch.Tensor | None  # W / τ (d_b, 2m+n); None for a static GHC
    scale: torch.Tensor | None  # S (n, 2m+n); None for a static GHC


class LaneTiles(NamedTuple):
    """A state (B, T, n, d_b) as the kernels keep it: tile t of `data` (⌈B·T / 16⌉, n, d_b, 16) holds tokens
    16t .. 16t + 15 of the flattened batch, token 16t + l in lane l; lanes past the last token are zero."""

    data: torch.Tensor
    shape: torch.Size  # (B, T, n, d_b)


def _register_fake_kernels() -> None:
    """Shapes of the ops' outputs, for torch.compile (which traces with fake tensors)."""

    def parameter_gradients(static, proj, scale):
        dynamic = proj is not None
        return (torch.empty_like(static), torch.empty_like(proj) if dynamic else static.new_empty(0),
                torch.empty_like(scale) if dynamic else static.new_empty(0))

    @torch.library.register_fake("vwn_ghc::to_tiles")
    def _(x):
        return x.new_empty(-(-x.shape[0] // LANES), x.shape[1], x.shape[2], LANES)

    @torch.library.register_fake("vwn_ghc::from_tiles")
    def _(tiles, tokens):
        return tiles.new_empty(tokens, tiles.shape[1], tiles.shape[2])

    @torch.library.register_fake("vwn_ghc::read_forward")
    def _(h, static, proj, scale, m, tokens, eps):
        return h.new_empty(tokens, m, h.shape[2])

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


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous and on a 64-byte boundary, as the kernels load whole tiles (torch's CPU allocator aligns to 64;
    only views at an offset need the copy)."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


class _ToTiles(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.tokens = x.shape[0]
        return torch.ops.vwn_ghc.to_tiles(x.contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.ops.vwn_ghc.from_tiles(_aligned(grad), ctx.tokens)


class _FromTiles(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tiles: torch.Tensor, tokens: int) -> torch.Tensor:
        return torch.ops.vwn_ghc.from_tiles(_aligned(tiles), tokens)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.ops.vwn_ghc.to_tiles(grad.contiguous()), None


def to_tiles(h: torch.Tensor) -> LaneTiles:
    """h (B, T, n, d_b), fp32 on CPU -> its lane tiles."""
    return LaneTiles(_ToTiles.apply(h.reshape(-1, *h.shape[-2:])), h.shape)


def from_tiles(state: LaneTiles) -> torch.Tensor:
    """Lane tiles -> the state (B, T, n, d_b)."""
    return _FromTiles.apply(state.data, state.shape[:-2].numel()).view(state.shape)


class _Read(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, static: torch.Tensor, proj: torch.Tensor | None, scale: torch.Tensor | None,
                m: int, tokens: int, eps: float) -> torch.Tensor:
        ctx.save_for_backward(h, static, proj, scale)
        ctx.eps = eps
        return torch.ops.vwn_ghc.read_forward(h, static, proj, scale, m, tokens, eps)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor) -> tuple:
        h, static, proj, scale = ctx.saved_tensors
        grad_h, *params = torch.ops.vwn_ghc.read_backward(h, static, proj, scale, ctx.eps, grad_x.contiguous())
        return grad_h, *_parameter_gradients(proj, *params), None, None, None


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
        grad_h, grad_z, *params = torch.ops.vwn_ghc.write_backward(h, z, static, proj, scale, ctx.eps, _aligned(grad))
        return grad_h, grad_z, *_parameter_gradients(proj, *params), None


def fused_read(h: LaneTiles, static: torch.Tensor, proj: torch.Tensor | None, scale: torch.Tensor | None,
               m: int, eps: float) -> torch.Tensor:
    """State h (lane tiles of (..., n, d_b)) -> sublayer input x (..., m·d_b).

    static (n, 2m+n) = [A | Bᵀ]; proj W (d_b, 2m+n) with the temperature folded in and scale S (n, 2m+n),
    both None for a static GHC."""
    tokens = h.shape[:-2].numel()
    x = _Read.apply(_aligned(h.data), static.contiguous(), _maybe_contiguous(proj), _maybe_contiguous(scale), m,
                    tokens, eps)
    return x.view(*h.shape[:-2], -1)


def fused_write(h: LaneTiles, z: torch.Tensor, static: torch.Tensor, proj: torch.Tensor | None,
                scale: torch.Tensor | None, eps: float) -> LaneTiles:
    """State h (lane tiles of (..., n, d_b)) and sublayer output z (..., m·d_b) -> new state, as lane tiles."""
    z = z.reshape(h.shape[:-2].numel(), -1, h.shape[-1]).contiguous()
    new = _Write.apply(_aligned(h.data), z, static.contiguous(), _maybe_contiguous(proj), _maybe_contiguous(scale),
                       eps)
    return LaneTiles(new, h.shape)


def _maybe_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()
