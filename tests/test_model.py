"""The VWN model: causality, degenerate cases, mixing, shapes, gradients and learning."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from harness.model import LanguageModel, ModelConfig, cpu_kernels, gemm
from harness.model import moe as moe_module
from harness.model.ghc import GeneralizedHyperConnection
from harness.model.moe import (
    MixtureOfExperts,
    SwiGLU,
    _FusedSwiGLU,
    _OneDNNExperts,
    bucketed,
    expert_matmul,
    expert_windows,
    gated_silu,
)
from harness.model.transformer import ReduceHead, rotary_tables

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, seq_len=16, n_experts=4, top_k=2, d_ff=32)

# r in {1, 1.5, 2, 4, 8} at m in {1, 2, 4, 8}, wherever n = r·m is a whole number
WIDTHS = [(m, int(r * m)) for r in (1.0, 1.5, 2.0, 4.0, 8.0) for m in (1, 2, 4, 8) if (r * m).is_integer()]


def build(seed: int = 0, **changes) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(dataclasses.replace(TINY, **changes))


def tokens(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize_mixing(model: LanguageModel) -> None:
    """Move every GHC off its initialisation so tests exercise general mixing, not the identity-like start."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("static_a", "static_b", "coeff_proj", "coeff_scale")):
                p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("virtual_width", [(1, 1), (2, 3), (4, 32)])
@pytest.mark.parametrize("dynamic", [False, True])
def test_both_heads_are_causal(virtual_width, dynamic):
    model = build(virtual_width=virtual_width, dynamic=dynamic, mtp=True).eval()
    randomize_mixing(model)
    x = tokens()
    t = 9
    changed = x.clone()
    changed[:, t] = (changed[:, t] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(x), model(changed)
    # NOTE: not bit-equal: with 2 threads MKL's rounding of a small expert matmul depends on its row count
    torch.testing.assert_close(a.logits[:, :t], b.logits[:, :t], rtol=0, atol=1e-5)
    assert not torch.allclose(a.logits[:, t], b.logits[:, t])
    # MTP at position t-1 reads the embedding of token t, so only positions < t-1 must be untouched
    torch.testing.assert_close(a.mtp_logits[:, : t - 1], b.mtp_logits[:, : t - 1], rtol=0, atol=1e-5)
    assert not torch.allclose(a.mtp_logits[:, t - 1], b.mtp_logits[:, t - 1])


def plain_transformer_logits(model: LanguageModel, x: torch.Tensor) -> torch.Tensor:
    """A textbook pre-norm residual transformer reusing the model's weights."""
    rope = model.rope(x.shape[1])
    h = model.embed.table(x)
    for block in model.blocks:
        h = h + block.attn(block.attn_norm(h), rope)
        h = h + block.ffn(block.ffn_norm(h))[0]
    return model.lm_head(model.head.norm(h))


@pytest.mark.parametrize("dynamic", [False, True])
def test_width_one_is_the_plain_residual_transformer(dynamic):
    model = build(virtual_width=(1, 1), dynamic=dynamic).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain_transformer_logits(model, x), rtol=1e-5, atol=1e-6)
    assert not any("connection" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("virtual_width", [(2, 3), (2, 4), (4, 32), (1, 4)])
def test_at_init_the_backbone_sees_exactly_the_first_d_channels(virtual_width):
    """With dynamic weights at zero, slots 0..m-1 are an ordinary residual stream of width D whose
    input is the first D channels of the wide embedding."""
    model = build(virtual_width=virtual_width, dynamic=True).eval()
    x = tokens()
    seen: list[torch.Tensor] = []
    hooks = [norm.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
             for block in model.blocks for norm in (block.attn_norm, block.ffn_norm)]
    with torch.no_grad():
        model(x)
        for hook in hooks:
            hook.remove()
        rope = model.rope(x.shape[1])
        h = model.embed.table(x)[..., : TINY.d_model]
        expected = []
        for block in model.blocks:
            expected.append(h)
            h = h + block.attn(block.attn_norm(h), rope)
            expected.append(h)
            h = h + block.ffn(block.ffn_norm(h))[0]
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_read_takes_first_m_slots_and_write_is_cyclic_at_init():
    ghc = GeneralizedHyperConnection(d_model=12, m=2, n=5, dynamic=True)
    h = torch.randn(3, 4, 5, 6)
    x, mix = ghc.read(h)
    torch.testing.assert_close(x, h[..., :2, :].flatten(-2))
    z = torch.randn(3, 4, 12)
    out = ghc.write(h, z, mix)
    segments = z.unflatten(-1, (2, 6))
    for slot in range(5):
        torch.testing.assert_close(out[..., slot, :], h[..., slot, :] + segments[..., slot % 2, :])


def paper_dghc(ghc: GeneralizedHyperConnection, h: torch.Tensor, sublayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's §4 equations, token by token and slot by slot as printed: (sublayer input x, new state)."""
    m, n, d_b = ghc.m, ghc.n, ghc.d_slot
    w_alpha, w_beta = ghc.coeff_proj[:, : m + n], ghc.coeff_proj[:, m + n :]
    s_alpha, s_beta = ghc.coeff_scale[:, : m + n], ghc.coeff_scale[:, m + n :].T  # S_β is (m, n)
    xs, outs = [], []
    for h_t in h.reshape(-1, n, d_b):
        h_bar = F.rms_norm(h_t, (d_b,), eps=ghc.eps)
        a = s_alpha * torch.tanh(h_bar @ w_alpha / d_b**0.5) + ghc.static_a  # 𝓐 (n, m+n)
        b = (s_beta.T * torch.tanh(h_bar @ w_beta / d_b**0.5)).T + ghc.static_b  # 𝓑 (m, n)
        x = a[:, :m].T @ h_t  # Åᵀ H (m, d_b)
        z = sublayer(x.flatten()).view(m, d_b)
        xs.append(x.flatten())
        outs.append(b.T @ z + a[:, m:].T @ h_t)
    return torch.stack(xs).view(*h.shape[:-2], -1), torch.stack(outs).view_as(h)


@pytest.mark.parametrize("m, n", [(2, 3), (2, 8), (4, 4), (1, 3)])
def test_dynamic_ghc_matches_the_papers_equations_off_init(m, n):
    """Outputs, and the gradients of the state and every parameter (the coefficient backward is written
    out by hand), against autograd through the paper's equations; float64."""
    torch.manual_seed(0)
    ghc = GeneralizedHyperConnection(d_model=16, m=m, n=n, dynamic=True).double()
    with torch.no_grad():
        for p in ghc.parameters():
            p.add_(0.5 * torch.randn_like(p))
    h = torch.randn(2, 3, n, 16 // m, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, 16, dtype=torch.float64) / 4
    sublayer = lambda x: torch.tanh(x @ weight)  # any token-wise map of width D
    grad_x, grad_out = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn_like(h)

    def outputs_and_gradients(forward) -> list[torch.Tensor]:
        x, out = forward()
        inputs = [h, *ghc.parameters()]
        return [x, out, *torch.autograd.grad([x, out], inputs, [grad_x, grad_out])]

    def harness() -> tuple[torch.Tensor, torch.Tensor]:
        x, mix = ghc.read(h)
        return x, ghc.write(h, sublayer(x), mix)

    got = outputs_and_gradients(harness)
    expected = outputs_and_gradients(lambda: paper_dghc(ghc, h, sublayer))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_dynamic_coefficients_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    ghc = GeneralizedHyperConnection(d_model=16, m=2, n=4, dynamic=True)
    with torch.no_grad():
        ghc.coeff_proj.normal_()
    h = torch.randn(2, 3, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = ghc.mixing(h)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, ghc.mixing(h))


@pytest.mark.parametrize("name, index", [("static_a", (1, 4)), ("static_b", (0, 2)), ("static_a", (2, 0))])
@pytest.mark.parametrize("dynamic", [False, True])
def test_changing_a_static_mixing_entry_changes_the_output(name, index, dynamic):
    """Guards against the known hyper-connection bug where mixing matrices were left unused."""
    model = build(virtual_width=(2, 4), dynamic=dynamic).eval()
    x = tokens()
    with torch.no_grad():
        before = model(x).logits
        getattr(model.blocks[0].attn_connection, name)[index] += 0.5
        after = model(x).logits
    assert (before - after).abs().max() > 1e-4


def test_dynamic_weights_get_nonzero_gradients_on_the_first_step():
    model = build(virtual_width=(2, 6), dynamic=True, mtp=True)
    out = model(tokens())
    target = tokens(seed=3).flatten()
    loss = F.cross_entropy(out.logits.flatten(0, 1), target) + F.cross_entropy(out.mtp_logits.flatten(0, 1), target)
    loss.backward()
    for name, p in model.named_parameters():
        if name.endswith("coeff_proj"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("virtual_width", WIDTHS)
def test_every_width_runs_forward_backward_with_gradients_everywhere(virtual_width):
    model = build(virtual_width=virtual_width, dynamic=True, mtp=True)
    x = tokens()
    out = model(x, next_token=x[:, 0])
    assert out.logits.shape == (2, 16, TINY.vocab_size) and out.mtp_logits.shape == (2, 16, TINY.vocab_size)
    loss = out.logits.logsumexp(-1).mean() + out.mtp_logits.logsumexp(-1).mean() + out.aux_loss
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient at {virtual_width}"
        # S multiplies tanh(H̄W/τ), which is exactly 0 while W is at its zero initialisation
        if not name.endswith("coeff_scale"):
            assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient at {virtual_width}"


@pytest.mark.parametrize("changes, field, allowed", [
    ({"virtual_width": (3, 6)}, "virtual_width", "allowed m: [1, 2, 4, 8, 16, 32]"),
    ({"virtual_width": (4, 2)}, "virtual_width", "n >= m"),
    ({"virtual_width": (0, 2)}, "virtual_width", ">= 1"),
    ({"virtual_width": (2, 0)}, "virtual_width", ">= 1"),
    ({"n_heads": 3}, "n_heads", "must divide d_model=32"),
    ({"top_k": 5}, "top_k", "1..n_experts=4"),
    ({"tie_embeddings": True, "virtual_width": (1, 2)}, "tie_embeddings", "factorized"),
])
def test_invalid_shapes_name_the_field_and_allowed_values(changes, field, allowed):
    with pytest.raises(ValueError, match=f"model.{field}") as error:
        dataclasses.replace(TINY, **changes)
    assert allowed in str(error.value)


def test_factorized_embedding_and_tied_head_share_one_table():
    model = build(virtual_width=(2, 8), embedding="factorized", tie_embeddings=True)
    assert model.lm_head.weight is model.embed.table.weight
    assert model.embed.table.weight.shape == (TINY.vocab_size, TINY.d_model)
    assert model.embed.expand.weight.shape == (8 * 16, TINY.d_model)


@pytest.mark.parametrize("embedding", ["direct", "factorized"])
def test_shifted_pair_equals_two_lookups_in_values_and_table_gradient(embedding):
    embed = build(virtual_width=(2, 8), embedding=embedding).embed
    window = tokens(batch=3, seq=17)
    upstream = [torch.randn(3, 16, 8, 16) for _ in range(2)]
    pair = embed.shifted_pair(window)
    torch.autograd.backward(pair, upstream)
    grads = [p.grad.clone() for p in embed.parameters()]
    embed.zero_grad()
    expected = embed(window[:, :-1]), embed(window[:, 1:])
    torch.autograd.backward(expected, upstream)
    for got, want in zip(pair, expected, strict=True):
        torch.testing.assert_close(got, want)
    for got, p in zip(grads, embed.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad)
    assert grads[0].count_nonzero() > 0


# 150 rows: experts of a block of 64 rows and one more row, of several blocks and a part of one; an expert with
# no rows
FUSED_ENDS = {"ragged": [17, 82, 82, 150], "empty first": [0, 61, 130, 150], "one expert": [150]}


@pytest.mark.parametrize("hidden", [16, 48])  # one and three vectors of 16; 2F: one tile of 32, a tile and a half
@pytest.mark.parametrize("ends", FUSED_ENDS.values(), ids=FUSED_ENDS.keys())
def test_fused_swiglu_experts_equal_each_experts_swiglu(ends, hidden):
    """csrc/swiglu.cpp against each expert's SwiGLU on its own rows in float64: output and the gradients of the
    rows, W_in and W_out."""
    assert cpu_kernels.available()
    torch.manual_seed(0)
    experts = len(ends)
    x = torch.randn(150, 32, requires_grad=True)
    w_in = (torch.randn(experts, 32, 2 * hidden) / 4).requires_grad_()
    w_out = (torch.randn(experts, hidden, 32) / 4).requires_grad_()
    out = _FusedSwiGLU.apply(x, w_in, w_out, torch.tensor(ends, dtype=torch.int32))
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w_in, w_out), grad_out)
    bounds = [0, *ends]
    groups = enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    want = torch.cat([gated_silu(x[a:b].double() @ w_in[e].double()) @ w_out[e].double() for e, (a, b) in groups])
    want_grads = torch.autograd.grad(want, (x, w_in, w_out), grad_out.double())
    for got, expected in zip((out, *grads), (want, *want_grads), strict=True):
        torch.testing.assert_close(got.double(), expected.double(), rtol=0, atol=1e-6 * expected.abs().max().item())


@pytest.mark.skipif(not gemm.has_avx2(), reason="the fused SwiGLU kernel runs on CPUs with AVX2 or AVX-512 only")
def test_the_moe_layer_and_the_dense_swiglu_take_the_fused_kernel(monkeypatch):
    torch.manual_seed(0)
    moe = MixtureOfExperts(32, 16, 4, 2, 0, False, 0.0)
    dense = SwiGLU(32, 16)
    for p in [*moe.parameters(), *dense.parameters()]:
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 40, 32)
    for layer in (moe, dense):
        fused, _ = layer(x)
        assert "_FusedSwiGLUBackward" in autograd_nodes(fused)
        with monkeypatch.context() as patch:
            patch.setattr(moe_module, "_fused_swiglu_takes", lambda *operands: False)
            unfused, _ = layer(x)
        assert "_FusedSwiGLUBackward" not in autograd_nodes(unfused)
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)


def test_no_decay_covers_norms_tables_and_static_mixing_only():
    model = build(virtual_width=(2, 4), dynamic=True, mtp=True)
    no_decay = model.no_decay_parameter_names()
    assert "embed.table.weight" in no_decay
    assert "blocks.0.attn_connection.static_a" in no_decay and "blocks.1.ffn_connection.static_b" in no_decay
    assert "blocks.0.attn_norm.weight" in no_decay and "head.group_norm.bias" in no_decay
    assert "blocks.0.attn_connection.coeff_proj" not in no_decay
    assert "blocks.0.attn.qkv.weight" not in no_decay and "blocks.0.ffn.w_in" not in no_decay


@pytest.mark.parametrize("d_ff", [6, 8])  # expert rows of 24 bytes: a loop over experts; of 32: grouped GEMM
def test_moe_dispatch_matches_dense_evaluation_of_the_chosen_experts(d_ff, path):
    torch.manual_seed(0)
    moe = MixtureOfExperts(d_model=8, d_ff=d_ff, n_experts=4, top_k=2, n_shared=1,
                           aux_free_balancing=False, bias_update_rate=0.0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 8)
    out, stats = moe(x)
    flat = x.reshape(-1, 8)
    probs = moe.router(flat).softmax(-1)
    top = probs.topk(2, dim=-1)
    gates = top.values / top.values.sum(-1, keepdim=True)
    expected = moe.shared(flat)[0]
    for slot in range(2):
        for t in range(flat.shape[0]):
            e = top.indices[t, slot]
            gate, up = (flat[t] @ moe.w_in[e]).chunk(2)
            expected[t] += gates[t, slot] * ((F.silu(gate) * up) @ moe.w_out[e])
    torch.testing.assert_close(out.reshape(-1, 8), expected, rtol=1e-5, atol=1e-6)
    load = torch.bincount(top.indices.flatten(), minlength=4).float() / top.indices.numel()
    torch.testing.assert_close(stats.balance_loss, 4 * (load * probs.mean(0)).sum())
    torch.testing.assert_close(stats.z_loss, moe.router(flat).logsumexp(-1).square().mean())


@pytest.mark.parametrize("width", [128, 13])  # 13: the kernel's loop past whole vectors
def test_gated_silu_and_its_gradient_match_float64(width, path):
    """silu(gate) · up on the fused kernel and on the torch code, against float64: gates from -100 to 100
    (the sigmoid's both tails), a (2, 3, 2F) batch shape."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 2 * width) * 4
    hidden[0, 0, :width] = torch.linspace(-100.0, 100.0, width)
    hidden.requires_grad_()
    grad = torch.randn(2, 3, width)
    out = gated_silu(hidden)
    (grad_hidden,) = torch.autograd.grad(out, hidden, grad)
    reference = hidden.detach().double().requires_grad_()
    gate, up = reference.chunk(2, dim=-1)
    want = gate * torch.sigmoid(gate) * up
    (want_grad,) = torch.autograd.grad(want, reference, grad.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_hidden.double(), want_grad, rtol=1e-5, atol=1e-6)


def test_aux_free_balancing_nudges_bias_toward_underused_experts():
    moe = MixtureOfExperts(d_model=8, d_ff=6, n_experts=4, top_k=1, n_shared=0,
                           aux_free_balancing=True, bias_update_rate=0.01)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # expert 0 wins for inputs with positive sum
    torch.nn.init.normal_(moe.w_in, std=0.1)
    torch.nn.init.normal_(moe.w_out, std=0.1)
    moe(torch.ones(1, 6, 8))
    moe.update_selection_bias()
    torch.testing.assert_close(moe.selection_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert moe.pending_load.sum() == 0
    assert "selection_bias" in moe.state_dict()


@pytest.mark.parametrize("virtual_width", [(1, 1), (2, 3), (2, 16)])
@pytest.mark.parametrize("mtp", [False, True])
def test_sixty_adamw_steps_on_one_batch_halve_the_loss(virtual_width, mtp):
    model = build(virtual_width=virtual_width, mtp=mtp)
    window = torch.randint(0, TINY.vocab_size, (4, 18), generator=torch.Generator().manual_seed(5))
    x, target, target2 = window[:, :16], window[:, 1:17], window[:, 2:18]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss_fn() -> torch.Tensor:
        out = model(x, next_token=window[:, 16])
        loss = F.cross_entropy(out.logits.flatten(0, 1), target.flatten())
        if mtp:
            loss = loss + F.cross_entropy(out.mtp_logits.flatten(0, 1), target2.flatten())
        return loss, out.aux_loss

    first = loss_fn()[0].item()
    for _ in range(60):
        optimizer.zero_grad()
        loss, aux = loss_fn()
        (loss + aux).backward()
        optimizer.step()
    assert loss_fn()[0].item() < 0.5 * first


def test_reduce_head_is_groupnorm_then_linear_then_rmsnorm():
    """Its layer-norm-and-folded-affine route against the modules it stands for, values and gradients."""
    config = dataclasses.replace(TINY, virtual_width=(2, 8))
    torch.manual_seed(0)
    head = ReduceHead(config)
    for p in head.parameters():
        with torch.no_grad():
            p.add_(0.3 * torch.randn_like(p))
    h = torch.randn(2, 3, config.n, config.d_slot, requires_grad=True)
    reference = lambda h: head.norm(head.reduce(head.group_norm(h.flatten(0, -3).flatten(-2)).view(2, 3, -1)))
    grad = torch.randn(2, 3, config.d_model)
    got, expected = head(h), reference(h)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    parameters = [h, *head.parameters()]
    for a, b in zip(torch.autograd.grad(got, parameters, grad), torch.autograd.grad(expected, parameters, grad),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_mtp_merge_is_one_linear_over_hidden_then_embedding_per_slot():
    model = build(virtual_width=(2, 4), mtp=True)
    config, mtp = model.config, model.mtp
    with torch.no_grad():
        for norm in (mtp.hidden_norm, mtp.embed_norm):
            norm.weight.normal_(1.0, 0.3)
    h, e = torch.randn(2, 16, 4, 16), torch.randn(2, 16, 4, 16)
    rope = rotary_tables(16, config.d_model // config.n_heads, config.rope_theta)
    concatenated = torch.cat([mtp.hidden_norm(h.flatten(-2)).view_as(h), mtp.embed_norm(e.flatten(-2)).view_as(e)], -1)
    expected = mtp.head(mtp.block(mtp.merge(concatenated), rope)[0])
    torch.testing.assert_close(mtp(h, e, rope)[0], expected)


@pytest.mark.parametrize("ends", [[3, 3, 10], [0, 4, 10], [10, 10, 10]],
                         ids=["empty middle", "empty first", "one group"])
def test_expert_matmul_grouped_kernel_matches_a_loop_over_experts(ends):
    """The grouped GEMM (fp32, aligned rows) against per-expert products in float64 (the loop), with
    gradients; and the custom ops' registrations (fake tensors, autograd) pass torch's opcheck."""
    torch.manual_seed(0)
    x, w = torch.randn(10, 8, requires_grad=True), torch.randn(3, 8, 12, requires_grad=True)
    ends_t = torch.tensor(ends, dtype=torch.int32)
    grad = torch.randn(10, 12)
    got = expert_matmul(x, w, ends_t)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bounds = [0, *ends]
    expected = torch.cat([x64[a:b] @ w64[e] for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))])
    torch.testing.assert_close(got, expected.float())
    for a, b in zip(torch.autograd.grad(got, [x, w], grad), torch.autograd.grad(expected, [x64, w64], grad.double()),
                    strict=True):
        torch.testing.assert_close(a, b.float())
    torch.library.opcheck(expert_matmul, (x, w, ends_t))
    torch.library.opcheck(expert_matmul, (x64, w64, ends_t))  # the loop


def test_expert_row_buckets_are_few_and_waste_at_most_an_eighth():
    sizes = {bucketed(rows) for rows in range(1, 5000)}
    assert all(rows <= bucketed(rows) <= 1.125 * rows for rows in range(1, 5000))
    assert len(sizes) < 110  # eight per power of two above 8


def autograd_nodes(out: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind `out`."""
    names, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


# windows past their group: into the next one (17 rows in 18), and the last one's back into the one before (61 in 64)
EXPERT_ENDS = {"ragged": [17, 39, 39, 100], "empty first": [0, 61, 61, 100], "one expert": [100, 100, 100, 100]}


@pytest.mark.parametrize("ends", EXPERT_ENDS.values(), ids=EXPERT_ENDS.keys())
def test_expert_windows_hold_their_group_inside_the_rows(ends):
    start = 0
    for (first, rows, offset, size), end in zip(expert_windows(ends, 100), ends, strict=True):
        assert size == end - start and first >= 0 and first + rows <= 100 and rows == min(100, bucketed(size))
        assert first + offset == start and offset + size <= rows
        start = end
    assert any(rows > size for _, rows, _, size in expert_windows(EXPERT_ENDS["ragged"], 100))


@pytest.mark.parametrize("ends", [EXPERT_ENDS["ragged"], EXPERT_ENDS["empty first"]], ids=["ragged", "empty first"])
def test_experts_on_onednn_equal_each_experts_swiglu(ends, monkeypatch):
    """The MoE's experts as one oneDNN function (windows past their groups both ways, an empty expert) against each
    expert's SwiGLU on its own rows in float64: the output and the gradients of rows, W_in and W_out."""
    assert cpu_kernels.available()
    monkeypatch.setattr(gemm, "use_onednn", lambda: True)
    torch.manual_seed(0)
    x = torch.randn(100, 24, requires_grad=True)
    w_in, w_out = (0.3 * torch.randn(4, 24, 32)).requires_grad_(), (0.3 * torch.randn(4, 16, 24)).requires_grad_()
    ends = torch.tensor(ends, dtype=torch.int32)
    out = _OneDNNExperts.apply(x, w_in, w_out, ends)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w_in, w_out), grad_out)
    bounds = [0, *ends.tolist()]
    groups = enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    want = torch.cat([gated_silu(x[a:b].double() @ w_in[e].double()) @ w_out[e].double() for e, (a, b) in groups])
    want_grads = torch.autograd.grad(want, (x, w_in, w_out), grad_out.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for grad, want_grad in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad.double(), want_grad.double(), rtol=1e-5, atol=1e-5)


def test_the_moe_layer_takes_the_onednn_experts_where_gemm_chooses_onednn(monkeypatch):
    torch.manual_seed(0)
    moe = MixtureOfExperts(16, 8, 4, 2, 0, False, 0.0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 8, 16)
    outs = {}
    for onednn in (False, True):
        monkeypatch.setattr(gemm, "use_onednn", lambda onednn=onednn: onednn)
        out, _ = moe(x)
        assert ("_OneDNNExpertsBackward" in autograd_nodes(out)) is onednn
        outs[onednn] = out
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-6)
