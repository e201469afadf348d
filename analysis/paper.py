"""REFERENCE DATA, not results: the numbers the VWN paper reports, shown next to ours in reports.

Source: "Virtual Width Networks", ByteDance Seed, arXiv:2511.11238 v2 (Nov 2025), as transcribed in
docs/vwn-paper.md §8. The paper's models are far larger than anything trained here (MoE with 3.3B
and 0.8B activated parameters, hundreds of billions to trillions of tokens), so these are context
for the direction and rough size of effects, not targets a small grid should hit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAPER_CITATION = "Virtual Width Networks (arXiv:2511.11238 v2) §8"


@dataclass(frozen=True)
class PaperReference:
    # Large scale: MoE 3.3B activated, r = 8, (m, n) = (8, 64), constant LR, ~3T tokens. The paper
    # gives three unspecified points along training; reports place them at 25 %, 50 %, 100 %.
    large_scale_r: float = 8.0
    large_scale_setup: str = "MoE 3.3B activated, r = 8 (m, n) = (8, 64), ~3T tokens"
    speedup: dict[str, tuple[float, float, float]] = field(
        default_factory=lambda: {"ntp": (1.6, 2.0, 2.5), "next2": (2.1, 2.8, 3.5)}
    )
    gap: dict[str, tuple[float, float, float]] = field(
        default_factory=lambda: {"ntp": (0.025, 0.027, 0.032), "next2": (0.049, 0.051, 0.056)}
    )
    # Width scaling: MoE 0.8B activated, m = 8, 500B tokens, all with MTP. Final loss reduction vs
    # the r = 1 baseline, (next-token, next-2) per r.
    width_scaling_setup: str = "MoE 0.8B activated, m = 8, 500B tokens"
    width_delta: dict[float, tuple[float, float]] = field(
        default_factory=lambda: {2.0: (0.020, 0.030), 4.0: (0.028, 0.045), 8.0: (0.035, 0.058)}
    )
    # Next-token law fitted on r in {2, 4, 8} (baseline excluded): loss = slope·log2(r) + intercept.
    law_slope: float = -0.0069
    law_intercept: float = 1.6212
    law_r2: float = 0.9986

    def speedup_at(self, loss: str, r: float, point: int) -> float | None:
        """Paper token-efficiency ratio at training point 0, 1, 2 (None unless r is the paper's r)."""
        return self.speedup[loss][point] if r == self.large_scale_r else None

    def gap_at(self, loss: str, r: float, point: int) -> float | None:
        """Paper loss gap at training point 0, 1, 2 (None unless r is the paper's r)."""
        return self.gap[loss][point] if r == self.large_scale_r else None

    def delta(self, loss: str, r: float) -> float | None:
        """Paper final loss reduction vs the baseline at width r (None for widths it did not run)."""
        return self.width_delta[r][0 if loss == "ntp" else 1] if r in self.width_delta else None


PAPER = PaperReference()
