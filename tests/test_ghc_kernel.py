"""The fused CPU GHC kernels against the reference path (float64), and when the model takes them."""

import copy

import pytest
import torch

from harness.model import cpu_kernels, ghc_kernel
from harness.model.ghc import GeneralizedHyperConnection

D_MODEL = 64


@pytest.fixture(scope="module", autouse=True)
def built_kernels():
    assert cpu_kernels.available(), "the CPU kernels did not build (see the warning)"


def perturbed_connection(m: int, n: int, dynamic: bool, proj_std: float) -> GeneralizedHyperConnection:
    """A GHC away from its initialisation: every coefficient path carries a gradient."""
    torch.manual_seed(m * 100 + n)
    connection = GeneralizedHyperConnection(D_MODEL, m, n, dynamic)
    with torch.no_grad():
        for parameter in connection.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
        if dynamic:
            connection.coeff_proj.normal_(0.0, proj_std)
    return connection


def read_write_with_gradients(connection: GeneralizedHyperConnection, h: torch.Tensor, z: torch.Tensor
                              ) -> list[torch.Tensor]:
    """New state and the gradients of a fixed weighting of it w.r.t. h, z and every parameter.

    The sublayer stand-in z ∘ x makes the read's output x part of the loss."""
    h, z = h.clone().requires_grad_(), z.clone().requires_grad_()
    x, mix = connection.read(h)
    new = connection.write(h, z * x, mix)
    weights = torch.linspace(-1.0, 1.0, new.numel(), dtype=new.dtype).view_as(new)
    (new * weights).sum().backward()
    grads = [h.grad, z.grad] + [p.grad for p in connection.parameters()]
    return [new.detach()] + grads


@pytest.mark.parametrize("m,n", [(2, 3), (2, 4), (1, 4), (4, 4), (2, 16), (8, 16), (8, 64)])
@pytest.mark.parametrize("dynamic,proj_std", [(True, 0.3), (True, 5.0), (False, 0.0)])  # 5.0: tanh to saturation
def test_fused_kernels_match_the_reference_path_in_float64(m, n, dynamic, proj_std):
    connection = perturbed_connection(m, n, dynamic, proj_std)
    h = torch.randn(3, 50, n, D_MODEL // m)
    z = torch.randn(3, 50, D_MODEL)
    assert isinstance(connection.read(h)[1], ghc_kernel.MixingParameters)  # fp32 on CPU: the fused kernels
    fused = read_write_with_gradients(connection, h, z)
    reference_connection = copy.deepcopy(connection).double()
    assert not isinstance(reference_connection.read(h.double())[1], ghc_kernel.MixingParameters)  # float64: torch
    reference = read_write_with_gradients(reference_connection, h.double(), z.double())
    names = ["new state", "grad h", "grad z"] + [name for name, _ in connection.named_parameters()]
    assert len(fused) == len(reference) == len(names)
    for name, got, want in zip(names, fused, reference, strict=True):
        error = (got.double() - want).abs().max() / want.abs().max()
        assert error < 2e-5, f"{name}: relative error {error:.2e}"


def test_fused_kernels_follow_a_non_contiguous_state():
    connection = perturbed_connection(2, 4, True, 0.3)
    h = torch.randn(50, 3, 4, 32).transpose(0, 1)  # (3, 50, 4, 32), not contiguous
    x, mix = connection.read(h)
    assert isinstance(mix, ghc_kernel.MixingParameters)
    reference = copy.deepcopy(connection).double()
    want, _ = reference.read(h.double())
    torch.testing.assert_close(x.double(), want, rtol=1e-5, atol=1e-6)


def test_the_ops_reject_operands_they_cannot_take():
    h = torch.randn(8, 3, 32, dtype=torch.float64)
    static = torch.randn(3, 7)
    with pytest.raises(RuntimeError, match="h must be a contiguous float32 CPU tensor"):
        torch.ops.vwn_ghc.read_forward(h, static, None, None, 2, 1e-6)


def test_other_dtypes_take_the_reference_path():
    connection = perturbed_connection(2, 3, True, 0.3)
    _, mix = connection.read(torch.randn(2, 5, 3, 32, dtype=torch.bfloat16))
    carry, b_t = mix  # the torch path's carry and Bᵀ
    assert carry.shape == (2, 5, 3, 32) and b_t.shape == (2, 5, 3, 2)


def test_the_kernels_tanh_is_accurate_to_fp32_rounding():
    """One slot of width 2, state (1, b): rstd · H W = L · b · √(2 / (1 + b²)) sweeps the tanh argument over
    (-√2·L, √2·L) as b varies by token, and with static 0 and scale 1 the read is x = tanh(that) · (1, b)."""
    limit = 12.0
    b = torch.cat([torch.linspace(-30.0, 30.0, 20001), torch.linspace(-0.01, 0.01, 2001)]).double()
    h = torch.stack([torch.ones_like(b), b], dim=-1).unsqueeze(1)  # (tokens, n = 1, d = 2)
    proj = torch.zeros(2, 3, dtype=torch.float64)
    proj[1, 0] = limit
    static, scale = torch.zeros(1, 3), torch.ones(1, 3)
    x = torch.ops.vwn_ghc.read_forward(h.float(), static, proj.float(), scale, 1, 0.0)[:, 0, 0].double()
    argument = limit * b * torch.sqrt(2.0 / (1.0 + b.square()))
    want = torch.tanh(argument)
    assert argument.abs().max() > 9.0  # saturation
    assert (x - want).abs().max() < 2e-7  # torch's own fp32 tanh: 5e-8 here
    small = argument.abs() < 0.1  # the Taylor branch, where relative error is what matters
    assert small.sum() > 1000
    assert ((x - want)[small] / want[small]).abs().max() < 2e-7
