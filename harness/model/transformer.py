"""The VWN language model: over-width embedding -> GHC-wrapped pre-norm MoE transformer -> reduce head.

Shapes: B batch, T sequence, D = d_model (backbone width), m/n the virtual width pair,
d_b = D/m the slot width, D' = n·d_b the over-width state, V the vocabulary.

    tokens (B, T) -> WideEmbedding -> H (B, T, n, d_b)
      -> n_layers × Block: GHC(attention), GHC(FFN)      (sublayers run at width D)
      -> ReduceHead: GroupNorm (groups of size D) -> Linear D'->D -> RMSNorm -> LM head (B, T, V)
    MTP (optional, depth 1): [H-Norm(H_t) ; E-Norm(E(token_{t+1}))] per slot -> shared Linear(2·d_b -> d_b)
      -> one Block -> its own ReduceHead -> shared LM head: logits for token t+2 at position t.

With virtual_width (1, 1) every GHC is the plain residual connection and the reduce head is just
the final RMSNorm, so the baseline is the ordinary pre-norm transformer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from harness.model import cpu_kernels, ghc_kernel
from harness.model.config import ModelConfig
from harness.model.gemm import Linear, linear
from harness.model.ghc import (
    GeneralizedHyperConnection,
    State,
    Sublayer,
    group_normalized,
    run_stack,
    tile_state,
    untile_state,
)
from harness.model.loss import linear_cross_entropy
from harness.model.moe import MixtureOfExperts, RouterStats, SwiGLU
from harness.model.norm import RMSNorm


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position tables of shape (seq_len, head_dim) in the layout of `apply_rotary`:
    [cos | cos] and [-sin | sin] of the angles position · θ^(-2i/head_dim), i < head_dim/2."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, head_dim) by position, halves layout (GPT-NeoX style):
    (x1, x2) -> (x1·cos - x2·sin, x2·cos + x1·sin), as x·[cos | cos] + (x2, x1)·[-sin | sin]."""
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).type_as(x)


class _FusedAttention(torch.autograd.Function):
    """Rotary + causal attention from the qkv projection (B, T, 3D) to (B, T, D): `csrc/attention.cpp`."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
        qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
        y, lse = torch.ops.vwn_attn.attention_forward(qkv, cos, sin, heads)
        ctx.save_for_backward(qkv, cos, sin, y, lse)
        ctx.heads = heads
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        qkv, cos, sin, y, lse = ctx.saved_tensors
        grad_qkv = torch.ops.vwn_attn.attention_backward(grad.contiguous(), qkv, cos, sin, y, lse, ctx.heads)
        return grad_qkv, None, None, None


def _register_fake_kernels() -> None:
    @torch.library.register_fake("vwn_attn::attention_forward")
    def _(qkv, cos, sin, heads):
        batch, positions, width = qkv.shape
        return qkv.new_empty(batch, positions, width // 3), qkv.new_empty(batch, heads, positions)

    @torch.library.register_fake("vwn_attn::attention_backward")
    def _(grad_y, qkv, cos, sin, y, lse, heads):
        return torch.empty_like(qkv)


cpu_kernels.on_build(_register_fake_kernels)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions, at width D."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = Linear(d_model, 3 * d_model)
        self.out = Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). In fp32 on CPU with heads of a multiple of 8 channels, rotary and attention
        are one fused op each way (`csrc/attention.cpp`); the torch code below serves everything else."""
        qkv = self.qkv(x)
        if qkv.shape[-1] // (3 * self.n_heads) % 8 == 0 and cpu_kernels.applies(qkv):
            return self.out(_FusedAttention.apply(qkv, *rope, self.n_heads))
        qk, v = qkv.unflatten(-1, (3, self.n_heads, -1)).permute(2, 0, 3, 1, 4).split([2, 1])
        q, k = apply_rotary(qk, *rope).unbind()  # one rotation for both, each (B, heads, T, hd)
        v = v.squeeze(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).flatten(-2))


class Block(nn.Module):
    """One VWN layer: GHC around pre-norm attention, GHC around pre-norm FFN (MoE or dense)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, m, n = config.d_model, config.m, config.n
        self.attn_connection = GeneralizedHyperConnection(d, m, n, config.dynamic, config.norm_eps)
        self.attn_norm = RMSNorm(d, eps=config.norm_eps)
        self.attn = Attention(d, config.n_heads)
        self.ffn_connection = GeneralizedHyperConnection(d, m, n, config.dynamic, config.norm_eps)
        self.ffn_norm = RMSNorm(d, eps=config.norm_eps)
        if config.n_experts > 0:
            self.ffn = MixtureOfExperts(d, config.d_ff, config.n_experts, config.top_k,
                                        config.n_shared_experts, config.aux_free_balancing,
                                        config.bias_update_rate)
        else:
            self.ffn = SwiGLU(d, config.d_ff)

    def stack(self, rope: tuple[torch.Tensor, torch.Tensor], stats: list[RouterStats | None]
              ) -> list[tuple[GeneralizedHyperConnection, Sublayer]]:
        """The block as (GHC, sublayer) pairs for `ghc.run_stack`; the FFN appends its router terms (None if dense) to
        `stats` when it runs."""
        def ffn(x: torch.Tensor) -> torch.Tensor:
            y, layer_stats = self.ffn(self.ffn_norm(x))
            stats.append(layer_stats)
            return y

        return [(self.attn_connection, lambda x: self.attn(self.attn_norm(x), rope)), (self.ffn_connection, ffn)]

    def forward(self, h: State, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[State, RouterStats | None]:
        """h (B, T, n, d_b), or its lane tiles (`ghc.tile_state`) -> the same, and the router terms of the MoE (None
        if dense)."""
        stats: list[RouterStats | None] = []
        h = run_stack(h, self.stack(rope, stats))
        return h, stats[0]


class _ShiftedRows(torch.autograd.Function):
    """The table's rows of tokens[:, :-1] and of tokens[:, 1:]: table (V, w), tokens (B, T+1) -> two (B, T, w).

    NOTE: two lookups (the window, and the MTP's window shifted by one) with one table gradient: as two
    embedding calls each backward zero-filled a (V, w) gradient and the two were then added, and slicing one
    (B, T+1, w) lookup instead zero-fills a (B, T+1, w) gradient per slice. At tiny (2, 16) the two table fills,
    the slice's fill, the sum and the MTP's concatenation took 6.7 ms of a 164 ms step; the one fill now 2.7."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window, shifted = tokens[:, :-1], tokens[:, 1:]
        ctx.save_for_backward(window, shifted)
        ctx.vocab = table.shape[0]
        return tuple(table.index_select(0, t.reshape(-1)).view(*t.shape, -1) for t in (window, shifted))

    @staticmethod
    def backward(ctx, grad_window: torch.Tensor, grad_shifted: torch.Tensor) -> tuple[torch.Tensor, None]:
        window, shifted = ctx.saved_tensors
        grad = grad_window.new_zeros(ctx.vocab, grad_window.shape[-1])
        for t, g in ((window, grad_window), (shifted, grad_shifted)):
            grad.index_add_(0, t.reshape(-1), g.reshape(-1, g.shape[-1]))
        return grad, None


class WideEmbedding(nn.Module):
    """tokens (B, T) -> H⁰ (B, T, n, d_b): a |V|×D' table, or a factorised |V|×D table expanded D -> D'."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.shape = (config.n, config.d_slot)
        factorized = config.embedding == "factorized"
        self.table = nn.Embedding(config.vocab_size, config.d_model if factorized else config.d_wide)
        self.expand = Linear(config.d_model, config.d_wide) if factorized else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.table(tokens)
        if self.expand is not None:
            e = self.expand(e)
        return e.unflatten(-1, self.shape)

    def shifted_pair(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T+1) -> the embeddings of tokens[:, :-1] and of tokens[:, 1:], each (B, T, n, d_b)."""
        if self.expand is not None:  # expand each token once; the slices' gradients are (B, T, D) wide
            e = self(tokens)
            return e[:, :-1], e[:, 1:]
        window, shifted = _ShiftedRows.apply(self.table.weight, tokens)
        return window.unflatten(-1, self.shape), shifted.unflatten(-1, self.shape)


class ReduceHead(nn.Module):
    """H (B, T, n, d_b) -> (B, T, D): GroupNorm in groups of size D, Linear D' -> D, RMSNorm.

    At n == m there is nothing to reduce and only the final RMSNorm remains (the baseline)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        wide = config.n > config.m
        groups = config.d_wide // config.d_model
        self.group_norm = nn.GroupNorm(groups, config.d_wide, eps=config.norm_eps) if config.uses_group_norm else None
        self.reduce = Linear(config.d_wide, config.d_model) if wide else None
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)

    def forward(self, h: State) -> torch.Tensor:
        """The final state (B, T, n, d_b), or its lane tiles -> (B, T, D)."""
        if self.group_norm is not None:  # implies a reduce: groups of D in a wider D'
            # NOTE: GroupNorm of (tokens, D') is a layer norm over each group of D channels, then the
            # per-channel affine; torch's CPU GroupNorm kernel, built for large spatial maps, is 2.5x
            # slower (7.0 vs 2.9 ms forward + backward at 2048 tokens, D' = 512, 8 groups). The affine is
            # folded into the reduce, W (x̂ ∘ γ + β) = (W diag γ) x̂ + W β: a (D, D') product instead of
            # passes over (tokens, D') (head forward + backward at (2, 16): 4.4 -> 3.4 ms).
            norm = self.group_norm
            x = group_normalized(h, norm.num_groups, norm.eps).flatten(-2)
            return self.norm(linear(x, self.reduce.weight * norm.weight, self.reduce.weight @ norm.bias))
        x = untile_state(h).flatten(-2)
        return self.norm(x if self.reduce is None else self.reduce(x))


class MultiTokenPredictor(nn.Module):
    """Depth-1 MTP (DeepSeek-V3 style) with the paper's block-level linear.

    Concatenation order per slot is [H-Norm(hidden) ; E-Norm(embedding)] (hidden first, as in the
    DeepSeek-V3 paper); both norms are RMSNorms over the full D' width."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.hidden_norm = RMSNorm(config.d_wide, eps=config.norm_eps)
        self.embed_norm = RMSNorm(config.d_wide, eps=config.norm_eps)
        self.merge = Linear(2 * config.d_slot, config.d_slot)  # one Linear shared by all n slots
        self.block = Block(config)
        self.head = ReduceHead(config)

    def forward(self, h: State, next_embed: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, RouterStats | None]:
        """Final state h (B, T, n, d_b), or its lane tiles, and embeddings of the following tokens (B, T, n, d_b)
        -> (B, T, D)."""
        out, stats = self.block(self.merged(h, next_embed), rope)
        return self.head(out), stats

    def merged(self, h: State, next_embed: torch.Tensor) -> State:
        """The block's input state: each slot's [H-Norm(h) ; E-Norm(next_embed)] through the merge Linear; lane tiles
        from lane tiles (one fused op), (B, T, n, d_b) from (B, T, n, d_b)."""
        if isinstance(h, ghc_kernel.LaneTiles):
            return ghc_kernel.fused_mtp_merge(h, next_embed, self.hidden_norm.weight, self.embed_norm.weight,
                                              self.merge.weight, self.hidden_norm.eps)
        hidden = self.hidden_norm(h.flatten(-2)).view_as(h)
        embed = self.embed_norm(next_embed.flatten(-2)).view_as(h)
        # [hidden ; embed] W = hidden W_h + embed W_e, without the (B, T, n, 2·d_b) concatenation
        w_hidden, w_embed = self.merge.weight.chunk(2, dim=1)
        return linear(hidden, w_hidden) + linear(embed, w_embed)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V), next token; None when the model was given targets
    mtp_logits: torch.Tensor | None  # (B, T, V), token t+2 at position t; None without MTP or with targets
    aux_loss: torch.Tensor  # scalar: weighted MoE balancing terms over all MoE layers
    router: dict[str, torch.Tensor] = field(default_factory=dict)  # detached per-step means, for logging
    loss_ntp: torch.Tensor | None = None  # scalar next-token cross-entropy, only with targets
    loss_next2: torch.Tensor | None = None  # scalar next-2-token cross-entropy, only with targets and MTP


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = WideEmbedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.head = ReduceHead(config)
        self.lm_head = Linear(config.d_model, config.vocab_size)
        self.mtp = MultiTokenPredictor(config) if config.mtp else None
        cos, sin = rotary_tables(config.seq_len, config.d_model // config.n_heads, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.table.weight

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; sublayer output projections scaled by 1/√(2·n_layers) (GPT-2).

        GHC mixing keeps the paper's initialisation (set in its constructor) and norms start at 1."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, SwiGLU | MixtureOfExperts):
                nn.init.normal_(module.w_in, std=std)
                nn.init.normal_(module.w_out, std=out_std)
            elif isinstance(module, Attention):
                nn.init.normal_(module.out.weight, std=out_std)

    def no_decay_parameter_names(self) -> set[str]:
        """Parameters trained without weight decay: norms, embedding tables, static GHC A/B and the
        dynamic scales S (gains initialised at 1, like norm weights)."""
        return {
            name for name, p in self.named_parameters()
            if p.ndim < 2 or name.endswith(("static_a", "static_b", "coeff_scale", "table.weight"))
        }

    def compile(self, **kwargs) -> None:
        """torch.compile this model in place (parameter names unchanged).

        Every shape is fixed by the config, MoE included (its expert groups are offsets into one
        sorted batch, not separately shaped tensors), so `dynamic=False` suits it; the chunked losses
        run eager after the compiled graph, which holds the fused CPU kernels as opaque ops (no graph break)."""
        cpu_kernels.available()  # built eagerly: the trace cannot build them, only see whether they are there
        super().compile(**kwargs)

    def rope(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len <= self.rope_cos.shape[0]:
            return self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        cos, sin = rotary_tables(seq_len, self.config.d_model // self.config.n_heads, self.config.rope_theta)
        return cos.to(self.rope_cos.device), sin.to(self.rope_cos.device)

    def forward(self, tokens: torch.Tensor, next_token: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> ModelOutput:
        """tokens (B, T) -> ModelOutput.

        The MTP head at position t reads the embedding of token t+1. `next_token` (B,) is the token
        after the window, giving the last position its lookahead; without it the last position's
        MTP logits see a zero embedding and should be left out of any loss.

        With `targets` (B, T+1), the tokens at positions 1..T+1 of the text (targets[:, t] follows
        tokens[:, t]), the output holds the next-token and next-2-token losses instead of logits, computed
        chunk by chunk without (B, T, V) tensors (`linear_cross_entropy`); next_token is then targets[:, T-1]."""
        seq_len = tokens.shape[1]
        if targets is not None:
            next_token = targets[:, seq_len - 1]
        rope = self.rope(seq_len)
        # embedded (B, T, n, d_b), and for the MTP head next_embed: the embedding of token t+1 at position t
        next_embed = None
        if self.mtp is None:
            embedded = self.embed(tokens)
        elif next_token is not None:
            embedded, next_embed = self.embed.shifted_pair(torch.cat([tokens, next_token[:, None]], dim=1))
        else:
            embedded = self.embed(tokens)
            next_embed = torch.cat([embedded[:, 1:], torch.zeros_like(embedded[:, :1])], dim=1)
        stats: list[RouterStats | None] = []
        # one stack across the blocks, so that each block's last write and the next block's first read go together
        stack = [pair for block in self.blocks for pair in block.stack(rope, stats)]
        h = run_stack(tile_state(embedded), stack)  # the final state, in lane tiles if the GHCs keep it so
        features = self.head(h)  # (B, T, D), the LM head's input

        mtp_features = None
        if self.mtp is not None:
            mtp_features, mtp_stats = self.mtp(h, next_embed, rope)
            stats.append(mtp_stats)
        aux_loss, router = self._router_terms(stats)
        if targets is None:
            mtp_logits = self.lm_head(mtp_features) if mtp_features is not None else None
            return ModelOutput(self.lm_head(features), mtp_logits, aux_loss, router)
        head = self.lm_head.weight
        loss_ntp = linear_cross_entropy(features, head, targets[:, :seq_len])
        loss_next2 = linear_cross_entropy(mtp_features, head, targets[:, 1:]) if mtp_features is not None else None
        return ModelOutput(None, None, aux_loss, router, loss_ntp, loss_next2)

    def _router_terms(self, stats: list[RouterStats | None]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        routed = [s for s in stats if s is not None]
        if not routed:
            return self.lm_head.weight.new_zeros(()), {}
        balance = torch.stack([s.balance_loss for s in routed])  # one term per MoE layer, summed as in Switch
        z_loss = torch.stack([s.z_loss for s in routed])
        aux = self.config.balance_loss_weight * balance.sum() + self.config.z_loss_weight * z_loss.sum()
        router = {
            "moe/balance_loss": balance.detach().mean(),
            "moe/z_loss": z_loss.detach().mean(),
            "moe/max_load": torch.stack([s.max_load for s in routed]).max(),
        }
        return aux, router

    def update_selection_biases(self) -> None:
        """Auxiliary-loss-free balancing step; call once per optimizer step (before it)."""
        for module in self.modules():
            if isinstance(module, MixtureOfExperts):
                module.update_selection_bias()
