"""`vwn report results/X`: regenerate every figure and table of a grid from its run folders.

`write_report(grid_dir)` writes into `grid_dir/report/`:
  report.md                          embeds everything below, with method notes and the run list
  runs.csv                           one row per run folder that loaded (status, size, final losses)
  speedups.csv, speedups.md          speedups and loss gaps at 25/50/100 % of training, by tokens and by
                                     FLOPs, next-token next to next-2-token, paper figures alongside
  width_law.csv                      fits of final loss vs log2 r (r > 1, and all r) and the paper's law
  final_losses.csv                   final loss per width, loss reduction vs the baseline, paper's Δ
  loss_vs_tokens*.png, loss_vs_flops*.png, width_law*.png, speedup_m<m>_n<n>*.png
Only runs whose summary says "done" enter curves, fits and tables; the others are listed. Output is
deterministic: same run folders -> byte-identical files (fixed bootstrap seed, fixed float formats,
PNGs without timestamps, matplotlib's default style whatever the user's matplotlibrc says).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.style
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.fits import LogLinearFit
from analysis.load import load_grid, setting_columns
from analysis.paper import PAPER, PAPER_CITATION
from analysis.plots import plot_loss_curves, plot_speedup, plot_width_law, width_colors, width_label
from analysis.speedup import DEFAULT_SMOOTH
from analysis.tables import (
    BASELINE,
    FRACTIONS,
    LOSSES,
    UNITS,
    SeedCurves,
    Unit,
    Width,
    WidthComparison,
    compare_width,
    final_losses,
    loss_column,
    settings,
    speedup_table,
    width_curves,
    width_law_fits,
)

DPI = 110
CSV_FLOAT = "%.5g"
PNG_METADATA = {"Software": None}  # matplotlib would otherwise stamp its version into every PNG
N_BOOT = 2000


@dataclass(frozen=True)
class SettingResult:
    """Everything computed for one setting of the grid (see `analysis.tables`)."""

    curves: dict[str, dict[Width, SeedCurves]]
    finals: dict[str, pd.DataFrame]
    fits: dict[str, dict[str, LogLinearFit | None]]
    comparisons: dict[tuple[Width, str, Unit], WidthComparison]
    speedups: pd.DataFrame


def analyse_setting(group: pd.DataFrame, split: str, smooth: float, n_boot: int) -> SettingResult:
    """Curves, final losses, width-law fits and speedups of the done runs of one setting."""
    curves = {}
    for loss in LOSSES:
        column = loss_column(split, loss)
        by_width = width_curves(group, column) if column in group else {}
        if by_width:
            curves[loss] = by_width
    finals = {loss: final_losses(group, loss_column(split, loss)) for loss in curves}
    fits = {loss: width_law_fits(finals[loss], n_boot) for loss in curves}
    comparisons = {}
    for loss, by_width in curves.items():
        if BASELINE not in by_width:
            continue
        for width, cand in by_width.items():
            for unit in UNITS if width != BASELINE else ():
                comparison = compare_width(by_width[BASELINE], cand, unit, smooth=smooth)
                if comparison is not None:
                    comparisons[width, loss, unit] = comparison
    return SettingResult(curves, finals, fits, comparisons, speedup_table(comparisons))


# ----------------------------------------------------------------------------- formatting


def _num(value: object, spec: str) -> str:
    """A number in a fixed format, or an em dash for a missing one."""
    if value is None or pd.isna(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
        return "—"
    return format(value, spec)


def _cell(row: pd.Series, label: str, spec: str, suffix: str = "") -> str:
    """value[suffix] (seed range) with '*' when extrapolated, from the speedup-table columns `label*`."""
    value = row.get(label, np.nan)
    if not (isinstance(value, float) and math.isfinite(value)):
        return "—"
    text = format(value, spec) + suffix
    lo, hi = row.get(f"{label}_min", np.nan), row.get(f"{label}_max", np.nan)
    if math.isfinite(lo) and math.isfinite(hi):
        text += f" ({format(lo, spec)} to {format(hi, spec)})"
    return text + ("*" if row.get(f"{label}_extrapolated", False) else "")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _si(value: float) -> str:
    """Compact count: 1234567 -> '1.23M'."""
    for factor, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{unit}"
    return f"{value:.3g}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _width_cell(m: int, n: int) -> str:
    return width_label((int(m), int(n)))


# ----------------------------------------------------------------------------- tables


def _paper_columns(speedups: pd.DataFrame, losses: Sequence[str]) -> pd.DataFrame:
    """Adds the paper's r = 8 figures as columns right after our by-tokens ones (values only on the
    25/50/100 % rows of r = 8 widths)."""
    out = speedups.copy()
    for loss in losses if not out.empty else ():
        for kind, lookup in (("speedup", PAPER.speedup_at), ("gap", PAPER.gap_at)):
            values = [lookup(loss, r, FRACTIONS.index(f)) for r, f in zip(out["r"], out["fraction"], strict=True)]
            after = out.columns.get_loc(f"{kind}_{loss}_tokens_extrapolated")
            out.insert(after + 1, f"paper_{kind}_{loss}", [np.nan if v is None else v for v in values])
    return out


def _speedup_markdown(table: pd.DataFrame, losses: Sequence[str]) -> str:
    """Two markdown tables: by tokens (with the paper's figures) and by FLOPs."""
    if table.empty:
        return "_No speedups: this setting has no baseline (1,1) and other width with finished runs._"
    by_tokens_head = ["width", "training", "tokens"]
    by_flops_head = ["width", "training", "FLOPs"]
    for kind in ("speedup", "gap"):
        for loss in losses:
            by_tokens_head += [f"{LOSSES[loss]} {kind}", "paper"]
            by_flops_head += [f"{LOSSES[loss]} {kind}"]
    by_tokens, by_flops = [], []
    for _, row in table.iterrows():
        head = [_width_cell(row["m"], row["n"]), f"{row['fraction']:.0%}"]
        tokens_cells, flops_cells = head + [_si(row["tokens"])], head + [_num(row["flops"], ".3g")]
        for kind, spec, suffix in (("speedup", ".2f", "×"), ("gap", "+.4f", "")):
            for loss in losses:
                paper = row[f"paper_{kind}_{loss}"]
                tokens_cells += [_cell(row, f"{kind}_{loss}_tokens", spec, suffix),
                                 "" if pd.isna(paper) else _num(paper, spec.lstrip("+")) + suffix]
                flops_cells += [_cell(row, f"{kind}_{loss}_flops", spec, suffix)]
        by_tokens.append(tokens_cells)
        by_flops.append(flops_cells)
    return "\n\n".join([
        "By tokens (paper: r = 8 large-scale run at three points along training):",
        _md_table(by_tokens_head, by_tokens),
        "By FLOPs (baseline FLOPs ÷ VWN FLOPs to reach the same loss; gap at equal FLOPs):",
        _md_table(by_flops_head, by_flops),
    ])


def _final_table(finals: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per width: final loss (seed mean, min, max), reduction vs the baseline mean, paper's Δ."""
    parts = []
    for loss, runs in finals.items():
        stats = runs.groupby(["r", "m", "n"], sort=True)["loss"].agg(["count", "mean", "min", "max"])
        base = runs.loc[(runs["m"] == 1) & (runs["n"] == 1), "loss"].mean()
        stats.columns = [f"runs_{loss}", f"mean_{loss}", f"min_{loss}", f"max_{loss}"]
        stats[f"delta_{loss}"] = base - stats[f"mean_{loss}"]
        paper = [PAPER.delta(loss, r) for r in stats.index.get_level_values("r")]
        stats[f"paper_delta_{loss}"] = [np.nan if v is None else v for v in paper]
        parts.append(stats)
    return pd.concat(parts, axis=1).reset_index() if parts else pd.DataFrame()


def _final_markdown(table: pd.DataFrame, losses: Sequence[str]) -> str:
    head = ["width"]
    for loss in losses:
        head += ["runs", f"final {LOSSES[loss]} (range)", "Δ vs baseline", "paper Δ"]
    rows = []
    for _, row in table.iterrows():
        cells = [_width_cell(row["m"], row["n"])]
        for loss in losses:
            spread = (f" ({row[f'min_{loss}']:.4f} to {row[f'max_{loss}']:.4f})"
                      if row[f"runs_{loss}"] > 1 else "")
            paper = row[f"paper_delta_{loss}"]
            cells += [_num(row[f"runs_{loss}"], ".0f"), _num(row[f"mean_{loss}"], ".4f") + spread,
                      _num(row[f"delta_{loss}"], "+.4f"), "" if pd.isna(paper) else f"{paper:.3f}"]
        rows.append(cells)
    return _md_table(head, rows)


def _interval_text(fit: LogLinearFit) -> str:
    if fit.method == "none":
        return "none: too few runs (one run per width and fewer than three widths)"
    return f"{fit.level:.0%} bootstrap over {fit.method}"


def _law_rows(fits: dict[str, dict[str, LogLinearFit | None]]) -> list[dict[str, object]]:
    rows = []
    for loss, by_name in fits.items():
        for name, fit in by_name.items():
            if fit is not None:
                rows.append({
                    "source": "measured", "loss": loss, "fit": name,
                    "slope": fit.slope, "slope_lo": fit.slope_ci[0], "slope_hi": fit.slope_ci[1],
                    "intercept": fit.intercept, "intercept_lo": fit.intercept_ci[0],
                    "intercept_hi": fit.intercept_ci[1], "r2": fit.r2, "n_widths": fit.n_widths,
                    "n_runs": fit.n_points, "interval": _interval_text(fit),
                })
    return rows


PAPER_LAW_ROW = {
    "source": "paper", "loss": "ntp", "fit": "r>1", "slope": PAPER.law_slope, "intercept": PAPER.law_intercept,
    "r2": PAPER.law_r2, "n_widths": 3, "interval": f"{PAPER_CITATION}, {PAPER.width_scaling_setup}",
}


def _law_markdown(rows: list[dict[str, object]]) -> str:
    head = ["source", "loss", "fit on", "slope per doubling of r [CI]", "intercept [CI]", "R²", "widths",
            "runs", "interval"]
    cells = []
    for row in rows + [PAPER_LAW_ROW]:
        slope, intercept = _num(row["slope"], "+.4f"), _num(row["intercept"], ".4f")
        if row["source"] == "measured":
            slope += f" [{_num(row['slope_lo'], '+.4f')}, {_num(row['slope_hi'], '+.4f')}]"
            intercept += f" [{_num(row['intercept_lo'], '.4f')}, {_num(row['intercept_hi'], '.4f')}]"
        cells.append([
            str(row["source"]), LOSSES[str(row["loss"])], "r > 1" if row["fit"] == "r>1" else "all r",
            slope, intercept, _num(row["r2"], ".4f"),
            str(row["n_widths"]), str(row.get("n_runs", "")), str(row["interval"]),
        ])
    return _md_table(head, cells)


def _law_sentence(fits: dict[str, dict[str, LogLinearFit | None]]) -> str:
    fit = fits.get("ntp", {}).get("r>1")
    if fit is None:
        return "_Too few widths above r = 1 for the width law (it needs two)._"
    return (f"Next-token law on r > 1: slope {fit.slope:+.4f} per doubling of r "
            f"({fit.level:.0%} CI {_num(fit.slope_ci[0], '+.4f')} to {_num(fit.slope_ci[1], '+.4f')}), "
            f"R² = {_num(fit.r2, '.4f')}; the paper reports {PAPER.law_slope:+.4f}, R² = {PAPER.law_r2:.4f} "
            f"({PAPER.width_scaling_setup}).")


# ----------------------------------------------------------------------------- files


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=DPI, metadata=PNG_METADATA)
    return path.name


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    path.write_text(table.to_csv(index=False, float_format=CSV_FLOAT, lineterminator="\n"))


def _runs_table(frame: pd.DataFrame, split: str, varying: Sequence[str]) -> pd.DataFrame:
    last = frame.sort_values(["run_id", "step"]).groupby("run_id", sort=True).tail(1).set_index("run_id")
    out = last[["m", "n", "r", *varying, "seed", "status", "step", "tokens", "params", "flops_per_token"]]
    out = out.astype({"params": "Int64", "flops_per_token": "Int64"})  # exact counts; <NA> without summary
    for loss in LOSSES:
        column = loss_column(split, loss)
        if column in frame and frame[column].notna().any():
            out = out.assign(**{f"final_{column}": final_losses(frame, column).set_index("run_id")["loss"]})
    return out.reset_index()


def _runs_markdown(runs: pd.DataFrame, varying: Sequence[str]) -> str:
    finals = [c for c in runs.columns if c.startswith("final_")]
    names = [f"final {c.removeprefix('final_').split('/')[0]} {LOSSES[c.rsplit('_', 1)[1]]}" for c in finals]
    head = ["run", "width", *varying, "seed", "status", "steps", "tokens", "params", "FLOPs/token", *names]
    rows = [[
        str(row["run_id"]), _width_cell(row["m"], row["n"]), *(str(row[c]) for c in varying), str(row["seed"]),
        str(row["status"]), str(row["step"]), _si(row["tokens"]), _num(row["params"], ".3g"),
        _num(row["flops_per_token"], ".3g"), *(_num(row[c], ".4f") for c in finals),
    ] for _, row in runs.iterrows()]
    return _md_table(head, rows)


def _method_notes(split: str, smooth: float, n_boot: int) -> str:
    return "\n".join([
        f"- Losses: `{split}/loss_ntp` (next-token) and `{split}/loss_next2` (next-2-token, MTP runs), "
        "in nats per token. Only runs with status `done` enter curves, fits and tables.",
        "- A *width* is a virtual width (m, n), r = n/m; its baseline is (1,1) with the same other "
        "settings. Seeds of a width are averaged (mean curve on common token points) before comparing; "
        "ranges in parentheses are min to max over seeds (seed s of a width against seed s of the "
        "baseline), shown where two or more seeds exist.",
        "- Speedup (token-efficiency ratio) = tokens the baseline needs to reach the width's loss ÷ "
        f"tokens the width used. Both curves are smoothed with a bias-corrected EMA (β = {smooth:g}; each "
        "smoothed loss is placed at the EMA-weighted mean tokens, which removes the EMA's lag), the "
        "baseline is made monotone by a running minimum and inverted in (log tokens, loss). By FLOPs: "
        "the same with cumulative training FLOPs (tokens × FLOPs/token). Gap = baseline loss − width "
        "loss at the same tokens (FLOPs): positive means the wider model is better.",
        "- `*` marks values beyond the baseline's reach (the width's loss is below the baseline's best, "
        "or its tokens/FLOPs are past the baseline's last point), read off a power law L = E + A·T^(−α) "
        "fitted to the baseline: an extrapolation, not a measurement.",
        "- Training points 25/50/100 % are the evaluations nearest to those fractions of the width's "
        "final tokens (with smoothing, a value there also reflects the evaluations just before). "
        "Width law: OLS on the per-width mean final loss; intervals are percentile "
        f"bootstraps ({n_boot} resamples, fixed seed).",
        f"- Paper columns are reference data from {PAPER_CITATION}: {PAPER.large_scale_setup} "
        f"(speedups, gaps) and {PAPER.width_scaling_setup} (Δ, law). Models that size are not comparable "
        "in absolute terms; the paper's three unspecified points along training are placed at 25/50/100 %.",
    ])


@dataclass(frozen=True)
class SettingOutput:
    """What one setting contributes to report.md and to the CSV tables."""

    markdown: list[str]
    speedup_markdown: str
    law: pd.DataFrame
    finals: pd.DataFrame
    speedups: pd.DataFrame


def _setting_output(
    result: SettingResult, label: str, colors: dict[Width, str], out_dir: Path, split: str
) -> SettingOutput:
    """Figures of one setting (saved under out_dir) and its markdown and tables."""
    suffix = f"_{_slug(label)}" if label else ""
    losses = list(result.curves)
    md = ["### Loss curves"]
    fig = plot_loss_curves(result.curves, colors, split=split, title=label)
    md.append(f"![Loss vs tokens]({_save(fig, out_dir / f'loss_vs_tokens{suffix}.png')})")
    if all(np.isfinite(c.flops_per_token) for by_width in result.curves.values() for c in by_width.values()):
        fig = plot_loss_curves(result.curves, colors, unit="flops", split=split, title=label)
        md.append(f"![Loss vs training FLOPs]({_save(fig, out_dir / f'loss_vs_flops{suffix}.png')})")

    law = _law_rows(result.fits)
    finals = _final_table(result.finals)
    fig = plot_width_law(result.finals, result.fits, colors, split=split, title=label)
    md += ["### Width law", f"![Final loss vs log2 r]({_save(fig, out_dir / f'width_law{suffix}.png')})",
           _law_sentence(result.fits), _law_markdown(law), _final_markdown(finals, losses)]

    speedups = _paper_columns(result.speedups, losses)
    if not speedups.empty:
        speedups["flops"] = speedups["flops"].round().astype("Int64")
    speedup_md = _speedup_markdown(speedups, losses)
    md += ["### Speedups", speedup_md]
    for width in dict.fromkeys(w for w, _, _ in result.comparisons):
        comparisons = {(loss, unit): c for (w, loss, unit), c in result.comparisons.items() if w == width}
        fig = plot_speedup(comparisons, width, colors[width], title=label)
        name = _save(fig, out_dir / f"speedup_m{width[0]}_n{width[1]}{suffix}.png")
        md.append(f"![Speedup of {width_label(width)}]({name})")
    return SettingOutput(md, speedup_md, pd.DataFrame(law), finals, speedups)


def _concat(tables: list[pd.DataFrame]) -> pd.DataFrame:
    tables = [t for t in tables if not t.empty]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def write_report(
    grid_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    split: str = "val",
    smooth: float = DEFAULT_SMOOTH,
    n_boot: int = N_BOOT,
) -> Path:
    """Regenerate the report of a grid from its run folders; returns the path of report.md.

    out_dir defaults to grid_dir/"report". split: which losses to analyse ("val", the fixed held-out
    set, or "train"); smooth: EMA β of the speedup curves (`analysis.speedup`); n_boot: bootstrap
    resamples of the width-law intervals. Unreadable run folders are skipped with a warning and listed
    in the report. Raises ValueError when no run folder could be read.
    """
    grid_dir = Path(grid_dir)
    out_dir = Path(out_dir) if out_dir is not None else grid_dir / "report"
    frame = load_grid(grid_dir)
    skipped = dict(frame.attrs.get("skipped", {}))
    if frame.empty:
        raise ValueError(f"{grid_dir}: no readable run folders")
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = width_colors(zip(frame["m"], frame["n"], strict=True))
    varying = [c for c in setting_columns(frame) if frame[c].astype(str).nunique() > 1]
    runs = _runs_table(frame, split, varying)
    _write_csv(runs, out_dir / "runs.csv")

    md = [f"# VWN report: {grid_dir.name}",
          f"Regenerated by `vwn report` from the run folders of `{grid_dir.name}/` (`analysis.write_report`).",
          "## Method", _method_notes(split, smooth, n_boot), "## Runs", _runs_markdown(runs, varying)]
    if skipped:
        md += ["Skipped run folders (unreadable):",
               "\n".join(f"- `{Path(p).name}`: {why}" for p, why in sorted(skipped.items()))]
    speedup_md = ["# Speedups and loss gaps", _method_notes(split, smooth, n_boot)]
    laws, finals, speedups = [], [], []
    with matplotlib.style.context("default"):
        for setting, group in settings(frame[frame["status"] == "done"]):
            label = ", ".join(f"{c}={setting[c]}" for c in varying)
            md.append(f"## Results: {label}" if label else "## Results")
            result = analyse_setting(group, split, smooth, n_boot)
            if not result.curves:
                md.append(f"_No `{split}` losses logged by the finished runs of this setting._")
                continue
            out = _setting_output(result, label, colors, out_dir, split)
            keys = {c: setting[c] for c in varying}
            md += out.markdown
            speedup_md += [f"## {label}", out.speedup_markdown] if label else [out.speedup_markdown]
            laws.append(out.law.assign(**keys))
            finals.append(out.finals.assign(**keys))
            speedups.append(out.speedups.assign(**keys))

    _write_csv(_concat([*laws, pd.DataFrame([PAPER_LAW_ROW])]), out_dir / "width_law.csv")
    _write_csv(_concat(finals), out_dir / "final_losses.csv")
    _write_csv(_concat(speedups), out_dir / "speedups.csv")
    (out_dir / "speedups.md").write_text("\n\n".join(speedup_md) + "\n")
    report = out_dir / "report.md"
    report.write_text("\n\n".join(md) + "\n")
    return report
