"""ModelConfig: every architectural knob of the VWN MoE language model, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"model.{field}: {message}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model. `virtual_width = (m, n)` gives backbone width D = d_model split into m
    segments of d_b = D/m, and an over-width state of n slots (D' = n·d_b = (n/m)·D).
    (1, 1) is the plain residual transformer; m = 1 is Hyper-Connections with n streams."""

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 256  # training context; also sets the attention term of the FLOP accounting
    # Feed-forward: n_experts = 0 is a dense SwiGLU of hidden width d_ff; otherwise a token-choice
    # top-k MoE of n_experts SwiGLU experts, each of hidden width d_ff.
    n_experts: int = 8
    top_k: int = 2
    d_ff: int = 256
    n_shared_experts: int = 0
    balance_loss_weight: float = 0.01  # Switch-style E·Σ f_e·P_e
    z_loss_weight: float = 0.001  # router z-loss
    aux_free_balancing: bool = False  # DeepSeek-V3 selection bias, nudged after every optimizer step
    bias_update_rate: float = 1e-3
    # Virtual width
    virtual_width: tuple[int, int] = (1, 1)
    dynamic: bool = True  # DGHC (token-dependent mixing) instead of static GHC
    embedding: Literal["direct", "factorized"] = "direct"  # |V|×D' table, or |V|×D then D→D'
    group_norm: bool = True  # GroupNorm in groups of size D before the reduce; needs integer r
    tie_embeddings: bool = False  # LM head shares the D-wide embedding table (needs one to exist)
    # Multi-token prediction (depth 1: token t+2 predicted at position t)
    mtp: bool = False
    mtp_weight: float = 0.1
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "virtual_width", tuple(self.virtual_width))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "d_ff"):
            _require(getattr(self, name) >= 1, name, f"must be a positive integer, got {getattr(self, name)}")
        _require(self.d_model % self.n_heads == 0, "n_heads",
                 f"must divide d_model={self.d_model}, got {self.n_heads}")
        _require((self.d_model // self.n_heads) % 2 == 0, "n_heads",
                 f"head dim d_model/n_heads must be even for rotary positions, got {self.d_model // self.n_heads}")
        _require(self.n_experts >= 0, "n_experts", f"must be >= 0 (0 = dense FFN), got {self.n_experts}")
        if self.n_experts > 0:
            _require(1 <= self.top_k <= self.n_experts, "top_k",
                     f"must be in 1..n_experts={self.n_experts}, got {self.top_k}")
        _require(self.n_shared_experts >= 0, "n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        _require(len(self.virtual_width) == 2, "virtual_width",
                 f"must be a pair [m, n], got {list(self.virtual_width)}")
        m, n = self.virtual_width
        _require(m >= 1 and n >= 1, "virtual_width", f"m and n must be >= 1, got (m, n) = ({m}, {n})")
        _require(n >= m, "virtual_width", f"needs n >= m (the state is at least as wide as D), got ({m}, {n})")
        divisors = [k for k in range(1, self.d_model + 1) if self.d_model % k == 0]
        _require(self.d_model % m == 0, "virtual_width",
                 f"m must divide d_model={self.d_model} (allowed m: {divisors}), got m = {m}")
        _require(not (self.tie_embeddings and self.embedding == "direct" and n != m), "tie_embeddings",
                 "needs a D-wide embedding table: use embedding: factorized, or virtual_width with n == m")
        _require(self.mtp_weight >= 0, "mtp_weight", f"must be >= 0, got {self.mtp_weight}")

    @property
    def m(self) -> int:
        return self.virtual_width[0]

    @property
    def n(self) -> int:
        return self.virtual_width[1]

    @property
    def r(self) -> float:
        """Virtual width factor n/m."""
        return self.n / self.m

    @property
    def d_slot(self) -> int:
        """d_b = D/m, the width of one slot of the over-width state."""
        return self.d_model // self.m

    @property
    def d_wide(self) -> int:
        """D' = n·d_b, the over-width state and embedding width."""
        return self.n * self.d_slot

    @property
    def uses_group_norm(self) -> bool:
        """GroupNorm applies in groups of size D, so only when D' is a whole multiple of D and wider
        than it; the paper omits it in its fractional (1.5×) runs."""
        return self.group_norm and self.n > self.m and self.n % self.m == 0
