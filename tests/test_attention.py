"""Attention: the fused CPU kernel (rotary + causal attention, csrc/attention.cpp) against the torch code."""

from __future__ import annotations

import pytest
import torch

from harness.model import cpu_kernels
from harness.model.transformer import Attention, rotary_tables


def attention_and_grads(attention: Attention, x: torch.Tensor, rope, grad: torch.Tensor):
    x = x.detach().requires_grad_()
    out = attention(x, rope)
    return (out, *torch.autograd.grad(out, [x, attention.qkv.weight, attention.out.weight], grad))


# heads of 8, 16 and 32 channels (eight- and, on AVX-512, sixteen-lane vectors); T = 1 (one score), 13 and 21
# (rows ending inside a vector, single rows after the blocks of eight), 128 (the models' context)
@pytest.mark.parametrize(("d_model", "heads", "positions"),
                         [(64, 4, 128), (64, 8, 13), (64, 4, 21), (96, 3, 40), (32, 2, 1)])
def test_fused_attention_matches_float64_torch_code_in_value_and_gradients(d_model, heads, positions):
    assert cpu_kernels.available(), "the CPU kernels did not build (see the warning)"
    torch.manual_seed(0)
    attention = Attention(d_model, heads)
    with torch.no_grad():  # scores of several units, so the softmax is far from uniform
        attention.qkv.weight.mul_(4.0)
    x = torch.randn(2, positions, d_model)
    grad = torch.randn(2, positions, d_model)
    cos, sin = rotary_tables(positions + 3, d_model // heads, 10_000.0)
    got = attention_and_grads(attention, x, (cos[:positions], sin[:positions]), grad)

    reference = Attention(d_model, heads).double()
    reference.load_state_dict(attention.state_dict())
    rope64 = (cos[:positions].double(), sin[:positions].double())
    want = attention_and_grads(reference, x.double(), rope64, grad.double())
    # NOTE: errors relative to each tensor's largest entry: fp32 sums over hundreds of products (the weight
    # gradients') miss float64 by ~1e-6 of that, the torch code's fp32 result as much as the kernel's
    for name, g, w in zip(["output", "grad x", "grad qkv weight", "grad out weight"], got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-5 * w.abs().max().item(),
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_fused_attention_is_the_kernel_op_and_torch_path_agrees_in_fp32(monkeypatch):
    """The fp32 module output goes through the fused op, and equals the torch code's fp32 output."""
    torch.manual_seed(1)
    attention = Attention(64, 4)
    x = torch.randn(3, 20, 64)
    rope = rotary_tables(20, 16, 10_000.0)
    with torch.profiler.profile() as prof:
        fused = attention(x, rope)
    assert any(e.name == "vwn_attn::attention_forward" for e in prof.events())
    monkeypatch.setattr(cpu_kernels, "_built", False)
    torch.testing.assert_close(fused, attention(x, rope), rtol=1e-5, atol=1e-6)


def test_attention_op_rejects_heads_that_are_not_a_multiple_of_eight():
    assert cpu_kernels.available()
    qkv = torch.randn(1, 4, 3 * 24)
    cos, sin = rotary_tables(4, 12, 10_000.0)
    with pytest.raises(RuntimeError, match="heads of a multiple of 8"):
        torch.ops.vwn_attn.attention_forward(qkv, cos, sin, 2)
