"""RMSNorm, fused CPU kernels and the hand-written torch backward, against torch's and finite differences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.model.norm import RMSNorm, layer_norm, rms_norm


@pytest.mark.parametrize("width", [8, 13, 64, 512])  # 13: the kernel's loops beyond whole vectors
def test_matches_torch_rmsnorm_in_value_and_gradients(width, path):
    torch.manual_seed(0)
    ours, reference = RMSNorm(width, eps=1e-6), nn.RMSNorm(width, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_(1.0, 0.3)
        reference.weight.copy_(ours.weight)
    x = (3 * torch.randn(4, 5, width)).requires_grad_()
    grad = torch.randn(4, 5, width)
    got = ours(x)
    got_x, got_w = torch.autograd.grad(got, [x, ours.weight], grad)
    expected = reference(x)
    expected_x, expected_w = torch.autograd.grad(expected, [x, reference.weight], grad)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_x, expected_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_w, expected_w, rtol=1e-5, atol=1e-5)
    assert ours.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("width", [13, 64])  # 13: the kernel's loops beyond whole vectors
def test_layer_norm_matches_float64_layer_norm_in_value_and_gradient(width, path):
    """The reduce head's group layer norm (no affine) on the fused kernel and on torch's, against float64 on rows
    of several scales and offsets, in the head's (tokens, groups, G) shape."""
    torch.manual_seed(0)
    x = (torch.randn(6, 3, width) * torch.tensor([0.1, 1.0, 30.0]).view(3, 1) + 2.0).requires_grad_()
    grad = torch.randn(6, 3, width)
    with torch.profiler.profile() as prof:
        got = layer_norm(x, 1e-6)
        (got_x,) = torch.autograd.grad(got, x, grad)
    fused = {e.name for e in prof.events() if e.name.startswith("vwn_layer_norm")}
    assert fused == ({"vwn_layer_norm::layer_norm_forward", "vwn_layer_norm::layer_norm_backward"}
                     if path == "kernel" else set())
    reference = x.detach().double().requires_grad_()
    expected = nn.functional.layer_norm(reference, (width,), eps=1e-6)
    (expected_x,) = torch.autograd.grad(expected, reference, grad.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x.double(), expected_x, rtol=1e-4, atol=1e-4 * expected_x.abs().max().item())


def test_gradients_pass_gradcheck_in_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x, weight))


def test_frozen_weight_gets_no_gradient_and_input_still_does():
    norm = RMSNorm(8).requires_grad_(False)
    x = torch.randn(2, 8, requires_grad=True)
    norm(x).square().sum().backward()
    assert norm.weight.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bf16_input_gets_a_bf16_gradient_computed_in_fp32():
    torch.manual_seed(0)
    weight = torch.randn(64).requires_grad_()
    x = torch.randn(8, 64).bfloat16().requires_grad_()
    grad = torch.randn(8, 64)
    rms_norm(x, weight, 1e-6).float().backward(grad)
    x32 = x.detach().float().requires_grad_()
    expected_x, expected_w = torch.autograd.grad(rms_norm(x32, weight, 1e-6), [x32, weight], grad)
    assert x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.float(), expected_x, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(weight.grad, expected_w, rtol=2e-2, atol=2e-2)
