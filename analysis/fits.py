"""Fits: the log-linear width law with bootstrap intervals, and the L(T) = E + A·T^(−α) power law.

Width law (the paper's form): loss = intercept + slope · log_base(r), fitted by ordinary least
squares on the mean loss of each width, so every width counts once (with the same number of seeds
per width this is the same line as a fit to all points). R² is that of the width means, as the
paper reports it for its three points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar

BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class LogLinearFit:
    """loss = intercept + slope · log_base(r), with percentile-bootstrap intervals.

    `method` says what the bootstrap resampled: "seeds" (the runs within each width; used when every
    width has at least two runs), "points" (all runs, when some width has a single run and there are
    at least three widths) or "none" (too little data for an interval: intervals are NaN).
    """

    slope: float
    intercept: float
    r2: float
    slope_ci: tuple[float, float]
    intercept_ci: tuple[float, float]
    base: float
    level: float
    method: Literal["seeds", "points", "none"]
    n_widths: int
    n_points: int
    boot_slopes: np.ndarray = field(repr=False, compare=False)
    boot_intercepts: np.ndarray = field(repr=False, compare=False)

    def predict(self, r: ArrayLike) -> np.ndarray:
        """Fitted loss at virtual width factor(s) r."""
        return self.intercept + self.slope * _log(r, self.base)

    def band(self, r: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap interval (at `level`) of the fitted loss at r; NaN without bootstrap."""
        x = _log(r, self.base)
        if self.boot_slopes.size == 0:
            nan = np.full(np.shape(x), np.nan)
            return nan, nan
        lines = self.boot_intercepts[:, None] + self.boot_slopes[:, None] * np.atleast_1d(x)[None, :]
        lo, hi = np.percentile(lines, _percentiles(self.level), axis=0)
        return lo.reshape(np.shape(x)), hi.reshape(np.shape(x))


def _log(r: ArrayLike, base: float) -> np.ndarray:
    return np.log(np.asarray(r, dtype=float)) / np.log(base)


def _percentiles(level: float) -> list[float]:
    return [50 * (1 - level), 50 * (1 + level)]


def _width_line(x: np.ndarray, means: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OLS line through the present width means, batched.

    x: (widths,); means, present: (batch, widths). Returns slope, intercept of shape (batch,), NaN
    where fewer than two distinct widths are present.
    """
    w = present.astype(float)
    count = w.sum(axis=1)
    x_bar = (w * x).sum(axis=1) / count
    y = np.where(present, means, 0.0)
    y_bar = (w * y).sum(axis=1) / count
    dx = (x[None, :] - x_bar[:, None]) * w
    sxx = (dx * dx).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(sxx > 0, (dx * (y - y_bar[:, None])).sum(axis=1) / sxx, np.nan)
    return slope, y_bar - slope * x_bar


def _means(counts: np.ndarray, y: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-width means of resampled points. counts: (batch, points); member: (points, widths)."""
    n = counts @ member
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts * y) @ member / n, n > 0


def fit_log_linear(
    widths: ArrayLike,
    losses: ArrayLike,
    base: float = 2,
    n_boot: int = 2000,
    *,
    level: float = 0.95,
    seed: int = BOOTSTRAP_SEED,
) -> LogLinearFit:
    """Fit loss = intercept + slope · log_base(r) to one loss per run.

    widths, losses: (runs,) — several runs (seeds) may share a width. The line is the OLS fit to
    the per-width mean losses. Intervals are percentile bootstraps with `n_boot` resamples from a
    generator seeded with `seed` (deterministic): over seeds within each width when every width has
    at least two runs, otherwise over all points (a resample is fitted the same way: per-width means,
    then OLS; resamples with a single width are dropped). The seed bootstrap scales each resampled
    width mean's deviation by sqrt(k/(k−1)) for k seeds (the plain bootstrap understates the
    variance of a mean of k by (k−1)/k). Needs at least two distinct widths.
    """
    r = np.asarray(widths, dtype=float)
    y = np.asarray(losses, dtype=float)
    if r.shape != y.shape or r.ndim != 1:
        raise ValueError(f"widths and losses must be 1-D of equal length, got {r.shape} and {y.shape}")
    if not (np.all(np.isfinite(y)) and np.all(r > 0)):
        raise ValueError("losses must be finite and widths positive")
    unique, index = np.unique(r, return_inverse=True)
    if unique.size < 2:
        raise ValueError(f"need at least two distinct widths to fit a line, got {unique.tolist()}")
    x = _log(unique, base)
    member = np.eye(unique.size)[index]  # (points, widths)
    means, present = _means(np.ones((1, y.size)), y, member)
    slope, intercept = (float(v[0]) for v in _width_line(x, means, present))
    residual = means[0] - (intercept + slope * x)
    total = means[0] - means[0].mean()
    r2 = float(1 - (residual @ residual) / (total @ total)) if total @ total > 0 else float("nan")

    per_width = np.bincount(index)
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, y.size))
    rows = np.arange(n_boot)[:, None]
    if per_width.min() >= 2:
        method = "seeds"
        for w in range(unique.size):
            members = np.flatnonzero(index == w)
            np.add.at(counts, (rows, rng.choice(members, size=(n_boot, members.size))), 1)
    elif unique.size >= 3:
        method = "points"
        np.add.at(counts, (rows, rng.integers(0, y.size, size=(n_boot, y.size))), 1)
    else:
        method = "none"
        counts = counts[:0]
    boot_means, boot_present = _means(counts, y, member)
    if method == "seeds":
        # Resampling k seeds shrinks the spread of their mean by (k−1)/k; undo that (the usual
        # small-sample adjustment), or 3-seed intervals cover ~80 % instead of ~90 % of the time.
        inflate = np.sqrt(per_width / (per_width - 1))
        boot_means = means + inflate * (boot_means - means)
    boot_slopes, boot_intercepts = _width_line(x, boot_means, boot_present)
    keep = np.isfinite(boot_slopes)
    boot_slopes, boot_intercepts = boot_slopes[keep], boot_intercepts[keep]
    return LogLinearFit(
        slope=slope,
        intercept=intercept,
        r2=r2,
        slope_ci=_interval(boot_slopes, level),
        intercept_ci=_interval(boot_intercepts, level),
        base=float(base),
        level=level,
        method=method,
        n_widths=int(unique.size),
        n_points=int(y.size),
        boot_slopes=boot_slopes,
        boot_intercepts=boot_intercepts,
    )


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    if samples.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(samples, _percentiles(level))
    return (float(lo), float(hi))


@dataclass(frozen=True)
class PowerLaw:
    """L(T) = E + A·T^(−α): loss after T tokens (or FLOPs), E the irreducible loss."""

    E: float
    A: float
    alpha: float

    def loss(self, t: ArrayLike) -> np.ndarray:
        """Loss after t tokens."""
        return self.E + self.A * np.asarray(t, dtype=float) ** -self.alpha

    def tokens(self, loss: ArrayLike) -> np.ndarray:
        """Tokens needed to reach `loss`; NaN at or below E (never reached)."""
        excess = np.asarray(loss, dtype=float) - self.E
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(excess > 0, (excess / self.A) ** (-1 / self.alpha), np.nan)


def fit_power_law(tokens: ArrayLike, losses: ArrayLike) -> PowerLaw | None:
    """Least-squares fit of L(T) = E + A·T^(−α) to a decreasing loss curve.

    Fitted on the later half of the curve in log tokens (log T ≥ the midpoint of its log range; all
    points when that leaves fewer than four), so warm-up does not bend the fit. Variable projection:
    for each α on a log grid in [1e-3, 3], E and A are the linear least-squares solution with
    0 ≤ E ≤ min loss and A ≥ 0; the best α is then refined by a bounded scalar search. Deterministic.
    Returns None when fewer than three points remain or no fit decreases.
    """
    t = np.asarray(tokens, dtype=float)
    y = np.asarray(losses, dtype=float)
    ok = np.isfinite(t) & np.isfinite(y) & (t > 0)
    t, y = t[ok], y[ok]
    if t.size < 3:
        return None
    log_t = np.log(t)
    tail = log_t >= (log_t.min() + log_t.max()) / 2
    if tail.sum() >= 4:
        t, y = t[tail], y[tail]
    scale = t.max()  # fit in u = T / T_max so that A stays of the order of the loss excess
    log_u = np.log(t / scale)

    def solve(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sse, E, A) of the best constrained E, A for each α in `alpha`, shape (k,)."""
        z = np.exp(-np.asarray(alpha, dtype=float)[:, None] * log_u)  # (k, points)
        zc = z - z.mean(axis=1, keepdims=True)
        szz = (zc * zc).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            a = np.maximum(np.where(szz > 0, zc @ (y - y.mean()) / szz, 0.0), 0.0)
            e = np.clip(y.mean() - a * z.mean(axis=1), 0.0, y.min())
            on_bound = (e == 0.0) | (e == y.min())  # refit A alone with E on its bound
            a = np.where(on_bound, np.maximum(((y - e[:, None]) * z).sum(axis=1) / (z * z).sum(axis=1), 0.0), a)
        return ((e[:, None] + a[:, None] * z - y) ** 2).sum(axis=1), e, a

    alphas = np.geomspace(1e-3, 3.0, 200)
    best = int(np.argmin(solve(alphas)[0]))
    lo, hi = alphas[max(best - 1, 0)], alphas[min(best + 1, alphas.size - 1)]
    alpha = float(minimize_scalar(lambda a: solve(np.array([a]))[0][0], bounds=(lo, hi), method="bounded").x)
    _, (e,), (a,) = solve(np.array([alpha]))
    if a <= 0:
        return None
    return PowerLaw(E=float(e), A=float(a * scale**alpha), alpha=alpha)
