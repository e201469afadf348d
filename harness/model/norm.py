"""RMSNorm with a hand-written backward pass.

    y = x̂ · w,   x̂ = x · rstd,   rstd = 1 / √(mean(x²) + ε)          over the last dimension

    dx = rstd · (ĝ − x̂ · mean(ĝ · x̂)),   ĝ = g · w;      dw = Σ_rows g · x̂

torch's CPU RMSNorm has a fused forward kernel (`_fused_rms_norm`) but no backward kernel: autograd
differentiates its decomposition, about fifteen elementwise passes. Here the backward makes four
passes over (rows, D) and two matrix-vector products (forward + backward at 2048 rows, 2 threads:
D = 64 0.42 -> 0.31 ms, D = 512 3.11 -> 1.89 ms). In fp32 on CPU both passes are fused C++ ops
(`csrc/rms_norm.cpp`, one pass over the rows each way); the torch code serves other dtypes and is the tests'
reference for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.model import cpu_kernels


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        dtype = x.dtype
        compute = torch.promote_types(dtype, torch.float32)
        x, grad = x.to(compute), grad.to(compute)
        # NOTE: both reductions are products with the rows of g ∘ x (one pass), as matrix-vector products:
        #   dw = Σ_rows rstd · (g ∘ x),     rstd · mean(ĝ · x̂) = rstd³ · (g ∘ x) w / D
        grad_times_x = (grad * x).flatten(0, -2)  # (rows, D)
        rstd_rows = rstd.flatten().to(compute)
        grad_weight = (rstd_rows @ grad_times_x).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = weight.to(compute)
            coefficient = (grad_times_x @ weight).mul_(rstd_rows.pow(3)).div_(-x.shape[-1])
            grad_x = (grad * weight).mul_(rstd).addcmul_(x, coefficient.view_as(rstd)).to(dtype)
        return grad_x, grad_weight, None


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out, rstd = torch.ops.vwn_norm.rms_norm_forward(rows, weight.contiguous(), eps)
        ctx.save_for_backward(rows, weight, rstd)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        rows, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = torch.ops.vwn_norm.rms_norm_backward(grad.reshape(rows.shape).contiguous(), rows,
                                                                   weight.contiguous(), rstd)
        return grad_x.view(grad.shape), grad_weight, None


class _FusedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = torch.ops.vwn_layer_norm.layer_norm_forward(x.reshape(-1, x.shape[-1]).contiguous(), eps)
        ctx.save_for_backward(out, rstd)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out, rstd = ctx.saved_tensors
        grad_x = torch.ops.vwn_layer_norm.layer_norm_backward(grad.reshape(out.shape).contiguous(), out, rstd)
        return grad_x.view(grad.shape), None


class _FusedTilesLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tiles: torch.Tensor, tokens: int, groups: int, eps: float) -> torch.Tensor:
        out, rstd = torch.ops.vwn_layer_norm.tiles_layer_norm_forward(tiles, tokens, groups, eps)
        ctx.save_for_backward(out, rstd)
        ctx.slots = tiles.shape[1]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out, rstd = ctx.saved_tensors
        grad_tiles = torch.ops.vwn_layer_norm.tiles_layer_norm_backward(grad.contiguous(), out, rstd, ctx.slots)
        return grad_tiles, None, None, None


def _register_fake_kernels() -> None:
    @torch.library.register_fake("vwn_norm::rms_norm_forward")
    def _(x, weight, eps):
        return torch.empty_like(x), x.new_empty(x.shape[0])

    @torch.library.register_fake("vwn_norm::rms_norm_backward")
    def _(grad, x, weight, rstd):
        return torch.empty_like(x), torch.empty_like(weight)

    @torch.library.register_fake("vwn_layer_norm::layer_norm_forward")
    def _(x, eps):
        return torch.empty_like(x), x.new_empty(x.shape[0])

    @torch.library.register_fake("vwn_layer_norm::layer_norm_backward")
    def _(grad, out, rstd):
        return torch.empty_like(out)

    @torch.library.register_fake("vwn_layer_norm::tiles_layer_norm_forward")
    def _(tiles, tokens, groups, eps):
        return tiles.new_empty(tokens, tiles.shape[1] * tiles.shape[2]), tiles.new_empty(tokens * groups)

    @torch.library.register_fake("vwn_layer_norm::tiles_layer_norm_backward")
    def _(grad, out, rstd, slots):
        lanes = torch.ops.vwn_ghc.lanes()
        return out.new_empty(-(-out.shape[0] // lanes), slots, out.shape[1] // slots, lanes)


cpu_kernels.on_build(_register_fake_kernels)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D); eps None is torch's default, the dtype's machine epsilon."""
    if x.device.type != "cpu":
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # fused forward and backward kernels there
    if cpu_kernels.applies(x, weight):
        return _FusedRMSNorm.apply(x, weight, torch.finfo(x.dtype).eps if eps is None else eps)  # torch's default
    return _RMSNorm.apply(x, weight, eps)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state dict) over the last dimension, through `rms_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., G) normalised over its last dimension, without affine: F.layer_norm(x, (G,), eps=eps); in fp32 on
    CPU the fused ops of `csrc/layer_norm.cpp` (the reduce head's GroupNorm, groups of 64 channels at the tiny
    config, forward + backward: see the kernel's header)."""
    if cpu_kernels.applies(x):
        return _FusedLayerNorm.apply(x, eps)
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def layer_norm_of_tiles(tiles: torch.Tensor, tokens: int, groups: int, eps: float) -> torch.Tensor:
    """Lane tiles (⌈T / L⌉, n, d, L) of T tokens' (n, d) rows (`ghc_kernel.LaneTiles`) -> those rows, each token's n·d
    channels `layer_norm`ed in `groups` equal groups, (T, n·d): the conversion from tiles and the norm in one pass
    each way (`csrc/layer_norm.cpp`); fp32 on CPU with the kernels built."""
    return _FusedTilesLayerNorm.apply(tiles, tokens, groups, eps)
