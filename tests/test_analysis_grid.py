"""Synthetic run folders written to the trainer's run-folder contract, and tests of analysis.load.

`write_run` / `write_grid` are imported by the other analysis tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis import SkippedRunWarning, load_grid

METRIC_COLUMNS = ["step", "tokens", "train/loss_ntp", "train/loss_next2", "val/loss_ntp", "val/loss_next2",
                  "lr", "tokens_per_s", "moe/aux_loss", "moe/max_load"]
TOKENS_PER_STEP = 4096
BASE_FLOPS_PER_TOKEN = 1_000_000


def true_loss(tokens: np.ndarray, speedup: float = 1.0, floor: float = 1.6) -> np.ndarray:
    """The synthetic baseline law L(T) = floor + 30·T^(−0.3); a run with `speedup` k reaches every
    loss with exactly k× fewer tokens: L_k(T) = L(k·T)."""
    return floor + 30.0 * (speedup * np.asarray(tokens, dtype=float)) ** -0.3


def run_config(m: int, n: int, seed: int, mtp: bool, **overrides: object) -> dict:
    """A resolved run config with the sections and keys the trainer writes (values plausible)."""
    config = {
        "model": {"vocab_size": 4096, "d_model": 64, "n_layers": 2, "n_heads": 2, "seq_len": 128,
                  "n_experts": 4, "top_k": 2, "virtual_width": [m, n], "dynamic": True,
                  "embedding": "direct", "mtp": mtp, "mtp_weight": 0.1},
        "data": {"corpus": "builtin", "tokenizer": "bpe", "val_fraction": 0.02},
        "optim": {"lr": 0.003, "betas": [0.9, 0.95], "schedule": "constant"},
        "train": {"tokens": 200 * TOKENS_PER_STEP, "batch_size": 32, "seed": seed, "log_every": 10,
                  "val_every": 20},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        config[section][key] = value
    return config


def write_run(
    grid: Path,
    run_id: str,
    *,
    m: int = 1,
    n: int = 1,
    seed: int = 0,
    mtp: bool = True,
    speedup: float = 1.0,
    next2_speedup: float = 1.0,
    noise: float = 0.002,
    steps: int = 200,
    status: str | None = "done",
    resumed: bool = False,
    **overrides: object,
) -> Path:
    """One run folder: config.yaml, metrics.csv (train rows every 10 steps, val rows every 20 steps
    sharing the step of a train row, plus a step-0 eval), summary.json unless status is None.
    resumed=True: a first attempt logs up to step 140 with losses off by +1 from step 100, then the
    requeued job resumes from the step-100 checkpoint and logs 100.. again with the true curve."""
    run_dir = grid / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(run_config(m, n, seed, mtp, **overrides)))
    rng = np.random.default_rng(1000 * seed + 10 * m + n)
    rows = []

    def add(step: int, kind: str, offset: float = 0.0) -> None:
        tokens = step * TOKENS_PER_STEP
        ntp = true_loss(max(tokens, 1), speedup) + offset + noise * rng.standard_normal()
        next2 = true_loss(max(tokens, 1), next2_speedup, floor=2.0) + offset + noise * rng.standard_normal()
        row = dict.fromkeys(METRIC_COLUMNS, "")
        row.update(step=step, tokens=tokens)
        prefix = "val" if kind == "val" else "train"
        row[f"{prefix}/loss_ntp"] = f"{ntp:.6f}"
        row[f"{prefix}/loss_next2"] = f"{next2:.6f}" if mtp else ""
        if kind == "train":
            row.update({"lr": 0.003, "tokens_per_s": 5000.0, "moe/aux_loss": 0.01, "moe/max_load": 1.3})
        rows.append(row)

    add(0, "val")
    first_attempt = range(10, (140 if resumed else steps) + 1, 10)
    requeued = range(100, steps + 1, 10) if resumed else range(0)
    for step in first_attempt:
        offset = 1.0 if resumed and step >= 100 else 0.0
        add(step, "train", offset)
        if step % 20 == 0:
            add(step, "val", offset)
    for step in requeued:
        add(step, "train")
        if step % 20 == 0:
            add(step, "val")
    pd.DataFrame(rows, columns=METRIC_COLUMNS).to_csv(run_dir / "metrics.csv", index=False)
    if status is not None:
        flops_per_token = BASE_FLOPS_PER_TOKEN * (1 + 0.05 * (n / m - 1))
        final = {"train/loss_ntp": 1.7, "train/loss_next2": 2.1 if mtp else None,
                 "val/loss_ntp": 1.7, "val/loss_next2": 2.1 if mtp else None}
        summary = {"status": status, "run_id": run_id, "steps": steps, "tokens": steps * TOKENS_PER_STEP,
                   "wall_time_s": 12.5, "final": final, "params": {"total": 1_000_000 * n // m, "embedding": 1},
                   "flops_per_token": {"total": int(flops_per_token), "attention": 1},
                   "corpus_fingerprint": "abc123", "error": None}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


SPEEDUPS = {(1, 1): (1.0, 1.0), (2, 4): (1.5, 2.0), (2, 8): (2.0, 3.0), (2, 16): (3.0, 4.0)}


def write_grid(
    grid: Path,
    widths: tuple[tuple[int, int], ...] = ((1, 1), (2, 4), (2, 8), (2, 16)),
    seeds: tuple[int, ...] = (0, 1),
    mtp: bool = True,
    **kwargs: object,
) -> Path:
    """A finished width x seed grid; width (m, n) has the known speedups SPEEDUPS[(m, n)]."""
    for m, n in widths:
        for seed in seeds:
            ntp, next2 = SPEEDUPS[m, n]
            run_id = f"{m:02d}{n:02d}{seed:02d}{int(mtp):02d}ab"
            write_run(grid, run_id, m=m, n=n, seed=seed, mtp=mtp, speedup=ntp, next2_speedup=next2, **kwargs)
    return grid


# ----------------------------------------------------------------------------- load tests


def test_load_grid_is_tidy_with_run_and_config_columns(tmp_path: Path) -> None:
    grid = write_grid(tmp_path / "g", widths=((1, 1), (2, 4)), seeds=(0, 1))
    (grid / "report").mkdir()  # not a run: no config.yaml
    (grid / "submitit").mkdir()
    frame = load_grid(grid)
    assert frame["run_id"].nunique() == 4
    assert list(frame.columns[:7]) == ["run_id", "status", "m", "n", "r", "mtp", "seed"]
    assert {"step", "tokens", "flops", "val/loss_ntp", "val/loss_next2", "moe/max_load"} <= set(frame.columns)
    # nothing but width and seed differs between runs, so no other config column
    assert not [c for c in frame.columns if "." in c]
    assert frame.attrs["swept"] == ["model.virtual_width", "train.seed"]
    assert set(frame["r"]) == {1.0, 2.0} and set(frame["seed"]) == {0, 1} and frame["mtp"].all()
    assert (frame["status"] == "done").all()
    one = frame[frame["run_id"] == frame["run_id"].iloc[0]]
    # one row per logged step: train rows every 10 steps merged with val rows every 20, plus step 0
    assert list(one["step"]) == list(range(0, 201, 10))
    assert one["val/loss_ntp"].notna().sum() == 11 and one["train/loss_ntp"].notna().sum() == 20
    expected = one["tokens"] * one["flops_per_token"]
    assert np.allclose(one["flops"], expected) and one["flops_per_token"].iloc[0] == BASE_FLOPS_PER_TOKEN


def test_swept_config_values_become_columns(tmp_path: Path) -> None:
    grid = tmp_path / "g"
    write_run(grid, "aaaaaaaaaa", m=1, n=1, **{"model.dynamic": True, "optim.lr": 0.003})
    write_run(grid, "bbbbbbbbbb", m=2, n=4, **{"model.dynamic": False, "optim.lr": 0.003})
    frame = load_grid(grid)
    assert "model.dynamic" in frame.columns and "optim.lr" not in frame.columns
    assert frame.attrs["swept"] == ["model.dynamic", "model.virtual_width"]
    per_run = frame.groupby("run_id")["model.dynamic"].first()
    assert per_run.to_dict() == {"aaaaaaaaaa": True, "bbbbbbbbbb": False}


def test_resumed_steps_keep_the_last_occurrence(tmp_path: Path) -> None:
    grid = tmp_path / "g"
    write_run(grid, "cccccccccc", resumed=True, noise=0.0)
    raw = pd.read_csv(grid / "cccccccccc" / "metrics.csv")
    assert raw["step"].duplicated().sum() > raw["step"].nunique() / 2  # duplicates really are there
    frame = load_grid(grid)
    assert frame["step"].is_unique
    for column in ("train/loss_ntp", "val/loss_ntp"):
        rows = frame.dropna(subset=[column])
        assert np.allclose(rows[column], true_loss(np.maximum(rows["tokens"], 1)), atol=1e-5)


def test_run_without_summary_is_incomplete_and_next2_empty_without_mtp(tmp_path: Path) -> None:
    grid = tmp_path / "g"
    write_run(grid, "dddddddddd", status=None, mtp=False, steps=60)
    frame = load_grid(grid)
    assert (frame["status"] == "incomplete").all()
    assert frame["flops"].isna().all() and frame["val/loss_next2"].isna().all()
    assert frame["val/loss_ntp"].notna().sum() == 4 and not frame["mtp"].any()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / "config.yaml").write_text("model: [unclosed"), "not valid YAML"),
        (lambda d: (d / "metrics.csv").unlink(), "no metrics.csv"),
        (lambda d: (d / "metrics.csv").write_text("step,tokens\n"), "no rows"),
        (lambda d: (d / "metrics.csv").write_text("step,loss\n1,2\n"), "lacks column(s) tokens"),
        (lambda d: (d / "metrics.csv").write_text("step,tokens,val/loss_ntp\n1,10,abc\n"), "non-numeric"),
        (lambda d: (d / "summary.json").write_text('{"status": "do'), "summary.json is not valid JSON"),
        (lambda d: (d / "config.yaml").write_text(yaml.safe_dump({"model": {"mtp": True}})),
         "lacks model.virtual_width"),
        (lambda d: (d / "config.yaml").write_text(yaml.safe_dump(run_config(1, 1, "zero", True))),
         "ValueError"),  # an unexpected problem: still a warning, not a crash
    ],
)
def test_corrupt_run_folder_is_skipped_with_a_warning(tmp_path: Path, damage, reason: str) -> None:
    grid = write_grid(tmp_path / "g", widths=((1, 1),), seeds=(0, 1))
    broken = sorted(grid.iterdir())[0]
    damage(broken)
    with pytest.warns(SkippedRunWarning, match=rf"{broken.name}.*{reason.replace('(', '.').replace(')', '.')}"):
        frame = load_grid(grid)
    assert frame["run_id"].unique().tolist() == [sorted(grid.iterdir())[1].name]
    assert list(frame.attrs["skipped"]) == [str(broken)]


def test_empty_grid_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "g" / "report").mkdir(parents=True)
    frame = load_grid(tmp_path / "g")
    assert frame.empty and {"run_id", "r", "tokens", "flops"} <= set(frame.columns)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_grid(tmp_path / "nowhere")

