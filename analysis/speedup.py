"""Token-efficiency ratios and loss gaps between a candidate loss curve and a baseline curve.

How a ratio is read off the curves (the paper leaves this open, vwn-paper.md §9):

1. Both curves are smoothed with a bias-corrected exponential moving average over their points
   (`smooth` = β; s_i = β·s_(i−1) + (1−β)·y_i, divided by 1 − β^(i+1); β = 0 turns it off). An EMA
   lags: its value at point i is a weighted mean of earlier losses. So the same EMA is taken of
   log x, and each smoothed loss is placed at that weighted mean x ("effective" x), which removes the
   lag to first order: on a falling curve the lag would otherwise bias every ratio downwards.
2. The smoothed baseline is made monotone with a running minimum: the loss it "has reached".
3. For each candidate point (x, loss), the x the baseline needs to reach that loss is found by linear
   interpolation in (log x, loss) at the first crossing; the ratio is that x ÷ the candidate's x.
4. A candidate loss below the baseline's best is out of its range: NaN, or, with
   `extrapolate=True`, read off a power law L = E + A·x^(−α) fitted to the baseline
   (`analysis.fits.fit_power_law`) and flagged in `extrapolated`. A candidate loss above the
   baseline's first point is NaN (the baseline passed it before its first evaluation).

x is tokens seen; pass cumulative FLOPs instead to get compute-normalised ratios. The loss gap is
the smoothed baseline loss at the candidate's effective x (interpolated in log x) minus the
candidate's smoothed loss: positive when the candidate is better. Beyond the baseline's last x it is NaN or,
with `extrapolate=True`, taken from the same power law and flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.signal import lfilter

from analysis.fits import PowerLaw, fit_power_law

DEFAULT_SMOOTH = 0.5


def ema(values: ArrayLike, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average over the finite values (NaN stays NaN)."""
    if not 0 <= beta < 1:
        raise ValueError(f"smooth must be in [0, 1), got {beta}")
    y = np.asarray(values, dtype=float)
    out = np.full(y.shape, np.nan)
    ok = np.isfinite(y)
    raw = lfilter([1 - beta], [1, -beta], y[ok])
    out[ok] = raw / (1 - beta ** np.arange(1, raw.size + 1))
    return out


def smooth_curve(x: ArrayLike, loss: ArrayLike, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """(effective x, smoothed loss): the bias-corrected EMA of the loss and, with the same weights,
    of log x (over the points with a finite loss; other points keep their x and a NaN loss)."""
    x = np.asarray(x, dtype=float)
    y = ema(loss, beta)
    ok = np.isfinite(y)
    x_eff = x.copy()
    x_eff[ok] = np.exp(ema(np.log(x[ok]), beta))
    return x_eff, y


@dataclass(frozen=True)
class SpeedupDetails:
    """Comparison of a candidate curve with a baseline, one entry per candidate point.

    x: the candidate's effective tokens (or FLOPs) after smoothing (the input x when smooth = 0);
    loss: its smoothed loss; base_x: baseline tokens (FLOPs) needed to reach `loss`;
    ratio = base_x / x; extrapolated: True where base_x comes from the power law;
    base_loss: smoothed baseline loss at x; gap = base_loss − loss; gap_extrapolated: True where
    base_loss comes from the power law; power_law: the baseline fit (None when extrapolation was not
    requested or the fit failed). All arrays have the candidate's shape (points,).
    """

    x: np.ndarray
    loss: np.ndarray
    base_x: np.ndarray
    ratio: np.ndarray
    extrapolated: np.ndarray
    base_loss: np.ndarray
    gap: np.ndarray
    gap_extrapolated: np.ndarray
    power_law: PowerLaw | None


def _curve(x: ArrayLike, loss: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=float)
    loss = np.asarray(loss, dtype=float)
    if x.shape != loss.shape or x.ndim != 1:
        raise ValueError(f"{name}: x and loss must be 1-D of equal length, got {x.shape} and {loss.shape}")
    if not (np.all(x > 0) and np.all(np.diff(x) > 0)):
        raise ValueError(f"{name}: x (tokens or FLOPs) must be positive and strictly increasing")
    return x, loss


def token_speedup_details(
    base_tokens: ArrayLike,
    base_loss: ArrayLike,
    tokens: ArrayLike,
    loss: ArrayLike,
    *,
    smooth: float = DEFAULT_SMOOTH,
    extrapolate: bool = False,
) -> SpeedupDetails:
    """Everything `token_speedup` computes, with extrapolation flags and loss gaps (see module doc)."""
    bx, by = _curve(base_tokens, base_loss, "baseline")
    cx, cy = _curve(tokens, loss, "candidate")
    keep = np.isfinite(by)
    if not keep.any():
        raise ValueError("baseline: no finite loss values")
    bx, by = smooth_curve(bx[keep], by[keep], smooth)
    cx, cy = smooth_curve(cx, cy, smooth)
    log_bx = np.log(bx)
    reached = np.minimum.accumulate(by)

    # First baseline point that has reached each candidate loss, then interpolate from the one before.
    idx = np.searchsorted(-reached, -np.nan_to_num(cy, nan=np.inf), side="left")
    below = np.isfinite(cy) & (idx == reached.size)
    hi = np.clip(idx, 0, reached.size - 1)
    lo = np.clip(idx - 1, 0, reached.size - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(hi > lo, (cy - reached[lo]) / (reached[hi] - reached[lo]), 0.0)
    log_needed = log_bx[lo] + frac * (log_bx[hi] - log_bx[lo])
    inside = np.isfinite(cy) & ~below & ((idx > 0) | (cy == reached[0]))
    base_x = np.where(inside, np.exp(log_needed), np.nan)

    log_cx = np.log(cx)
    base_at_x = np.interp(log_cx, log_bx, by, left=np.nan, right=np.nan)
    beyond = log_cx > log_bx[-1]

    power_law = fit_power_law(bx, reached) if extrapolate else None
    extrapolated = np.zeros(cx.shape, bool)
    gap_extrapolated = np.zeros(cx.shape, bool)
    if power_law is not None:
        from_law = power_law.tokens(cy)
        extrapolated = below & np.isfinite(from_law)
        base_x = np.where(extrapolated, from_law, base_x)
        gap_extrapolated = beyond & np.isfinite(cy)
        base_at_x = np.where(gap_extrapolated, power_law.loss(cx), base_at_x)
    return SpeedupDetails(
        x=cx,
        loss=cy,
        base_x=base_x,
        ratio=base_x / cx,
        extrapolated=extrapolated,
        base_loss=base_at_x,
        gap=base_at_x - cy,
        gap_extrapolated=gap_extrapolated,
        power_law=power_law,
    )


def token_speedup(
    base_tokens: ArrayLike,
    base_loss: ArrayLike,
    tokens: ArrayLike,
    loss: ArrayLike,
    *,
    smooth: float = DEFAULT_SMOOTH,
    extrapolate: bool = False,
) -> np.ndarray:
    """Token-efficiency ratio at each candidate point: baseline tokens to reach the candidate's
    loss ÷ the candidate's tokens (> 1: the candidate needs fewer tokens).

    base_tokens, base_loss: the baseline curve, (points,); tokens, loss: the candidate curve,
    (points,); tokens strictly increasing and positive (pass FLOPs for compute-normalised ratios).
    NaN where undefined (module doc); with `extrapolate=True` values beyond the baseline's best loss
    come from a power-law fit, and `token_speedup_details(...).extrapolated` says which.
    """
    return token_speedup_details(
        base_tokens, base_loss, tokens, loss, smooth=smooth, extrapolate=extrapolate
    ).ratio
