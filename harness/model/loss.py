"""Cross-entropy of a linear LM head, computed a chunk of tokens at a time.

    loss = mean_t [ logsumexp(W h_t) - (W h_t)[y_t] ]        h (N, D), W (V, D), y (N,)

The plain route materialises the (N, V) logits, their log-softmax and two (N, V) gradients: at the
tiny config (N = 2048, V = 4096) each is 33.5 MB, far beyond the caches, and the head of a small
model then spends its time moving memory rather than multiplying. Here each chunk of rows makes its
logits, turns them into the gradient softmax - onehot in place and multiplies it out at once, while
the chunk is still in cache; only the (N, D) and (V, D) gradients are kept for the backward pass.

In fp32 on CPU the chunk loop is one fused C++ op (`csrc/cross_entropy.cpp`: one pass per chunk turns the
logits into the gradient, where the torch code below makes about ten); the torch code serves other devices
and is the tests' reference for the op. The op's GEMMs run on the library `gemm` chooses for the CPU.
"""

from __future__ import annotations

import torch

from harness.model import cpu_kernels, gemm

CHUNK_BYTES = 2**23  # logits per chunk: 8 MB, (512, 4096) in fp32
# NOTE: the op alone (with gradients, V = 4096, cache flushed before each call; AMD EPYC Zen 3, 2 threads, oneDNN
# GEMMs, 2026-12-06): at D = 64, N = 2048, 128 / 256 / 512 / 1024 rows took 27.0-29.7 / 25.5-28.9 / 25.5-28.7 /
# 28.6-32.4 ms; at D = 256, N = 4096, 215 / 188-202 / 185-189 / 196 ms at 128 / 256 / 512 / 1024 rows. The
# training step, 2 MB and 8 MB chunks alternated in one process: tiny r = 1 x0.985, tiny (2, 8) x0.968, small
# r = 1 x0.991.


def _chunk_rows(vocab_size: int) -> int:
    return max(16, CHUNK_BYTES // (4 * vocab_size))


def _chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_grads: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed loss over the rows, and if asked the gradients of that sum w.r.t. hidden and weight (fp32)."""
    if cpu_kernels.applies(hidden, weight):
        total, grad_hidden, grad_weight = torch.ops.vwn_ce.linear_cross_entropy(
            hidden.contiguous(), weight.contiguous(), targets.long().contiguous(), _chunk_rows(weight.shape[0]),
            with_grads, gemm.use_onednn())
        return total, grad_hidden if with_grads else None, grad_weight if with_grads else None
    total = hidden.new_zeros(())
    grad_hidden = torch.empty_like(hidden) if with_grads else None
    grad_weight = torch.zeros_like(weight) if with_grads else None
    rows = _chunk_rows(weight.shape[0])
    for start in range(0, hidden.shape[0], rows):
        h, y = hidden[start : start + rows], targets[start : start + rows]
        logits = h @ weight.T  # (rows, V)
        total -= logits.gather(1, y[:, None]).sum()
        # NOTE: one exp pass gives both the log-normaliser and the softmax (logsumexp, then exp for the
        # softmax, would run it twice); everything happens in place of the logits
        peak = logits.amax(dim=-1, keepdim=True)
        exp = logits.sub_(peak).exp_()
        norm = exp.sum(dim=-1, keepdim=True)
        total += (peak + norm.log()).sum()
        if with_grads:
            grad = exp.div_(norm)  # softmax
            grad[torch.arange(len(y)), y] -= 1.0
            torch.mm(grad, weight, out=grad_hidden[start : start + rows])
            grad_weight.addmm_(grad.T, h)
    return total, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total, grad_hidden, grad_weight = _chunked(hidden, weight, targets, with_grads=True)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.rows = hidden.shape[0]
        return total / ctx.rows

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss / ctx.rows
        return grad_hidden * scale, grad_weight * scale, None


@torch.compiler.disable  # a Python loop of in-place chunk updates: runs eager inside a compiled model
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits hidden @ weightᵀ against targets, in fp32, without (N, V) tensors.

    hidden (..., D), weight (V, D), targets (...) of token ids -> scalar."""
    with torch.autocast(hidden.device.type, enabled=False):
        hidden, weight = hidden.reshape(-1, hidden.shape[-1]).float(), weight.float()
        targets = targets.reshape(-1)
        if targets.shape[0] != hidden.shape[0]:
            raise ValueError(f"{targets.shape[0]} targets for {hidden.shape[0]} rows of hidden states")
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            loss = _LinearCrossEntropy.apply(hidden, weight, targets)
        else:
            loss = _chunked(hidden, weight, targets, with_grads=False)[0] / hidden.shape[0]
    return loss
