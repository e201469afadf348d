"""linear_cross_entropy: the chunked LM-head loss equals the plain (N, V)-logits cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.model import LanguageModel, ModelConfig
from harness.model.loss import _chunk_rows, linear_cross_entropy


def plain(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).flatten(0, -2), targets.flatten())


# one row; several chunks of 128 rows with a ragged last one (V = 4096); chunks of the 16-row minimum (large V)
@pytest.mark.parametrize("rows, vocab", [(1, 50), (300, 4096), (2 * 128 + 7, 4096), (40, 70_000)])
def test_loss_and_gradients_equal_the_plain_cross_entropy(rows, vocab):
    torch.manual_seed(0)
    hidden = torch.randn(rows, 24, requires_grad=True)
    weight = torch.randn(vocab, 24, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    assert rows == 1 or rows % _chunk_rows(vocab) != 0
    loss = linear_cross_entropy(hidden, weight, targets)
    grads = torch.autograd.grad(2.5 * loss, (hidden, weight))
    expected = plain(hidden, weight, targets)
    expected_grads = torch.autograd.grad(2.5 * expected, (hidden, weight))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)


def test_without_gradients_it_only_computes_the_loss():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 9, 8), torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (2, 9))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, plain(hidden, weight.detach(), targets))


def test_bf16_autocast_computes_the_loss_in_fp32():
    torch.manual_seed(0)
    hidden, weight = torch.randn(16, 8).bfloat16().requires_grad_(), torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, plain(hidden.float(), weight, targets))


def test_mismatched_targets_are_an_error():
    with pytest.raises(ValueError, match="7 targets for 8 rows"):
        linear_cross_entropy(torch.randn(8, 4), torch.randn(10, 4), torch.zeros(7, dtype=torch.long))


@pytest.mark.parametrize("mtp", [False, True])
def test_model_losses_with_targets_equal_cross_entropy_of_its_logits(mtp):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, seq_len=16, n_experts=4, top_k=2,
                         d_ff=32, virtual_width=(2, 4), mtp=mtp)
    model = LanguageModel(config)
    window = torch.randint(0, 64, (3, 18))
    tokens, targets = window[:, :16], window[:, 1:]
    fused = model(tokens, targets=targets)
    plain_out = model(tokens, next_token=window[:, 16])
    assert fused.logits is None and fused.mtp_logits is None
    expected_ntp = F.cross_entropy(plain_out.logits.flatten(0, 1), window[:, 1:17].flatten())
    torch.testing.assert_close(fused.loss_ntp, expected_ntp)
    if mtp:
        torch.testing.assert_close(fused.loss_next2,
                                   F.cross_entropy(plain_out.mtp_logits.flatten(0, 1), window[:, 2:].flatten()))
    else:
        assert fused.loss_next2 is None
