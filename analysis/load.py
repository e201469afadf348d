"""Run folders -> one tidy pandas DataFrame (one row per run x logged step).

A grid folder `results/<grid>/` holds one folder per run (a folder is a run when it contains
`config.yaml`) next to folders that are not runs (`report/`, `submitit/`, ...). Each run folder has
`config.yaml` (the resolved run config), `metrics.csv` (training rows and separate validation rows)
and, once finished, `summary.json`. A run folder that cannot be read is skipped with a
`SkippedRunWarning` naming it; it never stops the analysis of the others.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

# Config keys that get short column names. model.virtual_width = [m, n] becomes m, n and r = n/m.
ALIASES = {"model.mtp": "mtp", "train.seed": "seed"}
WIDTH_KEY = "model.virtual_width"
# Columns that every frame returned by load_grid has, in this order (swept config columns follow).
RUN_COLUMNS = ["run_id", "status", "m", "n", "r", "mtp", "seed"]
STEP_COLUMNS = ["step", "tokens", "flops", "flops_per_token", "params"]


class SkippedRunWarning(UserWarning):
    """A run folder that is incomplete or corrupt was left out of the analysis."""


class RunFolderError(ValueError):
    """A run folder breaks the run-folder contract (the message says how)."""


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config mapping -> {dotted key: value}; lists become tuples so values stay hashable."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = _hashable(value)
    return flat


def _hashable(value: Any) -> Any:
    """Lists (nested too) as tuples, so that config values can be compared and grouped."""
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def read_config(run_dir: Path) -> dict[str, Any]:
    """Flattened `config.yaml` of a run, checked for the keys the analysis needs."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except yaml.YAMLError as error:
        raise RunFolderError(f"config.yaml is not valid YAML ({error})") from None
    if not isinstance(config, dict):
        raise RunFolderError("config.yaml is not a mapping")
    flat = flatten(config)
    for key in (WIDTH_KEY, *ALIASES):
        if key not in flat:
            raise RunFolderError(f"config.yaml lacks {key}")
    width = flat[WIDTH_KEY]
    if not (isinstance(width, tuple) and len(width) == 2 and all(isinstance(v, int) and v > 0 for v in width)):
        raise RunFolderError(f"config.yaml: {WIDTH_KEY} must be two positive integers [m, n], got {width!r}")
    return flat


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """`summary.json` of a finished run, or None while the run has not written it."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunFolderError(f"summary.json is not valid JSON ({error})") from None
    if not isinstance(summary, dict) or "status" not in summary:
        raise RunFolderError("summary.json has no status")
    return summary


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """`metrics.csv` merged to one row per step, sorted by step.

    A row is a validation row when it has any `val/*` value, otherwise a training row. After a
    resume a (step, kind) pair may be logged twice: the last occurrence wins. A training row and a
    validation row of the same step are then merged into one row.
    """
    path = run_dir / "metrics.csv"
    if not path.exists():
        raise RunFolderError("no metrics.csv")
    try:
        metrics = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise RunFolderError(f"metrics.csv cannot be parsed ({str(error).strip()})") from None
    missing = [c for c in ("step", "tokens") if c not in metrics.columns]
    if missing:
        raise RunFolderError(f"metrics.csv lacks column(s) {', '.join(missing)}")
    if metrics.empty:
        raise RunFolderError("metrics.csv has no rows")
    try:
        metrics = metrics.apply(pd.to_numeric).astype(float)
    except (ValueError, TypeError) as error:
        raise RunFolderError(f"metrics.csv has a non-numeric value ({error})") from None
    if metrics[["step", "tokens"]].isna().any().any():
        raise RunFolderError("metrics.csv has a row without step or tokens")
    val_columns = [c for c in metrics.columns if c.startswith("val/")]
    kind = metrics[val_columns].notna().any(axis=1) if val_columns else False
    metrics = metrics.assign(_val=kind).drop_duplicates(["step", "_val"], keep="last")
    merged = metrics.drop(columns="_val").groupby("step", sort=True).first().reset_index()
    merged["step"] = merged["step"].astype(int)
    merged["tokens"] = merged["tokens"].astype(int)
    return merged


def load_run(run_dir: str | Path) -> pd.DataFrame:
    """One run folder -> rows of its metrics with run columns (all config keys as dotted columns).

    Raises RunFolderError when the folder breaks the run-folder contract.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    summary = read_summary(run_dir)
    metrics = read_metrics(run_dir)
    m, n = config[WIDTH_KEY]
    flops_per_token = _total(summary, "flops_per_token")
    run = {
        "run_id": run_dir.name,
        "status": summary["status"] if summary else "incomplete",
        "m": m,
        "n": n,
        "r": n / m,
        "mtp": bool(config["model.mtp"]),
        "seed": int(config["train.seed"]),
        "flops_per_token": flops_per_token,
        "params": _total(summary, "params"),
    }
    run.update({k: v for k, v in config.items() if k not in ALIASES and k != WIDTH_KEY})
    frame = metrics.assign(flops=metrics["tokens"] * flops_per_token)
    return frame.assign(**{key: [value] * len(frame) for key, value in run.items()})


def _total(summary: dict[str, Any] | None, key: str) -> float:
    try:
        return float(summary[key]["total"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return float("nan")


def run_dirs(grid_dir: str | Path) -> list[Path]:
    """Run folders of a grid (sub-folders holding config.yaml), sorted by name."""
    grid_dir = Path(grid_dir)
    if not grid_dir.is_dir():
        raise FileNotFoundError(f"{grid_dir}: no such grid folder")
    return sorted(p for p in grid_dir.iterdir() if p.is_dir() and (p / "config.yaml").is_file())


def load_grid(path: str | Path) -> pd.DataFrame:
    """Tidy frame of every readable run of a grid: one row per (run, logged step).

    Columns: `run_id, status, m, n, r, mtp, seed`, then every other config key whose value differs
    between runs (dotted names such as `model.dynamic`), then `step, tokens, flops, flops_per_token,
    params` and the metrics columns (`train/loss_ntp`, `val/loss_ntp`, ...; NaN where a row has no
    value). `status` is the summary's "done" | "diverged" | "failed", or "incomplete" for a run
    without summary.json (running, or stopped before the end); `flops` = tokens x FLOPs per token
    from the summary (NaN without summary). Unreadable run folders are skipped with a
    SkippedRunWarning naming the folder and the reason; `frame.attrs["skipped"]` maps each skipped
    folder to its reason, `frame.attrs["swept"]` lists the swept dotted config keys.
    """
    frames: list[pd.DataFrame] = []
    skipped: dict[str, str] = {}
    for run_dir in run_dirs(path):
        try:
            frames.append(load_run(run_dir))
        except Exception as error:  # noqa: BLE001 (one bad folder must never stop the analysis of the others)
            reason = str(error) if isinstance(error, RunFolderError) else f"{type(error).__name__}: {error}"
            skipped[str(run_dir)] = reason
            warnings.warn(f"skipping run folder {run_dir}: {reason}", SkippedRunWarning, stacklevel=2)
    if not frames:
        frame = pd.DataFrame(columns=RUN_COLUMNS + STEP_COLUMNS)
        frame.attrs.update(swept=[], skipped=skipped)
        return frame
    frame = pd.concat(frames, ignore_index=True)
    config_columns = [c for c in frame.columns if "." in c]
    runs = frame.drop_duplicates("run_id")
    swept = [c for c in config_columns if runs[c].astype(str).nunique(dropna=False) > 1]
    metric_columns = [c for c in frame.columns if c not in RUN_COLUMNS + STEP_COLUMNS + config_columns]
    frame = frame[RUN_COLUMNS + sorted(swept) + STEP_COLUMNS + metric_columns]
    frame = frame.sort_values(["run_id", "step"], kind="stable", ignore_index=True)
    frame.attrs.update(swept=_swept_keys(runs, swept), skipped=skipped)
    return frame


def _swept_keys(runs: pd.DataFrame, swept: list[str]) -> list[str]:
    """Swept dotted keys, including the width, MTP and seed keys when their aliases vary."""
    keys = list(swept)
    if runs[["m", "n"]].drop_duplicates().shape[0] > 1:
        keys.append(WIDTH_KEY)
    keys += [key for key, alias in ALIASES.items() if runs[alias].nunique() > 1]
    return sorted(keys)


def setting_columns(frame: pd.DataFrame) -> list[str]:
    """Columns that define a comparable setting: everything swept except the width and the seed.

    Runs of one setting differ only in (m, n) and seed, so the (1, 1) runs of a setting are the
    baseline of its other widths. `mtp` is always included; the others are the dotted columns
    (load_grid keeps only swept config keys as dotted columns).
    """
    return ["mtp"] + [c for c in frame.columns if "." in c]
