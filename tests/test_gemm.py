"""harness.model.gemm: which GEMM library the cross-entropy uses, and oneDNN's product on any operand layout."""

from __future__ import annotations

import pytest
import torch

from harness import cli
from harness.model import gemm

AMD = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
AMD_AVX2 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2\n"
AMD_SSE = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse4_2\n"
INTEL = "vendor_id\t: GenuineIntel\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"


@pytest.fixture
def choice(monkeypatch):
    """Set VWN_CPU_GEMM (None: unset) and forget the process's cached choice, before and after the test."""
    def set_choice(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("VWN_CPU_GEMM", raising=False)
        else:
            monkeypatch.setenv("VWN_CPU_GEMM", value)
        gemm.forget_choices()

    yield set_choice
    gemm.forget_choices()


@pytest.mark.parametrize("cpuinfo, onednn", [(AMD, True), (AMD_AVX2, True), (AMD_SSE, False), (INTEL, False),
                                             (None, False)],
                         ids=["amd-avx512", "amd-avx2", "amd-sse", "intel", "no-cpuinfo"])
def test_auto_takes_onednn_on_non_intel_cpus_with_avx2(cpuinfo, onednn, tmp_path, monkeypatch, choice):
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    monkeypatch.setattr(gemm, "CPUINFO", path)
    choice(None)
    assert gemm.use_onednn() is onednn
    assert gemm.backend() == ("onednn" if onednn else "mkl")


@pytest.mark.parametrize("value, onednn", [("mkl", False), ("onednn", True)])
def test_the_environment_variable_overrides_the_cpu_rule(value, onednn, choice):
    choice(value)
    assert gemm.use_onednn() is onednn


def test_an_unknown_library_is_an_error_naming_the_allowed_values(choice, capsys):
    choice("openblas")
    with pytest.raises(ValueError, match="VWN_CPU_GEMM='openblas': allowed values are auto, mkl, onednn"):
        gemm.use_onednn()
    # the commands that train refuse it before any work starts
    assert cli.main(["train", "--set", "train.tokens=1"]) == 2
    assert "error: VWN_CPU_GEMM='openblas': allowed values are auto, mkl, onednn" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "column slice"])
def test_onednn_linear_is_a_times_b_transposed_on_any_layout(layout):
    torch.manual_seed(0)
    a, wide = torch.randn(37, 24), torch.randn(16, 48)
    b = {"contiguous": wide[:, :24].contiguous(), "transposed": wide.T.contiguous()[:24].T,
         "column slice": wide[:, 24:]}[layout]
    assert b.shape == (16, 24)
    torch.testing.assert_close(gemm.onednn_linear(a, b), a @ b.T, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gemm.onednn_linear(b, a), b @ a.T, rtol=1e-6, atol=1e-5)


# K: no rows, one, fewer than the threads' split, several passes of 256 rows with a part; M: tiles of 8 (AVX-512) or 6
# (AVX2), 4 and 1 rows; N: panels of one and two registers of columns (AVX-512; on AVX2 16 columns are one tile)
@pytest.mark.parametrize("rows, m, n", [(0, 5, 16), (1, 3, 16), (7, 9, 48), (600, 13, 32), (2048, 64, 64),
                                        (1025, 4, 256)])
def test_weight_grad_is_a_transposed_times_b_on_the_fused_kernel(rows, m, n):
    torch.manual_seed(0)
    a, b = torch.randn(rows, m), torch.randn(rows, n)
    with torch.profiler.profile() as prof:
        got = gemm.weight_grad(a, b)
    if gemm.has_avx2():
        assert [e.name for e in prof.events() if e.name.startswith("vwn_gemm")] == ["vwn_gemm::weight_grad"]
    want = a.double().T @ b.double()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6 * max(1.0, want.abs().max().item()))


def test_weight_grad_takes_torchs_matmul_where_the_kernel_does_not_apply():
    torch.manual_seed(0)
    a, b = torch.randn(40, 8), torch.randn(40, 24)  # 24 columns: not whole vectors of 16
    for x, y in ((a, b), (a, torch.randn(24, 40).T), (a.double(), b.double())):
        with torch.profiler.profile() as prof:
            got = gemm.weight_grad(x, y)
        assert not any(e.name.startswith("vwn_gemm") for e in prof.events())
        torch.testing.assert_close(got.double(), x.double().T @ y.double(), rtol=1e-6, atol=1e-5)


def test_linear_and_its_gradients_equal_f_linear_on_onednn(monkeypatch):
    monkeypatch.setattr(gemm, "use_onednn", lambda: True)
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24, requires_grad=True)
    # as nn.Linear, .T, a slice; and 32 inputs, whose weight gradient takes the fused kernel
    for weight in (torch.randn(16, 24), torch.randn(24, 16).T, torch.randn(16, 48)[:, 24:], torch.randn(16, 32)):
        weight.requires_grad_()
        x = torch.randn(3, 5, weight.shape[1], requires_grad=True)
        assert gemm.takes(x, weight)
        out = gemm.linear(x, weight)
        grads = torch.autograd.grad(out, (x, weight), torch.ones_like(out) * torch.arange(16.0))
        want = torch.nn.functional.linear(x.double(), weight.double())
        want_grads = torch.autograd.grad(want, (x, weight), torch.ones_like(want) * torch.arange(16.0).double())
        torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-5)
        for grad, want_grad in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(grad.double(), want_grad.double(), rtol=1e-6, atol=1e-4)


def test_linear_with_a_bias_and_its_gradients_equal_f_linear_on_onednn(monkeypatch):
    monkeypatch.setattr(gemm, "use_onednn", lambda: True)
    torch.manual_seed(0)
    x, weight, bias = (torch.randn(*shape, requires_grad=True) for shape in ((6, 8), (3, 8), (3,)))
    out = gemm.linear(x, weight, bias)
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "_OneDNNLinearBackward"  # under the view back
    grads = torch.autograd.grad(out, (x, weight, bias), torch.arange(18.0).view(6, 3))
    want = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    want_grads = torch.autograd.grad(want, (x, weight, bias), torch.arange(18.0).view(6, 3).double())
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-5)
    for grad, want_grad in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad.double(), want_grad.double(), rtol=1e-6, atol=1e-4)


def test_linear_keeps_torch_outside_fp32_cpu_eager(monkeypatch):
    monkeypatch.setattr(gemm, "use_onednn", lambda: True)
    x, weight = torch.randn(4, 8), torch.randn(3, 8)
    assert gemm.takes(x, weight) and not gemm.takes(x.double(), weight.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemm.takes(x, weight)
    monkeypatch.setattr(gemm, "use_onednn", lambda: False)
    assert not gemm.takes(x, weight)
    assert gemm.linear(x, weight).grad_fn is None  # torch's F.linear, no autograd function of ours


def test_a_linear_module_keeps_nn_linears_parameter_and_state_dict_key():
    layer = gemm.Linear(8, 3)
    assert isinstance(layer, torch.nn.Linear) and layer.bias is None and list(layer.state_dict()) == ["weight"]
