"""From a loaded grid to the numbers the report shows: seed-mean curves, final losses, width-law
fits, speedup comparisons and the speedup table. Pure pandas/numpy; plots and files live elsewhere.

A *setting* is one combination of the swept config values other than width and seed
(`load.setting_columns`); within a setting the (m, n) = (1, 1) runs are the baseline of every other
width. Widths are keyed by (m, n), not r, so that runs with the same r but different fraction rates m
(or n = m > 1, which is r = 1 without being the plain residual baseline) are never pooled as seeds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from analysis.fits import LogLinearFit, fit_log_linear
from analysis.load import setting_columns
from analysis.speedup import DEFAULT_SMOOTH, SpeedupDetails, token_speedup_details

LOSSES = {"ntp": "next-token", "next2": "next-2-token"}
Width = tuple[int, int]  # (m, n) of model.virtual_width; r = n / m
BASELINE: Width = (1, 1)
Unit = Literal["tokens", "flops"]
UNITS: tuple[Unit, ...] = ("tokens", "flops")
FRACTIONS = (0.25, 0.5, 1.0)


def loss_column(split: str, loss: str) -> str:
    """Metrics column of a loss: ('val', 'ntp') -> 'val/loss_ntp'."""
    return f"{split}/loss_{loss}"


def settings(frame: pd.DataFrame) -> Iterator[tuple[dict[str, object], pd.DataFrame]]:
    """(setting values, rows of that setting) for each setting of the grid, in sorted order."""
    columns = setting_columns(frame)
    for key, group in frame.groupby(columns, sort=True, dropna=False):
        yield dict(zip(columns, key, strict=True)), group


@dataclass(frozen=True)
class SeedCurves:
    """One loss curve per seed of a width, on a common token grid.

    tokens: (points,) — the union of the seeds' evaluation tokens within the range all seeds cover
    (identical grids stay exact; otherwise each seed is interpolated in log tokens).
    values: (seeds, points). flops_per_token: the width's FLOPs per token (NaN if unknown).
    """

    tokens: np.ndarray
    values: np.ndarray
    seeds: tuple[int, ...]
    flops_per_token: float

    @property
    def mean(self) -> np.ndarray:
        return self.values.mean(axis=0)

    @property
    def lo(self) -> np.ndarray:
        return self.values.min(axis=0)

    @property
    def hi(self) -> np.ndarray:
        return self.values.max(axis=0)

    def x(self, unit: Unit) -> np.ndarray:
        """The token grid in tokens or in cumulative FLOPs."""
        return self.tokens * (self.flops_per_token if unit == "flops" else 1.0)


def seed_curves(runs: pd.DataFrame, column: str) -> SeedCurves | None:
    """SeedCurves of `column` over the runs of one width (points with tokens > 0; None if empty)."""
    curves = []
    for seed, run in runs.groupby("seed", sort=True):
        points = run.loc[run["tokens"] > 0, ["tokens", column]].dropna()
        if len(points):
            curves.append((int(seed), points["tokens"].to_numpy(float), points[column].to_numpy(float)))
    if not curves:
        return None
    start = max(t[0] for _, t, _ in curves)
    end = min(t[-1] for _, t, _ in curves)
    grid = np.unique(np.concatenate([t for _, t, _ in curves]))
    grid = grid[(grid >= start) & (grid <= end)]
    if grid.size == 0:
        return None
    values = np.vstack([np.interp(np.log(grid), np.log(t), y) for _, t, y in curves])
    return SeedCurves(
        tokens=grid,
        values=values,
        seeds=tuple(seed for seed, _, _ in curves),
        flops_per_token=float(runs["flops_per_token"].mean()),
    )


def width_curves(group: pd.DataFrame, column: str) -> dict[Width, SeedCurves]:
    """SeedCurves of `column` for every width of a setting that has values, keyed by (m, n) and
    ordered by (r, m)."""
    out = {}
    for (_, m, n), runs in group.groupby(["r", "m", "n"], sort=True):
        curves = seed_curves(runs, column)
        if curves is not None:
            out[int(m), int(n)] = curves
    return out


def final_losses(group: pd.DataFrame, column: str) -> pd.DataFrame:
    """Last logged value of `column` per run: columns run_id, r, m, n, seed, tokens, loss."""
    rows = group.dropna(subset=[column]).sort_values(["run_id", "step"]).groupby("run_id").tail(1)
    out = rows[["run_id", "r", "m", "n", "seed", "tokens", column]].rename(columns={column: "loss"})
    return out.sort_values(["r", "m", "seed", "run_id"], ignore_index=True)


def width_law_fits(finals: pd.DataFrame, n_boot: int) -> dict[str, LogLinearFit | None]:
    """The paper's fit on r > 1 ("r>1") and a second fit that includes the baseline ("all")."""
    subsets = {"r>1": finals[finals["r"] > 1], "all": finals}
    return {
        name: fit_log_linear(rows["r"], rows["loss"], n_boot=n_boot) if rows["r"].nunique() >= 2 else None
        for name, rows in subsets.items()
    }


@dataclass(frozen=True)
class WidthComparison:
    """A width against the baseline of its setting, for one loss and one unit.

    mean: the seed-mean candidate against the seed-mean baseline. per_seed: candidate seed s
    against baseline seed s, for the seeds both have (empty with a single common seed).
    tokens: the candidate's token grid (the x of `mean` in tokens, whatever the unit);
    flops_per_token: the candidate's.
    """

    tokens: np.ndarray
    flops_per_token: float
    mean: SpeedupDetails
    per_seed: tuple[SpeedupDetails, ...]

    def spread(self, attribute: Literal["ratio", "gap"]) -> tuple[np.ndarray, np.ndarray]:
        """Min and max over the per-seed comparisons (NaN where fewer than two seeds are defined)."""
        if len(self.per_seed) < 2:
            nan = np.full(self.tokens.shape, np.nan)
            return nan, nan
        values = np.vstack([getattr(d, attribute) for d in self.per_seed])
        defined = np.isfinite(values).sum(axis=0) >= 2
        filled_lo = np.where(np.isfinite(values), values, np.inf).min(axis=0)
        filled_hi = np.where(np.isfinite(values), values, -np.inf).max(axis=0)
        return np.where(defined, filled_lo, np.nan), np.where(defined, filled_hi, np.nan)


def compare_width(
    base: SeedCurves, cand: SeedCurves, unit: Unit, *, smooth: float = DEFAULT_SMOOTH
) -> WidthComparison | None:
    """Compare a width's curves with the baseline's (extrapolating beyond the baseline, flagged).

    None when the unit is FLOPs and either side lacks FLOPs per token.
    """
    if unit == "flops" and not (np.isfinite(base.flops_per_token) and np.isfinite(cand.flops_per_token)):
        return None

    def details(base_loss: np.ndarray, base_x: np.ndarray, loss: np.ndarray) -> SpeedupDetails:
        return token_speedup_details(base_x, base_loss, cand.x(unit), loss, smooth=smooth, extrapolate=True)

    common = [s for s in cand.seeds if s in base.seeds]
    per_seed = tuple(
        details(base.values[base.seeds.index(s)], base.x(unit), cand.values[cand.seeds.index(s)]) for s in common
    )
    return WidthComparison(
        tokens=cand.tokens,
        flops_per_token=cand.flops_per_token,
        mean=details(base.mean, base.x(unit), cand.mean),
        per_seed=per_seed if len(per_seed) >= 2 else (),
    )


def fraction_points(tokens: np.ndarray, fractions: tuple[float, ...] = FRACTIONS) -> list[int]:
    """Index of the grid point nearest to each fraction of the final tokens (earlier one on ties)."""
    return [int(np.argmin(np.abs(tokens - f * tokens[-1]))) for f in fractions]


def speedup_table(
    comparisons: dict[tuple[Width, str, Unit], WidthComparison],
    fractions: tuple[float, ...] = FRACTIONS,
) -> pd.DataFrame:
    """One row per (width, fraction of training): ratios and gaps for each loss and unit.

    comparisons: keyed by ((m, n), loss, unit). For each width the evaluation points are chosen on
    the next-token token grid (next-2 when there is none) and every comparison is read there.
    Columns: m, n, r, fraction, tokens, flops (the width's cumulative FLOPs there), then for each
    unit U (tokens, flops), each of speedup and gap, each loss L present (ntp next to next2):
    speedup_L_U, speedup_L_U_min/_max (seed range), speedup_L_U_extrapolated, likewise gap_L_U*.
    """
    rows = []
    widths = sorted({key[0] for key in comparisons}, key=lambda w: (w[1] / w[0], w[0]))
    for m, n in widths:
        anchor = next(comparisons[k] for loss in LOSSES if (k := ((m, n), loss, "tokens")) in comparisons)
        for fraction, i in zip(fractions, fraction_points(anchor.tokens, fractions), strict=True):
            tokens = anchor.tokens[i]
            row: dict[str, object] = {
                "m": m, "n": n, "r": n / m, "fraction": fraction, "tokens": int(tokens),
                "flops": float(tokens * anchor.flops_per_token),
            }
            for unit in UNITS:
                for name in ("ratio", "gap"):
                    for loss in LOSSES:
                        if ((m, n), loss, unit) in comparisons:
                            row.update(_read_at(comparisons[(m, n), loss, unit], name, tokens, f"{loss}_{unit}"))
            rows.append(row)
    return pd.DataFrame(rows)


def _read_at(comp: WidthComparison, name: Literal["ratio", "gap"], tokens: float, suffix: str) -> dict[str, object]:
    """Ratio or gap of a comparison (seed range, extrapolation flag) at a token count of its grid."""
    at = np.flatnonzero(comp.tokens == tokens)
    label = f"{'speedup' if name == 'ratio' else 'gap'}_{suffix}"
    lo, hi = comp.spread(name)
    out: dict[str, object] = {}
    for column, values in ((label, getattr(comp.mean, name)), (f"{label}_min", lo), (f"{label}_max", hi)):
        out[column] = float(values[at[0]]) if at.size else np.nan
    flags = comp.mean.extrapolated if name == "ratio" else comp.mean.gap_extrapolated
    out[f"{label}_extrapolated"] = bool(flags[at[0]]) if at.size else False
    return out
