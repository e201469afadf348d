"""The committed CPU width study: `vwn report` on results/width_sweep reproduces the committed report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis import write_report
from harness.grid import load_grid

STUDY = Path(__file__).resolve().parents[1] / "results" / "width_sweep"
TABLES = ["report.md", "runs.csv", "speedups.csv", "speedups.md", "width_law.csv", "final_losses.csv"]


def test_report_on_the_committed_runs_reproduces_the_committed_tables(tmp_path: Path) -> None:
    committed = STUDY / "report"
    write_report(STUDY, tmp_path)
    for name in TABLES:
        assert (tmp_path / name).read_text() == (committed / name).read_text(), name
    figures = sorted(p.name for p in committed.glob("*.png"))
    assert figures and sorted(p.name for p in tmp_path.glob("*.png")) == figures


def test_the_committed_study_is_the_grid_of_experiments_width_sweep() -> None:
    """Every run of the grid file is committed and finished: the report covers the whole grid."""
    grid = load_grid(STUDY.parents[1] / "experiments" / "width_sweep.yaml")
    runs = pd.read_csv(STUDY / "report" / "runs.csv", dtype={"run_id": str})
    assert sorted(runs["run_id"]) == sorted(run.run_id for run in grid.runs)
    assert (runs["status"] == "done").all()
    for run in grid.runs:
        summary = json.loads((STUDY / run.run_id / "summary.json").read_text())
        assert summary["status"] == "done" and summary["tokens"] == run.config.max_steps * run.config.tokens_per_step
