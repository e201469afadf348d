"""The fused CPU GHC kernels (`csrc/ghc.cpp`, with autograd from `csrc/ghc_autograd.cpp`, built by `cpu_kernels`).

The kernels keep the GHC state in lane tiles (`LaneTiles`): one token per lane of the CPU's vector registers
(16 on AVX-512, 8 on AVX2; `lanes()`), so that no op transposes the state; `to_tiles` and `from_tiles` convert
at the ends of a stack of GHC-wrapped blocks. `fused_read` and `fused_write` compute what
`GeneralizedHyperConnection.read` / `.write` compute on their reference path, `fused_write_read` a write and the
next GHC's read of the state it wrote, and `fused_mtp_merge` what `MultiTokenPredictor.merged` does (from and to
lane tiles), each as one pass over its tensors forward and one backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from harness.model import cpu_kernels
from harness.model.norm import layer_norm_of_tiles


class MixingParameters(NamedTuple):
    """What the kernels compute a GHC's coefficients from, as its module holds them (see `fused_read`)."""

    static_a: torch.Tensor  # A = [Å | Â] (n, m+n)
    static_b: torch.Tensor  # B (m, n)
    proj: torch.Tensor | None  # W (d_b, 2m+n); None for a static GHC
    scale: torch.Tensor | None  # S (n, 2m+n); None for a static GHC
    temperature: float  # τ, which W is divided by


class LaneTiles(NamedTuple):
    """A state (B, T, n, d_b) as the kernels keep it: tile t of `data` (⌈B·T / L⌉, n, d_b, L), L = `lanes()`,
    holds tokens Lt .. Lt + L - 1 of the flattened batch, token Lt + l in lane l; lanes past the last token are
    zero."""

    data: torch.Tensor
    shape: torch.Size  # (B, T, n, d_b)


def lanes() -> int:
    """Tokens per lane tile: the lanes of one vector register of floats on the CPU the kernels were built for."""
    return torch.ops.vwn_ghc.lanes()


def _register_fake_kernels() -> None:
    """Shapes of the ops' outputs, for torch.compile (which traces with fake tensors)."""
    lane_count = lanes()

    def projection_gradients(a, proj, scale):
        dynamic = proj is not None
        return (torch.empty_like(proj) if dynamic else a.new_empty(0),
                torch.empty_like(scale) if dynamic else a.new_empty(0))

    @torch.library.register_fake("vwn_ghc::to_tiles")
    def _(x):
        return x.new_empty(-(-x.shape[0] // lane_count), x.shape[1], x.shape[2], lane_count)

    @torch.library.register_fake("vwn_ghc::mtp_merge_forward")
    def _(hidden, embed, gamma_h, gamma_e, weight, eps):
        rstd = embed.new_empty(embed.shape[0])
        return torch.empty_like(hidden), rstd, torch.empty_like(rstd)

    @torch.library.register_fake("vwn_ghc::mtp_merge_backward")
    def _(grad, hidden, embed, gamma_h, gamma_e, weight, rstd_h, rstd_e):
        return (torch.empty_like(hidden), torch.empty_like(embed), torch.empty_like(gamma_h),
                torch.empty_like(gamma_e), torch.empty_like(weight))

    @torch.library.register_fake("vwn_ghc::from_tiles")
    def _(tiles, tokens):
        return tiles.new_empty(tokens, tiles.shape[1], tiles.shape[2])

    @torch.library.register_fake("vwn_ghc::read_forward")
    def _(h, a, b, proj, scale, temperature, tokens, eps):
        return h.new_empty(tokens, b.shape[0], h.shape[2])

    @torch.library.register_fake("vwn_ghc::read_backward")
    def _(h, a, b, proj, scale, temperature, eps, grad_x):
        return torch.empty_like(h), torch.empty_like(a), *projection_gradients(a, proj, scale)

    @torch.library.register_fake("vwn_ghc::write_forward")
    def _(h, z, a, b, proj, scale, temperature, eps):
        return torch.empty_like(h)

    @torch.library.register_fake("vwn_ghc::write_backward")
    def _(h, z, a, b, proj, scale, temperature, eps, grad):
        return (torch.empty_like(h), torch.empty_like(z), torch.empty_like(a), torch.empty_like(b),
                *projection_gradients(a, proj, scale))

    @torch.library.register_fake("vwn_ghc::write_read_forward")
    def _(h, z, a, b, proj, scale, temperature, eps, next_a, next_b, next_proj, next_scale, next_temperature,
          next_eps):
        return torch.empty_like(h), torch.empty_like(z)

    @torch.library.register_fake("vwn_ghc::write_read_backward")
    def _(h, z, out, a, b, proj, scale, temperature, eps, next_a, next_b, next_proj, next_scale, next_temperature,
          next_eps, grad_out, grad_x):
        return (torch.empty_like(h), torch.empty_like(z), torch.empty_like(a), torch.empty_like(b),
                *projection_gradients(a, proj, scale), torch.empty_like(next_a),
                *projection_gradients(next_a, next_proj, next_scale))


cpu_kernels.on_build(_register_fake_kernels)


def to_tiles(h: torch.Tensor) -> LaneTiles:
    """h (B, T, n, d_b), fp32 on CPU -> its lane tiles."""
    return LaneTiles(torch.ops.vwn_ghc.tile(h.reshape(-1, *h.shape[-2:])), h.shape)


def from_tiles(state: LaneTiles) -> torch.Tensor:
    """Lane tiles -> the state (B, T, n, d_b)."""
    return torch.ops.vwn_ghc.untile(state.data, state.shape[:-2].numel()).view(state.shape)


def fused_read(h: LaneTiles, parameters: MixingParameters, eps: float) -> torch.Tensor:
    """State h (lane tiles of (..., n, d_b)) -> sublayer input x (..., m·d_b)."""
    x = torch.ops.vwn_ghc.read(h.data, *parameters, h.shape[:-2].numel(), eps)
    return x.view(*h.shape[:-2], -1)


def _slot_rows(z: torch.Tensor, h: LaneTiles) -> torch.Tensor:
    """Sublayer output z (..., m·d_b) as the ops take it: (tokens, m, d_b), contiguous."""
    return z.reshape(h.shape[:-2].numel(), -1, h.shape[-1]).contiguous()


def fused_write(h: LaneTiles, z: torch.Tensor, parameters: MixingParameters, eps: float) -> LaneTiles:
    """State h (lane tiles of (..., n, d_b)) and sublayer output z (..., m·d_b) -> new state, as lane tiles."""
    return LaneTiles(torch.ops.vwn_ghc.write(h.data, _slot_rows(z, h), *parameters, eps), h.shape)


def fused_write_read(h: LaneTiles, z: torch.Tensor, parameters: MixingParameters, eps: float,
                     next_parameters: MixingParameters, next_eps: float) -> tuple[LaneTiles, torch.Tensor]:
    """`fused_write`, then the next GHC's `fused_read` of the new state, as one op: the new state's tiles pass through
    the cache once each way, and its two gradients (the next write's and the next read's) are summed tile by tile."""
    out, x = torch.ops.vwn_ghc.write_read(h.data, _slot_rows(z, h), *parameters, eps, *next_parameters, next_eps)
    return LaneTiles(out, h.shape), x.view(*h.shape[:-2], -1)


def fused_mtp_merge(hidden: LaneTiles, embed: torch.Tensor, gamma_h: torch.Tensor, gamma_e: torch.Tensor,
                    weight: torch.Tensor, eps: float) -> LaneTiles:
    """The MTP module's merge, lane tiles to lane tiles: hidden (lane tiles of (..., n, d_b)), embed (..., n, d_b) ->
    RMSNorm(hidden) ∘ γ_h and RMSNorm(embed) ∘ γ_e over each token's n·d_b channels, then W [Ĥ[i] ; Ê[i]] for every
    slot i, W (d_b, 2 d_b)."""
    embed = embed.reshape(-1, *embed.shape[-2:]).contiguous()
    merged = torch.ops.vwn_ghc.mtp_merge(hidden.data, embed, gamma_h.contiguous(), gamma_e.contiguous(),
                                         weight.contiguous(), eps)
    return LaneTiles(merged, hidden.shape)


def untiled_group_norm(state: LaneTiles, groups: int, eps: float) -> torch.Tensor:
    """The state (..., n, d_b) from its lane tiles, each token's n·d_b channels layer-normalised (no affine) in
    `groups` equal groups, as (..., groups, n·d_b / groups): one pass each way (`layer_norm_of_tiles`)."""
    y = layer_norm_of_tiles(state.data, state.shape[:-2].numel(), groups, eps)
    return y.view(*state.shape[:-2], groups, -1)
