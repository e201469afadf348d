"""Feed-forward sublayers: SwiGLU, and a token-choice top-k Mixture-of-Experts of SwiGLU experts.

Balancing (prior-art.md):
- Switch load-balancing loss  E · Σ_e f_e · P_e  (f_e: share of token-slot assignments to expert e,
  P_e: mean router probability of e), and router z-loss  mean(logsumexp(logits)²);
- optional DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias added to the scores only
  when choosing the top-k (gates use unbiased probabilities), nudged by `update_selection_bias`
  after each optimizer step toward equal load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """x (..., D), w_in (D, 2F) holding [gate | up], w_out (F, D) -> (..., D)."""
    gate, up = (x @ w_in).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_out


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward of hidden width d_ff."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.empty(d_model, 2 * d_ff))
        self.w_out = nn.Parameter(torch.empty(d_ff, d_model))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats | None]:
        return swiglu(x, self.w_in, self.w_out), None


@dataclass
class RouterStats:
    """Per-layer routing terms of one forward pass. Losses are differentiable; max_load is detached."""

    balance_loss: torch.Tensor  # scalar, E · Σ f_e · P_e (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # scalar
    max_load: torch.Tensor  # scalar, max_e f_e · E (1.0 when perfectly balanced)


class MixtureOfExperts(nn.Module):
    """Token-choice top-k router over n_experts SwiGLU experts, plus optional shared experts."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, n_shared: int,
                 aux_free_balancing: bool, bias_update_rate: float) -> None:
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, 2 * d_ff))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.shared = SwiGLU(d_model, d_ff * n_shared) if n_shared > 0 else None
        self.aux_free_balancing = aux_free_balancing
        self.bias_update_rate = bias_update_rate
        if aux_free_balancing:
            self.register_buffer("selection_bias", torch.zeros(n_experts))
            self.register_buffer("pending_load", torch.zeros(n_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        """x (batch, seq, D) -> (batch, seq, D). Tokens are grouped per expert (sort + gather), so each
        expert runs only on the tokens routed to it."""
        flat = x.reshape(-1, x.shape[-1])  # (N, D)
        logits = self.router(flat).float()  # (N, E)
        probs = logits.softmax(dim=-1)
        scores = probs + self.selection_bias if self.aux_free_balancing else probs
        chosen = scores.topk(self.top_k, dim=-1).indices  # (N, k)
        gates = probs.gather(1, chosen)
        gates = gates / gates.sum(dim=-1, keepdim=True)

        expert_of = chosen.flatten()  # (N·k,) expert of each token-slot assignment
        order = expert_of.argsort(stable=True)
        token_of = order // self.top_k  # token of each assignment, grouped by expert
        counts = torch.bincount(expert_of, minlength=self.n_experts)
        # NOTE: index_select and unbind rather than flat[token_of] and w_in[e]: their backward is one
        # index_add / stack, where advanced indexing scatters with index_put and each w_in[e]
        # zero-fills a full (E, D, 2F) gradient per expert (MoE layer 8.0 -> 7.0 ms at the tiny config).
        routed = flat.index_select(0, token_of)
        groups = routed.split(counts.tolist())
        outputs = [
            swiglu(group, w_in, w_out)
            for group, w_in, w_out in zip(groups, self.w_in.unbind(), self.w_out.unbind(), strict=True)
            if group.shape[0] > 0
        ]
        weighted = torch.cat(outputs) * gates.flatten().index_select(0, order)[:, None].to(flat.dtype)
        out = torch.zeros_like(flat).index_add_(0, token_of, weighted)
        if self.shared is not None:
            out = out + self.shared(flat)[0]

        load = counts.float() / expert_of.numel()  # f_e
        if self.aux_free_balancing and self.training:
            self.pending_load += counts.float()
        stats = RouterStats(
            balance_loss=self.n_experts * (load * probs.mean(dim=0)).sum(),
            z_loss=torch.logsumexp(logits, dim=-1).square().mean(),
            max_load=load.max().detach() * self.n_experts,
        )
        return out.view_as(x), stats

    @torch.no_grad()
    def update_selection_bias(self) -> None:
        """bias_e += γ · sign(mean load − load_e) over the loads seen since the last update."""
        if not self.aux_free_balancing:
            return
        load = self.pending_load
        self.selection_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()
