"""linear_cross_entropy: the chunked LM-head loss equals the plain (N, V)-logits cross-entropy, on the fused CPU
kernel (its GEMMs on MKL and on oneDNN) and on the torch code that other devices take."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.model import LanguageModel, ModelConfig, cpu_kernels, gemm
from harness.model.loss import _chunk_rows, linear_cross_entropy


@pytest.fixture(params=["kernel on mkl", "kernel on onednn", "torch"])
def path(request, monkeypatch) -> str:
    """The fused kernel with its GEMMs on each library, and the torch code (as when the extension cannot build)."""
    assert cpu_kernels.available(), "the CPU kernels did not build (see the warning)"
    if request.param == "torch":
        monkeypatch.setattr(cpu_kernels, "_built", False)
    else:
        monkeypatch.setattr(gemm, "use_onednn", lambda: request.param == "kernel on onednn")
    return request.param


def plain(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).flatten(0, -2), targets.flatten())


# one row; two and three chunks (V = 4096), the last one ragged; chunks of the 16-row minimum (large V)
@pytest.mark.parametrize("rows, vocab", [(1, 50), (_chunk_rows(4096) + 44, 4096), (2 * _chunk_rows(4096) + 7, 4096),
                                         (40, 70_000)])
def test_loss_and_gradients_equal_the_plain_cross_entropy(rows, vocab, path):
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


def test_without_gradients_it_only_computes_the_loss(path):
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


def test_the_kernel_rejects_targets_outside_the_vocabulary():
    assert cpu_kernels.available()
    with pytest.raises(RuntimeError, match=r"target 10 out of range \[0, 10\)"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(10, 4), torch.tensor([0, 10, 2]))


@pytest.mark.parametrize("onednn", [False, True], ids=["mkl", "onednn"])
def test_the_kernels_softmax_is_accurate_to_fp32_rounding(onednn, monkeypatch):
    """Logits from 0 down to -300 (past fp32's exp underflow near -87), exact in fp32 (hidden (1, 1), weight
    [0 | offset]), over a vocabulary that is not a whole number of vectors (the scalar tail), the target at the
    top, the bottom and in between: every softmax entry (the weight's gradient) and the loss against float64."""
    assert cpu_kernels.available()
    monkeypatch.setattr(gemm, "use_onednn", lambda: onednn)
    vocab = 1000 + 7
    offsets = torch.linspace(0.0, -300.0, vocab)  # steps of 0.3: the exp's range reduction sees every residue
    weight = torch.stack([torch.zeros(vocab), offsets], dim=1).requires_grad_()
    for target in (0, 5, 500, vocab - 8, vocab - 1):
        targets = torch.tensor([target])
        loss = linear_cross_entropy(torch.ones(1, 2), weight, targets)
        softmax = torch.autograd.grad(loss, weight)[0][:, 1]  # softmax - onehot(target)
        logits = offsets.double()
        want_softmax = logits.softmax(0) - F.one_hot(targets[0], vocab).double()
        want_loss = logits.logsumexp(0) - logits[target]
        torch.testing.assert_close(softmax.double(), want_softmax, rtol=1e-6, atol=1e-37)
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=1e-6)


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
