"""Parameter and FLOP accounting against the built model and the paper's cost table."""

from __future__ import annotations

import dataclasses
import re

import pytest

from harness.model import LanguageModel, ModelConfig, accounting

BASE = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=2, seq_len=16, n_experts=4, top_k=2, d_ff=24)

VARIANTS = [
    {},
    {"virtual_width": (2, 3)},
    {"virtual_width": (8, 64), "mtp": True},
    {"virtual_width": (1, 4), "dynamic": False},
    {"virtual_width": (4, 16), "embedding": "factorized", "tie_embeddings": True, "mtp": True},
    {"virtual_width": (2, 6), "group_norm": False, "n_shared_experts": 2},
    {"virtual_width": (2, 4), "n_experts": 0, "mtp": True},
    {"tie_embeddings": True, "mtp": True},
]


def component_of(name: str) -> str:
    """Which accounting component a parameter of the built model belongs to."""
    if name.startswith("mtp."):
        return "mtp"
    if name.startswith("embed."):
        return "embedding"
    if "_connection." in name:
        return "ghc"
    if re.match(r"blocks\.\d+\.attn", name):
        return "attention"
    if re.match(r"blocks\.\d+\.ffn", name):
        return "moe"
    if name.startswith(("head.group_norm", "head.reduce")):
        return "reduce"
    if name.startswith(("head.norm", "lm_head")):
        return "head"
    raise AssertionError(f"unmapped parameter {name}")


@pytest.mark.parametrize("changes", VARIANTS, ids=str)
def test_parameter_counts_match_the_built_model_by_component(changes):
    config = dataclasses.replace(BASE, **changes)
    model = LanguageModel(config)
    counts = accounting.count_parameters(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    measured: dict[str, int] = {}
    for name, p in model.named_parameters():
        measured[component_of(name)] = measured.get(component_of(name), 0) + p.numel()
    for component in ("embedding", "attention", "moe", "ghc", "reduce", "head", "mtp"):
        assert counts[component] == measured.get(component, 0), component


def test_active_parameters_count_only_the_chosen_experts():
    config = dataclasses.replace(BASE, n_experts=8, top_k=2)
    counts = accounting.count_parameters(config)
    expert = 3 * config.d_model * config.d_ff
    assert counts["moe"] - counts["moe_active"] == config.n_layers * 6 * expert
    assert counts["active"] == counts["total"] - config.n_layers * 6 * expert


@pytest.mark.parametrize("d_model", [512, 2048])
def test_ghc_flops_follow_the_paper_table(d_model):
    assert accounting.ghc_flops_per_token(d_model, 8, 64) == 2592 * d_model
    assert accounting.ghc_flops_per_token(d_model, 2, 3) == 48 * d_model
    for m, n in [(1, 1), (2, 4), (4, 16), (8, 32), (16, 128)]:
        r = n / m
        assert accounting.ghc_flops_per_token(d_model, m, n) == 4 * r * (m * (r + 2) + 1) * d_model
        # static GHC: only the width (read + carry) and depth (write) connections remain
        assert accounting.ghc_flops_per_token(d_model, m, n, dynamic=False) == (2 * (m + n) * r + 2 * n) * d_model


def test_flops_per_token_components():
    base = accounting.flops_per_token(BASE)
    assert base["ghc"] == 0 and base["reduce"] == 0 and base["mtp"] == 0
    assert base["total"] == sum(v for k, v in base.items() if k != "total")
    wide = accounting.flops_per_token(dataclasses.replace(BASE, virtual_width=(2, 16), mtp=True))
    d_wide = 8 * BASE.d_model
    assert wide["ghc"] == BASE.n_layers * 2 * accounting.ghc_flops_per_token(BASE.d_model, 2, 16)
    assert wide["reduce"] == 2 * d_wide * BASE.d_model
    assert wide["attention"] == base["attention"] and wide["moe"] == base["moe"]
    # one extra layer, the block linear, a reduce and a second LM head
    per_layer = (base["attention"] + base["moe"]) // BASE.n_layers + wide["ghc"] // BASE.n_layers
    assert wide["mtp"] == per_layer + 4 * 16 * d_wide + wide["reduce"] + base["head"]
    # top-k experts, not all of them, are active
    eight = accounting.flops_per_token(dataclasses.replace(BASE, n_experts=8))
    assert eight["moe"] - base["moe"] == BASE.n_layers * 2 * BASE.d_model * 4
