"""The fused CPU GHC kernels against the reference path (float64), and when the model takes them."""

import copy

import pytest
import torch

from harness.model import cpu_kernels, gemm, ghc_kernel
from harness.model.config import ModelConfig
from harness.model.ghc import GeneralizedHyperConnection, group_normalized, run_stack, tile_state, untile_state
from harness.model.transformer import MultiTokenPredictor

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
    state = tile_state(h)  # lane tiles for the fused kernels in fp32; h itself in float64
    x, mix = connection.read(state)
    new = untile_state(connection.write(state, z * x, mix))
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
    assert isinstance(connection.read(tile_state(h))[1], ghc_kernel.MixingParameters)  # fp32 on CPU: the kernels
    fused = read_write_with_gradients(connection, h, z)
    reference_connection = copy.deepcopy(connection).double()
    assert not isinstance(reference_connection.read(tile_state(h.double()))[1], ghc_kernel.MixingParameters)
    reference = read_write_with_gradients(reference_connection, h.double(), z.double())
    names = ["new state", "grad h", "grad z"] + [name for name, _ in connection.named_parameters()]
    assert len(fused) == len(reference) == len(names)
    for name, got, want in zip(names, fused, reference, strict=True):
        error = (got.double() - want).abs().max() / want.abs().max()
        assert error < 2e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("m,n", [(2, 3), (1, 4), (2, 16), (8, 16)])  # (8, 64): 1e-4 through three layers, fused or not
@pytest.mark.parametrize("dynamic", [True, False])
def test_a_stack_of_fused_writes_and_reads_matches_the_reference_path_in_float64(m, n, dynamic):
    """Three GHCs in a row: each write and the next read are one op on lane tiles (`run_stack`); values and every
    gradient, the middle GHC's state gradient being the sum of the next write's and the next read's."""
    connections = torch.nn.ModuleList(perturbed_connection(m, n, dynamic, 0.3) for _ in range(3))
    with torch.no_grad():
        for i, connection in enumerate(connections):
            for parameter in connection.parameters():
                parameter.add_(0.1 * i)  # three different GHCs
    weights = [torch.randn(D_MODEL, D_MODEL) / D_MODEL**0.5 for _ in connections]
    h = torch.randn(3, 50, n, D_MODEL // m)

    def stacked_with_gradients(connections, h, weights):
        h = h.clone().requires_grad_()
        sublayers = [lambda x, w=w: torch.tanh(x @ w) for w in weights]
        stack = list(zip(connections, sublayers, strict=True))
        new = untile_state(run_stack(tile_state(h), stack))
        (new * torch.linspace(-1.0, 1.0, new.numel(), dtype=new.dtype).view_as(new)).sum().backward()
        return [new.detach(), h.grad] + [p.grad for p in connections.parameters()]

    fused = stacked_with_gradients(connections, h, weights)
    reference = stacked_with_gradients(copy.deepcopy(connections).double(), h.double(), [w.double() for w in weights])
    names = ["new state", "grad h"] + [name for name, _ in connections.named_parameters()]
    for name, got, want in zip(names, fused, reference, strict=True):
        error = (got.double() - want).abs().max() / want.abs().max()
        assert error < 2e-5, f"{name}: relative error {error:.2e}"


def test_the_fused_ops_run_without_autograd_as_with_it():
    """Under torch.inference_mode (Lightning's validation), where dispatch skips the ops' autograd, and no_grad: the
    values of a call that records the graph, and nothing recorded."""
    connections = [perturbed_connection(2, 3, True, 0.3) for _ in range(3)]
    config = ModelConfig(vocab_size=64, d_model=D_MODEL, n_layers=1, n_heads=2, seq_len=50, virtual_width=(2, 3),
                         mtp=True)
    merge = MultiTokenPredictor(config)
    h, embed = torch.randn(2, 3, 50, 3, D_MODEL // 2)
    stack = [(connection, torch.tanh) for connection in connections]

    def state_through_everything():
        state = run_stack(tile_state(h), stack)
        return untile_state(run_stack(merge.merged(state, embed), stack))

    recorded = state_through_everything()
    assert recorded.requires_grad
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            unrecorded = state_through_everything()
        assert not unrecorded.requires_grad
        torch.testing.assert_close(unrecorded, recorded.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("m,n", [(2, 3), (1, 4), (2, 16), (8, 64)])
def test_fused_mtp_merge_matches_the_reference_path_in_float64(m, n):
    """The MTP module's norms and merge from and to lane tiles: values and every gradient."""
    config = ModelConfig(vocab_size=64, d_model=D_MODEL, n_layers=1, n_heads=2, seq_len=50, virtual_width=(m, n),
                         mtp=True)
    torch.manual_seed(n)
    mtp = MultiTokenPredictor(config)
    with torch.no_grad():
        for parameter in mtp.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    h, embed = torch.randn(2, 2, 3, 50, n, D_MODEL // m)  # 150 tokens: the last tile holds 6

    def merged_with_gradients(module: MultiTokenPredictor, h: torch.Tensor, embed: torch.Tensor):
        h, embed = h.clone().requires_grad_(), embed.clone().requires_grad_()
        state = module.merged(tile_state(h), embed)  # lane tiles in fp32, h itself in float64
        out = untile_state(state)
        (out * torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        norms_and_merge = [module.hidden_norm.weight, module.embed_norm.weight, module.merge.weight]
        return state, [out.detach(), h.grad, embed.grad] + [p.grad for p in norms_and_merge]

    state, fused = merged_with_gradients(mtp, h, embed)
    assert isinstance(state, ghc_kernel.LaneTiles)
    reference_module = copy.deepcopy(mtp).double()
    state, reference = merged_with_gradients(reference_module, h.double(), embed.double())
    assert not isinstance(state, ghc_kernel.LaneTiles)
    names = ["merged", "grad hidden", "grad embed", "grad hidden norm", "grad embed norm", "grad merge"]
    for name, got, want in zip(names, fused, reference, strict=True):
        error = (got.double() - want).abs().max() / want.abs().max()
        assert error < 2e-6, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("n,groups", [(3, 3), (8, 4), (64, 8)])
def test_group_norm_of_lane_tiles_matches_the_reference_path_in_float64(n, groups):
    """The reduce head's group norm straight from lane tiles (`group_normalized`): values and the state's gradient,
    150 tokens (6 in the last tile)."""
    torch.manual_seed(n)
    h = torch.randn(3, 50, n, 8) * torch.linspace(0.5, 3.0, n * 8).view(n, 8) + 0.5

    weights = torch.randn(3, 50, groups, n * 8 // groups)  # not smooth: a norm's backward cancels smooth gradients

    def normalized_with_gradient(h: torch.Tensor) -> list[torch.Tensor]:
        h = h.clone().requires_grad_()
        y = group_normalized(tile_state(h), groups, 1e-5)
        (y * weights.to(y.dtype)).sum().backward()
        return [y.detach(), h.grad]

    assert isinstance(tile_state(h), ghc_kernel.LaneTiles)
    fused, reference = normalized_with_gradient(h), normalized_with_gradient(h.double())
    for name, got, want in zip(["normalized", "grad state"], fused, reference, strict=True):
        error = (got.double() - want).abs().max() / want.abs().max()
        assert error < 2e-6, f"{name}: relative error {error:.2e}"


def test_lane_tiles_hold_token_lt_plus_l_in_lane_l_of_tile_t():
    lanes = ghc_kernel.lanes()
    assert lanes == (16 if "avx512f" in gemm._cpu()[1] else 8)  # one vector register of floats
    h = torch.randn(3, 50, 4, 32, requires_grad=True)  # 150 tokens: 6 in the last tile at 16 or 8 lanes
    tiles = tile_state(h)
    last = 150 // lanes
    assert isinstance(tiles, ghc_kernel.LaneTiles) and tiles.data.shape == (last + 1, 4, 32, lanes)
    tokens = h.detach().flatten(0, 1)
    for t, lane in [(0, 0), (3, lanes - 1), (last, 5)]:
        torch.testing.assert_close(tiles.data[t, ..., lane], tokens[lanes * t + lane], rtol=0, atol=0)
    assert tiles.data[last, ..., 6:].abs().max() == 0  # past the last token
    back = untile_state(tiles)
    torch.testing.assert_close(back, h, rtol=0, atol=0)
    weights = torch.randn_like(h)
    (back * weights).sum().backward()
    torch.testing.assert_close(h.grad, weights, rtol=0, atol=0)


def test_fused_kernels_follow_a_non_contiguous_state():
    connection = perturbed_connection(2, 4, True, 0.3)
    h = torch.randn(50, 3, 4, 32).transpose(0, 1)  # (3, 50, 4, 32), not contiguous
    x, mix = connection.read(tile_state(h))
    assert isinstance(mix, ghc_kernel.MixingParameters)
    reference = copy.deepcopy(connection).double()
    want, _ = reference.read(h.double())
    torch.testing.assert_close(x.double(), want, rtol=1e-5, atol=1e-6)


def test_the_ops_take_lane_tiles_off_a_64_byte_boundary_or_strided():
    """The kernels load whole tiles: an offset view (as autograd or inductor may hand over) or a strided one is
    copied first, not read misaligned."""
    connection = perturbed_connection(2, 3, True, 0.3)
    proj, scale = connection.coeff_proj.detach(), connection.coeff_scale.detach()
    lanes = ghc_kernel.lanes()
    operands = (connection.static_a.detach(), connection.static_b.detach(), proj, scale, connection.temperature,
                lanes)
    tiles = torch.randn(1, 3, D_MODEL // 2, lanes)
    offset = torch.randn(tiles.numel() + 1)[1:].view_as(tiles).copy_(tiles)  # 4 bytes past the boundary
    strided = torch.randn(1, lanes, 3, D_MODEL // 2).permute(0, 2, 3, 1).copy_(tiles)  # lanes outermost in memory
    want = torch.ops.vwn_ghc.read_forward(tiles, *operands, 1e-6)
    for view in (offset, strided):
        torch.testing.assert_close(torch.ops.vwn_ghc.read_forward(view, *operands, 1e-6), want, rtol=0, atol=0)


def test_the_ops_reject_operands_they_cannot_take():
    a, b = torch.randn(3, 5), torch.randn(2, 3)  # A (n, m + n), B (m, n) for m = 2, n = 3
    read = torch.ops.vwn_ghc.read_forward
    lanes = ghc_kernel.lanes()
    not_tiles = rf"h must be float32 CPU lane tiles \(tiles, n, d, {lanes}\), got "
    with pytest.raises(RuntimeError, match=not_tiles + r".* Double"):
        read(torch.randn(1, 3, 32, lanes, dtype=torch.float64), a, b, None, None, 1.0, 8, 1e-6)
    with pytest.raises(RuntimeError, match=not_tiles + rf"\[1, 3, 32, {lanes // 2}\]"):
        read(torch.randn(1, 3, 32, lanes // 2), a, b, None, None, 1.0, 8, 1e-6)
    with pytest.raises(RuntimeError, match="40 tokens of 2 x 32 for 1 tiles"):
        read(torch.randn(1, 3, 32, lanes), a, b, None, None, 1.0, 40, 1e-6)
    with pytest.raises(RuntimeError, match=r"A must be \(n, m \+ n\) and B \(m, n\), here \(3, 6\) and \(3, 3\), "
                                           r"got \[3, 5\] and \[3, 2\]"):
        read(torch.randn(1, 3, 32, lanes), a, b.T.contiguous(), None, None, 1.0, 8, 1e-6)
    with pytest.raises(RuntimeError, match=r"here \(4, 6\) and \(2, 4\), got \[3, 5\] and \[2, 3\]"):  # 4 slots
        read(torch.randn(1, 4, 32, lanes), a, b, None, None, 1.0, 8, 1e-6)
    with pytest.raises(RuntimeError, match=r"proj must be \(32, 7\) and scale \(3, 7\), got \[32, 5\]"):
        read(torch.randn(1, 3, 32, lanes), a, b, torch.randn(32, 5), torch.randn(3, 7), 1.0, 8, 1e-6)


def test_other_dtypes_take_the_reference_path():
    connection = perturbed_connection(2, 3, True, 0.3)
    h = torch.randn(2, 5, 3, 32, dtype=torch.bfloat16)
    assert tile_state(h) is h
    _, mix = connection.read(h)
    carry, b_t = mix  # the torch path's carry and Bᵀ
    assert carry.shape == (2, 5, 3, 32) and b_t.shape == (2, 5, 3, 2)


def test_the_kernels_tanh_is_accurate_to_fp32_rounding():
    """One slot of width 2, state (1, b): rstd · H W = L · b · √(2 / (1 + b²)) sweeps the tanh argument over
    (-√2·L, √2·L) as b varies by token, and with static 0 and scale 1 the read is x = tanh(that) · (1, b)."""
    limit = 12.0
    b = torch.cat([torch.linspace(-30.0, 30.0, 20001), torch.linspace(-0.01, 0.01, 2001)]).double()
    h = torch.stack([torch.ones_like(b), b], dim=-1).unsqueeze(1)  # (tokens, n = 1, d = 2)
    proj = torch.zeros(2, 3)
    proj[1, 0] = 2 * limit  # over the temperature 2
    a, b_static, scale = torch.zeros(1, 2), torch.zeros(1, 1), torch.ones(1, 3)  # m = n = 1
    tiles = torch.ops.vwn_ghc.to_tiles(h.float())
    x = torch.ops.vwn_ghc.read_forward(tiles, a, b_static, proj, scale, 2.0, len(b), 0.0)[:, 0, 0].double()
    argument = limit * b * torch.sqrt(2.0 / (1.0 + b.square()))
    want = torch.tanh(argument)
    assert argument.abs().max() > 9.0  # saturation
    assert (x - want).abs().max() < 3.2e-7  # its bound over all fp32 (scripts/fit_tanh.py); torch's tanh: 5e-8 here
    assert x.abs().max() <= 1.0
    small = argument.abs() < 0.1  # where relative error is what matters
    assert small.sum() > 1000
    assert ((x - want)[small] / want[small]).abs().max() < 3e-7  # the argument's fp32 rounding included
