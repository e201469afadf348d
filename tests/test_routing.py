"""MoE routing: the fused CPU ops against the torch code, values and gradients."""

from __future__ import annotations

import pytest
import torch

from harness.model import cpu_kernels
from harness.model.routing import combine, dispatch, route


@pytest.fixture(scope="module", autouse=True)
def built_kernels():
    assert cpu_kernels.available(), "the CPU kernels did not build (see the warning)"


def routed_outputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fused: bool):
    """Routing of x by the router weight, then x dispatched, scaled by a fixed ramp (a stand-in for the experts) and
    combined; gradients of a fixed weighting of the combined output and of both balancing terms w.r.t. x and the
    weight (x's through the router and through the dispatch)."""
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    routing = route(x, weight, bias, 2, fused)
    rows = dispatch(x, routing, fused)
    expert = rows * torch.linspace(0.5, 1.5, rows.numel()).view_as(rows)
    out = combine(expert, routing, fused)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    loss = loss + 2.0 * routing.balance_loss + 3.0 * routing.z_loss
    loss.backward()
    return routing, out.detach(), weight.grad, x.grad


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_routing_matches_the_torch_code(with_bias):
    torch.manual_seed(0)
    tokens, experts, width = 37, 8, 12
    x = torch.randn(tokens, width)
    weight = 0.6 * torch.randn(experts, width)  # logits of about 2 standard deviations
    bias = 0.1 * torch.randn(experts) if with_bias else None
    fused, out, grad_weight, grad_x = routed_outputs(x, weight, bias, fused=True)
    reference, want_out, want_grad_weight, want_grad_x = routed_outputs(x, weight, bias, fused=False)
    for name in ("token_of", "position", "counts", "ends"):
        assert torch.equal(getattr(fused, name), getattr(reference, name)), name
    assert fused.ends.dtype == torch.int32 and fused.ends[-1] == 2 * tokens
    for name in ("gates", "balance_loss", "z_loss"):
        torch.testing.assert_close(getattr(fused, name), getattr(reference, name).detach(), msg=name)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(grad_weight, want_grad_weight)
    torch.testing.assert_close(grad_x, want_grad_x)


def test_the_bias_steers_the_choice_but_not_the_gates():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    x, weight = torch.ones(1, 1), logits.T.contiguous()  # x Wᵀ = the logits
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    probs = logits.softmax(-1)[0]
    for fused in (True, False):
        routing = route(x, weight, bias, 2, fused)
        assert routing.counts.tolist() == [1, 0, 0, 1]  # expert 3 for its bias, expert 0 for its logit
        want = torch.stack([probs[3], probs[0]]) / (probs[0] + probs[3])  # largest score first
        torch.testing.assert_close(routing.gates[0], want)
