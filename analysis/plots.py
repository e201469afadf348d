"""Figures of a grid: loss curves, the width law, speedup curves.

Every function returns a `matplotlib.figure.Figure` built without pyplot (no global state, no backend
switch: PNGs are rendered by Agg on save and notebooks display the figure as it is). Colours come from
`width_colors`, so a width has the same colour in every figure. Losses are cross-entropies in nats
per token.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

from analysis.fits import LogLinearFit
from analysis.tables import BASELINE, LOSSES, SeedCurves, Unit, Width, WidthComparison

PANEL_SIZE = (5.2, 3.8)
X_LABELS = {"tokens": "tokens seen", "flops": "training FLOPs (tokens × FLOPs/token)"}
UNIT_STYLES = {"tokens": "-", "flops": "--"}
BASELINE_COLOR = "black"
PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def width_label(width: Width) -> str:
    """'baseline (1,1)', 'r=1.5 (2,3)', 'r=8 (8,64)'."""
    m, n = width
    return "baseline (1,1)" if width == BASELINE else f"r={n / m:g} ({m},{n})"


def width_colors(widths: Iterable[Width]) -> dict[Width, str]:
    """A fixed colour per width (m, n): black for the baseline, then the palette by (r, m)."""
    others = sorted({(int(m), int(n)) for m, n in widths} - {BASELINE}, key=lambda w: (w[1] / w[0], w[0]))
    colors = {w: PALETTE[i % len(PALETTE)] for i, w in enumerate(others)}
    return {BASELINE: BASELINE_COLOR, **colors}


def _log_x(ax: Axes) -> None:
    """Log x axis labelled 100k, 200k, 500k, 1M, ... (minor ticks unlabelled)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _panels(n: int, title: str) -> tuple[Figure, list[Axes]]:
    """A row of n panels with fixed margins (in inches; a layout engine would double the render time)."""
    width, height = PANEL_SIZE[0] * n, PANEL_SIZE[1]
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, bottom=0.55 / height,
                        top=1 - (0.65 if title else 0.35) / height, wspace=0.25)
    axes = list(np.atleast_1d(fig.subplots(1, n)))
    if title:
        fig.suptitle(title)
    return fig, axes


def plot_loss_curves(
    curves: dict[str, dict[Width, SeedCurves]],
    colors: dict[Width, str],
    *,
    unit: Unit = "tokens",
    split: str = "val",
    title: str = "",
) -> Figure:
    """Loss vs tokens (or FLOPs), log x: one panel per loss, one line per width (seed mean) with a
    shaded band from the seed minimum to maximum. curves: {loss: {(m, n): SeedCurves}}."""
    losses = [loss for loss in LOSSES if curves.get(loss)]
    fig, axes = _panels(max(len(losses), 1), title)
    for ax, loss in zip(axes, losses, strict=False):
        for width, c in curves[loss].items():
            x = c.x(unit)
            seeds = f", {len(c.seeds)} seeds" if len(c.seeds) > 1 else ""
            ax.plot(x, c.mean, color=colors[width], label=f"{width_label(width)}{seeds}")
            if len(c.seeds) > 1:
                ax.fill_between(x, c.lo, c.hi, color=colors[width], alpha=0.2, linewidth=0)
        _log_x(ax)
        ax.set_xlabel(X_LABELS[unit])
        ax.set_ylabel(f"{split} loss (nats/token)")
        ax.set_title(f"{LOSSES[loss]} loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def plot_width_law(
    finals: dict[str, pd.DataFrame],
    fits: dict[str, dict[str, LogLinearFit | None]],
    colors: dict[Width, str],
    *,
    split: str = "val",
    title: str = "",
) -> Figure:
    """Final loss vs log2 r: runs (small), width means (large), the fit on r > 1 with its bootstrap
    band (solid) and the fit including the baseline (dashed). One panel per loss.
    finals: {loss: final_losses frame}; fits: {loss: {"r>1": fit, "all": fit}}."""
    losses = [loss for loss in LOSSES if loss in finals and len(finals[loss])]
    fig, axes = _panels(max(len(losses), 1), title)
    for ax, loss in zip(axes, losses, strict=False):
        runs = finals[loss]
        for (r, m, n), points in runs.groupby(["r", "m", "n"], sort=True):
            width = (int(m), int(n))
            ax.scatter(np.log2(points["r"]), points["loss"], color=colors[width], s=12, alpha=0.5)
            ax.scatter(np.log2(r), points["loss"].mean(), color=colors[width], s=60, zorder=3,
                       marker="D" if width == BASELINE else "o", label=width_label(width))
        widths = np.unique(runs["r"])
        for name, style in (("r>1", "-"), ("all", "--")):
            fit = fits[loss].get(name)
            if fit is None:
                continue
            grid = np.geomspace(widths[widths > 1].min() if name == "r>1" else widths.min(), widths.max(), 50)
            label = (f"fit {'r > 1' if name == 'r>1' else 'all r'}: {fit.slope:+.4f}·log₂r + "
                     f"{fit.intercept:.4f}, R²={fit.r2:.3f}")
            ax.plot(np.log2(grid), fit.predict(grid), style, color="gray", label=label)
            if name == "r>1":
                lo, hi = fit.band(grid)
                ax.fill_between(np.log2(grid), lo, hi, color="gray", alpha=0.2, linewidth=0,
                                label=f"{fit.level:.0%} bootstrap band ({fit.method})")
        ax.set_xticks(np.log2(widths), [f"{r:g}" for r in widths])
        ax.set_xlabel("virtual width factor r (log₂ scale)")
        ax.set_ylabel(f"final {split} loss (nats/token)")
        ax.set_title(f"{LOSSES[loss]}: width law")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    return fig


def plot_speedup(
    comparisons: dict[tuple[str, Unit], WidthComparison],
    width: Width,
    color: str,
    *,
    title: str = "",
) -> Figure:
    """Speedup vs tokens for one width: a panel per loss, token-efficiency (solid) and FLOP-normalised
    (dashed) ratios, a band over the per-seed ratios, hollow markers where extrapolated.
    comparisons: {(loss, unit): WidthComparison}."""
    losses = [loss for loss in LOSSES if (loss, "tokens") in comparisons]
    fig, axes = _panels(max(len(losses), 1), title)
    for ax, loss in zip(axes, losses, strict=False):
        for unit in ("tokens", "flops"):
            comp = comparisons.get((loss, unit))
            if comp is None:
                continue
            ratio, flag = comp.mean.ratio, comp.mean.extrapolated
            label = "by tokens" if unit == "tokens" else "by FLOPs"
            ax.plot(comp.tokens, ratio, UNIT_STYLES[unit], color=color, label=label)
            ax.scatter(comp.tokens[~flag], ratio[~flag], color=color, s=10)
            if flag.any():
                ax.scatter(comp.tokens[flag], ratio[flag], facecolors="none", edgecolors=color, s=24,
                           label=f"{label}, extrapolated (power law)")
            if unit == "tokens" and comp.per_seed:
                lo, hi = comp.spread("ratio")
                ax.fill_between(comp.tokens, lo, hi, color=color, alpha=0.2, linewidth=0,
                                label="seed range (by tokens)")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        _log_x(ax)
        ax.set_xlabel(f"tokens seen by the {width_label(width)} run")
        ax.set_ylabel("speedup (× baseline tokens or FLOPs)")
        ax.set_title(f"{LOSSES[loss]}: {width_label(width)} vs baseline")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return fig
