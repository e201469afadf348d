"""RMSNorm with a hand-written backward pass.

    y = x̂ · w,   x̂ = x · rstd,   rstd = 1 / √(mean(x²) + ε)          over the last dimension

    dx = rstd · (ĝ − x̂ · mean(ĝ · x̂)),   ĝ = g · w;      dw = Σ_rows g · x̂

torch's CPU RMSNorm has a fused forward kernel (`_fused_rms_norm`) but no backward kernel: autograd
differentiates its decomposition, about fifteen elementwise passes. The backward above is a handful.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        x_hat = x * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x_hat).flatten(0, -2).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_hat = grad * weight
            dot = (grad_hat * x_hat).mean(dim=-1, keepdim=True)
            grad_x = torch.addcmul(grad_hat, x_hat, dot, value=-1).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D)."""
    if x.device.type != "cpu":
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # fused forward and backward kernels there
    return _RMSNorm.apply(x, weight, eps)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state dict) over the last dimension, through `rms_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
