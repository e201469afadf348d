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

from harness.model import cpu_kernels, gemm
from harness.model.gemm import Linear, linear
from harness.model.routing import combine, dispatch, route


class _GatedSiLU(torch.autograd.Function):
    """`gated_silu` as one fused CPU op each way (csrc/gated_silu.cpp)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1]).contiguous()
        ctx.save_for_backward(rows)
        return torch.ops.vwn_ffn.gated_silu_forward(rows).view(*hidden.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (rows,) = ctx.saved_tensors
        grad_rows = torch.ops.vwn_ffn.gated_silu_backward(grad.reshape(rows.shape[0], -1).contiguous(), rows)
        return grad_rows.view(*grad.shape[:-1], -1)


def _register_fake_kernels() -> None:
    @torch.library.register_fake("vwn_ffn::gated_silu_forward")
    def _(hidden):
        return hidden.new_empty(hidden.shape[0], hidden.shape[1] // 2)

    @torch.library.register_fake("vwn_ffn::gated_silu_backward")
    def _(grad, hidden):
        return torch.empty_like(hidden)

    @torch.library.register_fake("vwn_swiglu::swiglu_forward")
    def _(x, w_in, w_out, ends):
        return torch.empty_like(x), x.new_empty(x.shape[0], w_in.shape[-1])

    @torch.library.register_fake("vwn_swiglu::swiglu_backward")
    def _(grad_y, x, pre, w_in, w_out, ends):
        return torch.empty_like(x), torch.empty_like(w_in), torch.empty_like(w_out)


cpu_kernels.on_build(_register_fake_kernels)


def gated_silu(hidden: torch.Tensor) -> torch.Tensor:
    """hidden (..., 2F) holding [gate | up] -> silu(gate) · up (..., F)."""
    if cpu_kernels.applies(hidden):
        return _GatedSiLU.apply(hidden)
    gate, up = hidden.chunk(2, dim=-1)
    return F.silu(gate) * up


class _FusedSwiGLU(torch.autograd.Function):
    """SwiGLU experts as one fused CPU op each way (csrc/swiglu.cpp): both products and the gate per block of rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """x (N, D) grouped by expert, w_in (E, D, 2F), w_out (E, F, D), each expert's end row (E,) int32 -> (N, D)."""
        y, pre = torch.ops.vwn_swiglu.swiglu_forward(x, w_in, w_out, ends)
        ctx.save_for_backward(x, pre, w_in, w_out, ends)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        x, pre, w_in, w_out, ends = ctx.saved_tensors
        return *torch.ops.vwn_swiglu.swiglu_backward(grad.contiguous(), x, pre, w_in, w_out, ends), None


def _fused_swiglu_takes(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> bool:
    """Whether `_FusedSwiGLU` takes these operands: D and F multiples of 16, outside autocast, where the tile
    kernels take them (`gemm.tiles_take`)."""
    return (x.shape[-1] % 16 == 0 and w_out.shape[-2] % 16 == 0 and not torch.is_autocast_enabled("cpu")
            and gemm.tiles_take(x, w_in, w_out))


def swiglu(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """x (..., D), w_in (D, 2F) holding [gate | up], w_out (F, D) -> (..., D)."""
    if _fused_swiglu_takes(x, w_in, w_out):
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        ends = torch.full((1,), rows.shape[0], dtype=torch.int32)
        return _FusedSwiGLU.apply(rows, w_in.unsqueeze(0), w_out.unsqueeze(0), ends).view(x.shape)
    return linear(gated_silu(linear(x, w_in.T)), w_out.T)


def _grouped_mm_takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether F.grouped_mm's kernels take these operands (and their transposes): both alike, rows of a
    multiple of 16 bytes, and fp32/bf16/fp16 on CPU or, as documented for CUDA, bf16 on SM >= 8.0."""
    if x.dtype != w.dtype or any(size * x.element_size() % 16 for size in (x.shape[-1], w.shape[-1])):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


# NOTE: custom ops, so that torch.compile sees each grouped product as one opaque node of static shape
# (its meta function for F.grouped_mm wants bf16, while the CPU kernel also takes fp32)
@torch.library.custom_op("vwn::expert_matmul", mutates_args=())
def expert_matmul(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x (N, K) with rows grouped by expert, w (E, K, M), ends (E,) int32, the row where each group ends
    -> (N, M): each group's rows times its expert's matrix. One grouped GEMM where the kernels take the
    operands, else a loop over the experts."""
    if _grouped_mm_takes(x, w):
        return F.grouped_mm(x, w, offs=ends)
    groups = x.tensor_split(ends[:-1].tolist())
    return torch.cat([group @ w_e for group, w_e in zip(groups, w.unbind(), strict=True)])


@expert_matmul.register_fake
def _(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("vwn::expert_weight_grad", mutates_args=())
def expert_weight_grad(x: torch.Tensor, grad: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x (N, K) and grad (N, M), rows grouped as in `expert_matmul` -> (E, K, M): each group's xᵀ grad."""
    if _grouped_mm_takes(x, grad):
        return F.grouped_mm(x.T, grad, offs=ends)
    bounds = ends[:-1].tolist()
    return torch.stack([a.T @ b for a, b in zip(x.tensor_split(bounds), grad.tensor_split(bounds), strict=True)])


@expert_weight_grad.register_fake
def _(x: torch.Tensor, grad: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return x.new_empty(ends.shape[0], x.shape[1], grad.shape[1])


def _save_operands(ctx, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _expert_matmul_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    x, w, ends = ctx.saved_tensors
    grad = grad.contiguous()  # the kernels reject broadcast (stride-0) gradients, as from out.sum()
    grad_x = expert_matmul(grad, w.transpose(-2, -1), ends) if ctx.needs_input_grad[0] else None
    grad_w = expert_weight_grad(x, grad, ends) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


expert_matmul.register_autograd(_expert_matmul_backward, setup_context=_save_operands)


def bucketed(rows: int) -> int:
    """rows rounded up to one of eight sizes per power of two (at most 12.5 % more)."""
    if rows <= 8:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def expert_windows(ends: list[int], total: int) -> list[tuple[int, int, int, int]]:
    """For each expert's group of rows [start, end) of `total`, a window of them and its neighbours whose row count is
    `bucketed` (capped at `total`): (window start, window rows, the group's offset in it, the group's rows).

    NOTE: oneDNN builds a kernel for every new shape (~0.5 ms), and the group sizes change every step; in buckets
    they take a few dozen shapes, built once. The window reaches into the next group's rows (the last group's into
    the previous), whose product rows are dropped."""
    windows, start = [], 0
    for end in ends:
        rows = min(total, bucketed(end - start))
        first = min(start, total - rows)
        windows.append((first, rows, start - first, end - start))
        start = end
    return windows


class _OneDNNExperts(torch.autograd.Function):
    """Each expert's SwiGLU on its rows, silu(x W_in_gate) ∘ (x W_in_up) W_out, the products that have a token row on
    oneDNN, a window of rows per expert (`expert_windows`), the weight gradients by `gemm.weight_grad`.

    NOTE: one function for both products and the gate, so that an expert's window runs through all three (the rows
    past its group, dropped at the end, cost at most 12.5 % more): two grouped products, each a cat of its experts'
    windows, spent more on the cats (one (M, 2F) and one (M, F) each way) than oneDNN saved at the tiny config."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """x (M, D) grouped by expert, w_in (E, D, 2F), w_out (E, F, D), ends (E,) -> (M, D)."""
        windows = expert_windows(ends.tolist(), x.shape[0])
        pre, hidden, out = [], [], []
        for (first, rows, offset, size), w_in_e, w_out_e in zip(windows, w_in, w_out, strict=True):
            pre.append(gemm.onednn_linear(x[first:first + rows], w_in_e.T))  # (rows, 2F)
            hidden.append(torch.ops.vwn_ffn.gated_silu_forward(pre[-1]))  # (rows, F)
            out.append(gemm.onednn_linear(hidden[-1], w_out_e.T)[offset:offset + size])
        ctx.windows = windows
        ctx.save_for_backward(x, w_in, w_out, *pre, *hidden)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        x, w_in, w_out, *saved = ctx.saved_tensors
        experts = len(ctx.windows)
        pre, hidden = saved[:experts], saved[experts:]
        grad = grad.contiguous()
        grad_x, grad_w_in, grad_w_out = [], [], []
        start = 0
        for e, (first, rows, offset, size) in enumerate(ctx.windows):
            grad_e = grad[start:start + size]  # (size, D)
            # the window's rows of grad belong to other experts' outputs: products of them are dropped
            grad_hidden = gemm.onednn_linear(grad[first:first + rows], w_out[e])  # (rows, F)
            grad_pre = torch.ops.vwn_ffn.gated_silu_backward(grad_hidden, pre[e])  # (rows, 2F)
            group = slice(offset, offset + size)
            grad_w_out.append(gemm.weight_grad(hidden[e][group], grad_e))
            grad_w_in.append(gemm.weight_grad(x[start:start + size], grad_pre[group]))
            grad_x.append(gemm.onednn_linear(grad_pre, w_in[e])[group])
            start += size
        return torch.cat(grad_x), torch.stack(grad_w_in), torch.stack(grad_w_out), None


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """`expert_matmul` under autocast's rule for matmuls (custom ops have none): both in its dtype.

    NOTE: eager calls F.grouped_mm directly where it takes the operands: its autograd is native, where
    the custom op's runs in Python (one MoE layer at the tiny config, forward + backward: ~0.6 ms more)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    if torch.compiler.is_compiling() or not _grouped_mm_takes(x, w):
        return expert_matmul(x, w, ends)
    return F.grouped_mm(x, w, offs=ends)


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
        self.router = Linear(d_model, n_experts)  # its weight (E, D): `route` makes the product
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, 2 * d_ff))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.shared = SwiGLU(d_model, d_ff * n_shared) if n_shared > 0 else None
        self.aux_free_balancing = aux_free_balancing
        self.bias_update_rate = bias_update_rate
        if aux_free_balancing:
            self.register_buffer("selection_bias", torch.zeros(n_experts))
            self.register_buffer("pending_load", torch.zeros(n_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        """x (batch, seq, D) -> (batch, seq, D). Assignments are grouped per expert (`routing`), so each
        expert runs only on the tokens routed to it (by the fused SwiGLU kernel where it applies; else on oneDNN,
        in a window of up to 12.5 % more rows, whose outputs are dropped: `expert_windows`)."""
        flat = x.reshape(-1, x.shape[-1])  # (N, D)
        fused = cpu_kernels.applies(flat)
        routing = route(flat, self.router.weight, self.selection_bias if self.aux_free_balancing else None,
                        self.top_k, fused)
        routed = dispatch(flat, routing, fused)
        if fused and _fused_swiglu_takes(routed, self.w_in, self.w_out):
            y = _FusedSwiGLU.apply(routed, self.w_in, self.w_out, routing.ends)
        elif fused and gemm.takes(routed, self.w_in, self.w_out) and not torch.compiler.is_compiling():
            # (its windows are sized from the group sizes in Python: compiled, the grouped products below run)
            y = _OneDNNExperts.apply(routed, self.w_in, self.w_out, routing.ends)
        else:
            y = grouped_matmul(gated_silu(grouped_matmul(routed, self.w_in, routing.ends)), self.w_out, routing.ends)
        out = combine(y, routing, fused)
        if self.shared is not None:
            out = out + self.shared(flat)[0]

        if self.aux_free_balancing and self.training:
            self.pending_load += routing.counts
        max_load = routing.counts.max() * (self.n_experts / routing.token_of.numel())  # max_e f_e · E
        stats = RouterStats(balance_loss=routing.balance_loss, z_loss=routing.z_loss, max_load=max_load)
        return out.view_as(x), stats

    @torch.no_grad()
    def update_selection_bias(self) -> None:
        """bias_e += γ · sign(mean load − load_e) over the loads seen since the last update."""
        if not self.aux_free_balancing:
            return
        load = self.pending_load
        self.selection_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()
