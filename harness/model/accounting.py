"""Parameter and forward-FLOP counts per component, computed from the config alone.

FLOPs count multiply-adds as 2 and cover matrix products (plus the GHC terms of the paper's cost
table, norm included); elementwise work elsewhere (norms, activations, softmax) is left out, as is
usual. Attention scores use the causal average context (T+1)/2 per query: 2·2·D·(T+1)/2 per token.
Components match the module tree, so `count_parameters(c)["total"]` equals the built model's count.
"""

from __future__ import annotations

from harness.model.config import ModelConfig


def ghc_flops_per_token(d_model: int, m: int, n: int, dynamic: bool = True) -> int:
    """FLOPs of one GHC module for one token, per the paper's cost table (VWN §7).

    dynamic: RMSNorm 4·(n/m)·D, coefficients 2·(2m+n)·(n/m)·D, width connection 2·(m+n)·(n/m)·D,
    depth connection 2·n·D; static keeps only the last two. Closed form (dynamic): 4·r·(m·(r+2)+1)·D."""
    d_slot = d_model // m
    flops = 2 * (m + n) * n * d_slot + 2 * n * d_model
    if dynamic:
        flops += 4 * n * d_slot + 2 * (2 * m + n) * n * d_slot
    return flops


def mtp_merge_flops_per_token(d_slot: int, n: int) -> int:
    """FLOPs of the MTP module's merge for one token: one (d_b × 2·d_b) Linear per slot."""
    return 2 * (2 * d_slot) * d_slot * n


def _ghc_parameters(c: ModelConfig) -> int:
    """One GHC module: static A (n, m+n) and B (m, n); dynamic W (d_b, 2m+n) and S (n, 2m+n)."""
    if c.m == c.n == 1:
        return 0
    count = c.n * (c.m + c.n) + c.m * c.n
    if c.dynamic:
        count += (c.d_slot + c.n) * (2 * c.m + c.n)
    return count


def _ffn_parameters(c: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters of one FFN sublayer, its pre-norm included."""
    expert = 3 * c.d_model * c.d_ff
    if c.n_experts == 0:
        return c.d_model + expert, c.d_model + expert
    shared = expert * c.n_shared_experts
    common = c.d_model + c.d_model * c.n_experts + shared
    return common + c.n_experts * expert, common + c.top_k * expert


def _layer_parameters(c: ModelConfig) -> dict[str, int]:
    ffn_total, ffn_active = _ffn_parameters(c)
    return {
        "attention": 4 * c.d_model**2 + c.d_model,
        "moe": ffn_total,
        "moe_active": ffn_active,
        "ghc": 2 * _ghc_parameters(c),
    }


def _reduce_parameters(c: ModelConfig) -> int:
    """GroupNorm (weight and bias over D') and the D' -> D reduce; the final RMSNorm is counted in `head`."""
    group_norm = 2 * c.d_wide if c.uses_group_norm else 0
    reduce = c.d_wide * c.d_model if c.n > c.m else 0
    return group_norm + reduce


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameters by component. `total` sums embedding, attention, moe, ghc, reduce, head and mtp
    (shared tensors counted once); `moe_active` and `active` count what one token uses."""
    c = config
    layer = _layer_parameters(c)
    if c.embedding == "factorized":
        embedding = c.vocab_size * c.d_model + c.d_model * c.d_wide
    else:
        embedding = c.vocab_size * c.d_wide
    head = c.d_model + (0 if c.tie_embeddings else c.vocab_size * c.d_model)
    mtp = 0
    if c.mtp:
        mtp = (2 * c.d_wide + 2 * c.d_slot * c.d_slot + layer["attention"] + layer["moe"] + layer["ghc"]
               + _reduce_parameters(c) + c.d_model)
    counts = {
        "embedding": embedding,
        "attention": c.n_layers * layer["attention"],
        "moe": c.n_layers * layer["moe"],
        "ghc": c.n_layers * layer["ghc"],
        "reduce": _reduce_parameters(c),
        "head": head,
        "mtp": mtp,
    }
    counts["total"] = sum(counts.values())
    counts["moe_active"] = c.n_layers * layer["moe_active"]
    inactive_mtp = (layer["moe"] - layer["moe_active"]) if c.mtp else 0
    counts["active"] = counts["total"] - (counts["moe"] - counts["moe_active"]) - inactive_mtp
    return counts


def _layer_flops(c: ModelConfig) -> dict[str, int]:
    d = c.d_model
    attention = 2 * 4 * d * d + 2 * d * (c.seq_len + 1)
    expert = 6 * d * c.d_ff
    ffn = expert if c.n_experts == 0 else 2 * d * c.n_experts + (c.top_k + c.n_shared_experts) * expert
    ghc = 0 if c.m == c.n == 1 else 2 * ghc_flops_per_token(d, c.m, c.n, c.dynamic)
    return {"attention": attention, "moe": ffn, "ghc": ghc}


def flops_per_token(config: ModelConfig) -> dict[str, int]:
    """Forward FLOPs per token by component, and their `total`."""
    c = config
    layer = _layer_flops(c)
    reduce = 2 * c.d_wide * c.d_model if c.n > c.m else 0
    head = 2 * c.d_model * c.vocab_size
    mtp = 0
    if c.mtp:
        mtp = mtp_merge_flops_per_token(c.d_slot, c.n) + sum(layer.values()) + reduce + head
    flops = {
        "embedding": 2 * c.d_model * c.d_wide if c.embedding == "factorized" else 0,
        "attention": c.n_layers * layer["attention"],
        "moe": c.n_layers * layer["moe"],
        "ghc": c.n_layers * layer["ghc"],
        "reduce": reduce,
        "head": head,
        "mtp": mtp,
    }
    flops["total"] = sum(flops.values())
    return flops
