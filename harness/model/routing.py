"""Token-choice top-k routing for the MoE: choose experts, group the assignments by expert, combine.

N tokens, E experts, k choices per token, M = N·k assignments, D the model width.

    logits = x Wᵀ                              (N, E), of the router input x (N, D) and weight W (E, D)
    probs = softmax(logits)                    (N, E); the choice ranks probs + bias (aux-loss-free balancing)
    gates = probs of the k chosen, renormalised (N, k)
    assignments sorted by expert, stably       token_of (M,): each one's token; position (N, k): where each
                                               (token, choice) landed; ends (E,): where each expert's rows end
    dispatch:  routed = x[token_of]            (M, D), the experts' input rows, grouped
    combine:   out[t] = Σ_j gates[t, j] · y[position[t, j]]    (N, D)
    balance = E · Σ_e f_e · P_e                Switch's load-balancing loss: f_e = counts_e / M, P_e = mean_t probs_e

In fp32 on CPU, routing (the router's product included, in fp32 even under autocast), dispatch and combine are
fused C++ ops (`csrc/moe_routing.cpp`); the torch code serves other dtypes and devices and is the tests' reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from harness.model import cpu_kernels
from harness.model.gemm import linear


class Routing(NamedTuple):
    gates: torch.Tensor  # (N, k) fp32, summing to 1 per token
    token_of: torch.Tensor  # (M,) int64
    position: torch.Tensor  # (N, k) int64
    counts: torch.Tensor  # (E,) int64 assignments per expert
    ends: torch.Tensor  # (E,) int32 cumulative counts
    balance_loss: torch.Tensor  # scalar E · Σ f_e · P_e, 1.0 when perfectly balanced (differentiable)
    z_loss: torch.Tensor  # scalar mean logsumexp(logits)² (differentiable)


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, fused: bool) -> Routing:
    """Router input x (N, D), router weight (E, D), the selection bias (E,) or None -> Routing."""
    if fused:
        return Routing(*_FusedRouting.apply(x, weight, bias, k))
    logits = linear(x, weight).float()
    probs = logits.softmax(dim=-1)
    chosen = (probs if bias is None else probs + bias).topk(k, dim=-1).indices  # (N, k)
    gates = probs.gather(1, chosen)
    expert_of = chosen.flatten()
    order = expert_of.argsort(stable=True)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    # assignments per expert, (E,): a static shape, where bincount's depends on the data (torch.compile)
    counts = torch.zeros_like(probs[0], dtype=torch.long).index_add_(0, expert_of, torch.ones_like(expert_of))
    balance = probs.shape[1] * (counts / order.numel() * probs.mean(dim=0)).sum()
    return Routing(gates / gates.sum(dim=-1, keepdim=True), order // k, position.view_as(chosen), counts,
                   counts.cumsum(0).to(torch.int32), balance, torch.logsumexp(logits, dim=-1).square().mean())


def dispatch(x: torch.Tensor, routing: Routing, fused: bool) -> torch.Tensor:
    """x (N, D) -> the experts' input rows (M, D), grouped by expert."""
    if fused:
        return _Dispatch.apply(x, routing.token_of, routing.position)
    # NOTE: index_select rather than x[token_of]: its backward is one index_add, where advanced indexing
    # scatters with index_put
    return x.index_select(0, routing.token_of)


def combine(y: torch.Tensor, routing: Routing, fused: bool) -> torch.Tensor:
    """The experts' output rows y (M, D) -> each token's gate-weighted sum of its k rows (N, D)."""
    gates = routing.gates.to(y.dtype)
    if fused:
        return _Combine.apply(y, gates, routing.position)
    rows = y.index_select(0, routing.position.flatten()).view(*routing.position.shape, -1)  # (N, k, D)
    return (rows * gates[..., None]).sum(dim=1)


class _FusedRouting(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int
                ) -> tuple[torch.Tensor, ...]:
        x, weight = x.contiguous(), weight.contiguous()
        gates, chosen, token_of, position, counts, ends, probs, lse, balance, z_loss = torch.ops.vwn_moe.route(
            x, weight, bias, k)
        ctx.save_for_backward(gates, chosen, probs, lse, counts, x, weight)
        ctx.mark_non_differentiable(token_of, position, counts, ends)
        return gates, token_of, position, counts, ends, balance, z_loss

    @staticmethod
    def backward(ctx, grad_gates, _token_of, _position, _counts, _ends, grad_balance, grad_z):
        return *torch.ops.vwn_moe.route_backward(grad_gates.contiguous(), grad_balance, grad_z,
                                                 *ctx.saved_tensors), None, None


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, token_of: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(position)
        return torch.ops.vwn_moe.gather_rows(x.contiguous(), token_of)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (position,) = ctx.saved_tensors  # a token's gradient: the sum over its k rows, a gather (no scatter)
        return torch.ops.vwn_moe.weighted_row_sums(grad.contiguous(), None, position), None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, gates: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        y, gates = y.contiguous(), gates.contiguous()
        ctx.save_for_backward(y, gates, position)
        return torch.ops.vwn_moe.weighted_row_sums(y, gates, position)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        y, gates, position = ctx.saved_tensors
        grad_y, grad_gates = torch.ops.vwn_moe.combine_backward(grad.contiguous(), y, gates, position)
        return grad_y, grad_gates, None


def _register_fake_kernels() -> None:
    @torch.library.register_fake("vwn_moe::route")
    def _(x, weight, bias, k):
        tokens, experts = x.shape[0], weight.shape[0]
        index = x.new_empty(tokens, k, dtype=torch.long)
        return (x.new_empty(tokens, k), index, x.new_empty(tokens * k, dtype=torch.long), torch.empty_like(index),
                x.new_empty(experts, dtype=torch.long), x.new_empty(experts, dtype=torch.int32),
                x.new_empty(tokens, experts), x.new_empty(tokens), x.new_empty(()), x.new_empty(()))

    @torch.library.register_fake("vwn_moe::route_backward")
    def _(grad_gates, grad_balance, grad_z, gates, chosen, probs, lse, counts, x, weight):
        return torch.empty_like(x), torch.empty_like(weight)

    @torch.library.register_fake("vwn_moe::gather_rows")
    def _(rows, index):
        return rows.new_empty(index.shape[0], rows.shape[1])

    @torch.library.register_fake("vwn_moe::weighted_row_sums")
    def _(y, weights, position):
        return y.new_empty(position.shape[0], y.shape[1])

    @torch.library.register_fake("vwn_moe::combine_backward")
    def _(grad, y, weights, position):
        return torch.empty_like(y), torch.empty_like(weights)


cpu_kernels.on_build(_register_fake_kernels)
