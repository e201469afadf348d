"""Generalized Hyper-Connections (GHC) and their dynamic form (DGHC), VWN paper §3-4.

The over-width state carried between sublayers is H with shape (batch, seq, n, d_b): n slots of
width d_b = D/m. Around one sublayer T (pre-norm attention or FFN at width D):

    X  = Åᵀ H            (m, d_b) -> flattened to x of width D      [read]
    z  = T(x)            width D -> Z of shape (m, d_b)
    H⁺ = Bᵀ Z + Âᵀ H     (n, d_b)                                   [write + carry]

with A = [Å | Â] of shape (n, m+n) and B of shape (m, n); one scalar per (slot, segment), shared by
the d_b channels of a segment. DGHC adds token-dependent terms computed from a per-slot RMSNorm
of H (fp32, temperature τ = √d_b):

    𝓐(H) = S_α ∘ tanh(H̄ W_α / τ) + A          (n, m+n); row i depends on slot i only
    𝓑(H) = (S_β ∘ tanh(H̄ W_β / τ))ᵀ + B        (m, n); column j depends on slot j only

(1, 1) is the plain residual connection (x = H, H⁺ = H + z) and carries no parameters: with a
single slot there is nothing to mix, so the baseline is this module's degenerate case, not a
separate model.

On CPU in fp32, read and write run as fused C++ kernels (`ghc_kernel`: a vector register's lanes of tokens at
a time, one per lane, each tile's coefficients recomputed in cache instead of stored), and a write with the
next GHC's read as one (`run_stack`). They take the state in lane tiles, which `tile_state` makes at the
start of a stack of blocks and `untile_state` undoes at its end; given a plain tensor, read and write run
the torch code below, which serves every other dtype and device and is the tests' reference for the
kernels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from harness.model import cpu_kernels, ghc_kernel
from harness.model.norm import layer_norm

Mixing = tuple[torch.Tensor, torch.Tensor] | ghc_kernel.MixingParameters  # what `read` hands to `write`
State = torch.Tensor | ghc_kernel.LaneTiles  # the state between sublayers: (B, T, n, d_b), or its lane tiles


def takes_lane_tiles(h: torch.Tensor) -> bool:
    """Whether the GHCs keep a state like h (B, T, n, d_b) in lane tiles: fp32 on CPU with the fused kernels built,
    more than one slot."""
    return h.shape[-2] > 1 and cpu_kernels.applies(h)


def tile_state(h: torch.Tensor) -> State:
    """h (B, T, n, d_b) in the layout the GHCs will take it in: lane tiles if `takes_lane_tiles`, so that no GHC op
    transposes it; h itself otherwise."""
    return ghc_kernel.to_tiles(h) if takes_lane_tiles(h) else h


def untile_state(state: State) -> torch.Tensor:
    """The state as (B, T, n, d_b), whichever layout it is in."""
    return ghc_kernel.from_tiles(state) if isinstance(state, ghc_kernel.LaneTiles) else state


def group_normalized(state: State, groups: int, eps: float) -> torch.Tensor:
    """The state (B, T, n, d_b), or its lane tiles, as (B, T, groups, n·d_b / groups): each token's channels
    layer-normalised (no affine) in `groups` equal groups, GroupNorm's normalisation. From lane tiles, the untiling
    and the norm are one pass each way."""
    if isinstance(state, ghc_kernel.LaneTiles):
        return ghc_kernel.untiled_group_norm(state, groups, eps)
    return layer_norm(state.flatten(-2).unflatten(-1, (groups, -1)), eps)


def initial_mixing(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's initialisation: A = [Å | Â] with Å = [I_m; 0], Â = I_n, and cyclic B[i, j] = [i == j mod m].

    Returns A of shape (n, m+n) and B of shape (m, n). With these, slots 0..m-1 form an ordinary
    pre-norm residual stream of width D and slots m..n-1 receive copies of the sublayer output.
    """
    read = torch.zeros(n, m)
    read[:m] = torch.eye(m)
    a = torch.cat([read, torch.eye(n)], dim=1)
    b = torch.zeros(m, n)
    b[torch.arange(n) % m, torch.arange(n)] = 1.0
    return a, b


class _DynamicMixing(torch.autograd.Function):
    """Static + S ∘ tanh(rstd(H) · H W): the DGHC coefficients of every slot, (..., n, d_b) -> (..., n, k).

    NOTE: RMSNorm(H) W = diag(rstd) (H W): the per-slot scale is applied to the (n, k) projection, the
    normalised state is never materialised; and the backward is written out (autograd's, through
    vector_norm, tanh and the broadcasts, makes about twice the passes over (tokens, n, k) and
    (tokens, n, d_b); one GHC read + write, forward + backward at (2, 16), 2048 tokens: 8.8 -> 6.5 ms):
        g_pre = tanh'(g ∘ S),  g_HW = g_pre · rstd,  g_rstd = Σ_k g_pre ∘ HW
        g_H = g_HW Wᵀ − g_rstd · rstd³ / d_b · H,      g_W = Σ_tokens Hᵀ g_HW"""

    @staticmethod
    def forward(ctx, h: torch.Tensor, proj: torch.Tensor, scale: torch.Tensor, static: torch.Tensor,
                eps: float) -> torch.Tensor:
        """h (..., n, d_b), proj W (d_b, k) (temperature included), scale S and static (n, k) -> (..., n, k)."""
        mean_square = torch.linalg.vector_norm(h, dim=-1, keepdim=True).square_().div_(h.shape[-1])
        rstd = torch.rsqrt(mean_square.add_(eps))  # (..., n, 1)
        pre = (h @ proj).mul_(rstd)
        activation = torch.tanh(pre)
        ctx.save_for_backward(h, proj, scale, rstd, pre, activation)
        return torch.addcmul(static, scale, activation)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, proj, scale, rstd, pre, activation = ctx.saved_tensors
        grad_static = grad.flatten(0, -3).sum(0)
        grad_scale = (grad * activation).flatten(0, -3).sum(0)
        grad_pre = torch.ops.aten.tanh_backward(grad * scale, activation)
        grad_rstd = (grad_pre * pre).sum(dim=-1, keepdim=True).div_(rstd)  # pre / rstd = H W
        grad_hw = grad_pre.mul_(rstd)
        grad_proj = h.flatten(0, -2).T @ grad_hw.flatten(0, -2)
        grad_h = grad_hw @ proj.T
        grad_h.addcmul_(h, grad_rstd.mul_(rstd.pow(3)), value=-1.0 / h.shape[-1])
        return grad_h, grad_proj, grad_scale, grad_static, None


class GeneralizedHyperConnection(nn.Module):
    """Static or dynamic GHC around one sublayer; `read` before it, `write` after it."""

    def __init__(self, d_model: int, m: int, n: int, dynamic: bool, eps: float = 1e-6) -> None:
        super().__init__()
        self.m, self.n, self.d_slot = m, n, d_model // m
        self.is_residual = m == n == 1
        self.dynamic = dynamic and not self.is_residual
        self.eps = eps
        if self.is_residual:
            return
        a, b = initial_mixing(m, n)
        self.static_a = nn.Parameter(a)  # A = [Å | Â], (n, m+n)
        self.static_b = nn.Parameter(b)  # B, (m, n)
        if self.dynamic:
            # NOTE: W_α (d_b, m+n) and W_β (d_b, m) are stored side by side as one (d_b, 2m+n) matrix so
            # all coefficients of a slot come from one matmul; likewise S_α (n, m+n) and S_βᵀ (n, m).
            self.coeff_proj = nn.Parameter(torch.zeros(self.d_slot, 2 * m + n))
            self.coeff_scale = nn.Parameter(torch.ones(n, 2 * m + n))
        self.temperature = math.sqrt(self.d_slot)

    def kernel_parameters(self) -> ghc_kernel.MixingParameters:
        """The parameters as the fused kernels take them: as they are, the kernels build [A | Bᵀ] and W / τ."""
        proj, scale = (self.coeff_proj, self.coeff_scale) if self.dynamic else (None, None)
        return ghc_kernel.MixingParameters(self.static_a, self.static_b, proj, scale, self.temperature)

    def mixing(self, h: torch.Tensor) -> torch.Tensor:
        """All mixing coefficients for state h (..., n, d_b), in fp32 or wider: (..., n, 2m+n), where row i holds
        [A[i, :] | B[:, i]], everything that depends on slot i. Static GHC returns the (n, 2m+n) parameters."""
        static = torch.cat([self.static_a, self.static_b.T], dim=1)
        if not self.dynamic:
            return static
        with torch.autocast(h.device.type, enabled=False):  # coefficient maths in fp32, even under autocast
            h = h.to(torch.promote_types(h.dtype, torch.float32))
            return _DynamicMixing.apply(h, self.coeff_proj / self.temperature, self.coeff_scale, static, self.eps)

    def read(self, h: State) -> tuple[torch.Tensor, Mixing | None]:
        """h (batch, seq, n, d_b) or its lane tiles -> sublayer input x (batch, seq, D), and what `write` needs: the
        carry and Bᵀ, or, for lane tiles (the fused kernels), the parameters they recompute the coefficients from."""
        if isinstance(h, ghc_kernel.LaneTiles):
            parameters = self.kernel_parameters()
            return ghc_kernel.fused_read(h, parameters, self.eps), parameters
        if self.is_residual:
            return h.flatten(-2), None
        a, b_t = self.mixing(h).to(h.dtype).split([self.m + self.n, self.m], dim=-1)  # A, Bᵀ
        # NOTE: read and carry in one contraction, Aᵀ H = [Åᵀ H ; Âᵀ H] of (m+n, d_b) per token: one
        # batched matmul instead of two, and split views (backward: one cat) instead of slices.
        x, carry = (a.transpose(-1, -2) @ h).split([self.m, self.n], dim=-2)
        return x.flatten(-2), (carry, b_t)

    def write(self, h: State, z: torch.Tensor, mix: Mixing | None) -> State:
        """State h (batch, seq, n, d_b) or its lane tiles and sublayer output z (batch, seq, D) -> new state, in h's
        layout."""
        if isinstance(h, ghc_kernel.LaneTiles):
            return ghc_kernel.fused_write(h, z.to(h.data.dtype), mix, self.eps)
        if self.is_residual:
            return h + z.view_as(h)
        carry, b_t = mix  # Âᵀ H (batch, seq, n, d_b); Bᵀ (batch, seq, n, m), or (n, m) if static
        tokens = carry.shape[:-2]
        b_t = b_t.expand(*tokens, self.n, self.m).flatten(0, -3)
        # Âᵀ H + Bᵀ Z in one baddbmm over the flattened tokens: the sum accumulates in the product's output
        new = torch.baddbmm(carry.flatten(0, -3), b_t, z.reshape(-1, self.m, self.d_slot))
        return new.view(*tokens, self.n, self.d_slot)

    def write_then_read(self, h: State, z: torch.Tensor, mix: Mixing | None, following: GeneralizedHyperConnection
                        ) -> tuple[State, tuple[torch.Tensor, Mixing | None]]:
        """`write`, then `following.read` of the new state: its state and (x, mix). One fused op for lane tiles."""
        if isinstance(h, ghc_kernel.LaneTiles):
            parameters = following.kernel_parameters()
            state, x = ghc_kernel.fused_write_read(h, z.to(h.data.dtype), mix, self.eps, parameters, following.eps)
            return state, (x, parameters)
        state = self.write(h, z, mix)
        return state, following.read(state)


Sublayer = Callable[[torch.Tensor], torch.Tensor]  # x (batch, seq, D) -> z (batch, seq, D)


def run_stack(h: State, stack: Sequence[tuple[GeneralizedHyperConnection, Sublayer]]) -> State:
    """The state through each (GHC, sublayer) in turn: read, sublayer, write. Each write and the next GHC's read go
    together (`write_then_read`), which on lane tiles is one op."""
    x, mix = stack[0][0].read(h)
    for (connection, sublayer), (following, _) in itertools.pairwise(stack):
        h, (x, mix) = connection.write_then_read(h, sublayer(x), mix, following)
    connection, sublayer = stack[-1]
    return connection.write(h, sublayer(x), mix)
