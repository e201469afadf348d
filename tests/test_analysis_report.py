"""`write_report` (what `vwn report results/X` calls) on synthetic grids."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_analysis_grid import SPEEDUPS, write_grid, write_run

from analysis import SkippedRunWarning, write_report

TABLES = ["report.md", "runs.csv", "speedups.csv", "speedups.md", "width_law.csv", "final_losses.csv"]


def images(report: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())


@pytest.fixture(scope="module")
def full_grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 widths x 2 seeds with MTP, plus a corrupt run, an unfinished run and a non-run folder."""
    grid = write_grid(tmp_path_factory.mktemp("results") / "width_sweep")
    write_run(grid, "badbadbad0", m=2, n=4, seed=5).joinpath("metrics.csv").write_text("step,tokens\n1,x\n")
    write_run(grid, "running000", m=2, n=4, seed=7, status=None, steps=60)
    (grid / "submitit").mkdir()
    return grid


@pytest.fixture(scope="module")
def full_report(full_grid: Path) -> Path:
    with pytest.warns(SkippedRunWarning, match="badbadbad0"):
        return write_report(full_grid, n_boot=50)


def test_report_writes_every_file(full_grid: Path, full_report: Path) -> None:
    out = full_grid / "report"
    assert full_report == out / "report.md"
    figures = ["loss_vs_tokens.png", "loss_vs_flops.png", "width_law.png",
               "speedup_m2_n4.png", "speedup_m2_n8.png", "speedup_m2_n16.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(TABLES + figures)
    assert sorted(images(full_report)) == sorted(figures)
    assert all((out / name).stat().st_size > 10_000 for name in figures)


def test_report_lists_skipped_and_unfinished_runs(full_report: Path) -> None:
    text = full_report.read_text()
    assert "badbadbad0" in text and "non-numeric" in text
    assert re.search(r"\| running000 \|.*\| incomplete \|", text)
    runs = pd.read_csv(full_report.parent / "runs.csv")
    assert len(runs) == 9 and (runs["status"] == "done").sum() == 8


def test_speedup_table_recovers_the_known_speedups(full_report: Path) -> None:
    table = pd.read_csv(full_report.parent / "speedups.csv")
    assert len(table) == 9  # 3 widths x 25/50/100 %
    assert list(table["fraction"].unique()) == [0.25, 0.5, 1.0]
    early = table[table["fraction"] == 0.25].set_index(["m", "n"])
    for (m, n), (ntp, next2) in SPEEDUPS.items():
        if (m, n) != (1, 1):
            # measured, not extrapolated, at 25 %: within 3 % of the synthetic truth
            assert early.loc[(m, n), "speedup_ntp_tokens"] == pytest.approx(ntp, rel=0.03)
            assert early.loc[(m, n), "speedup_next2_tokens"] == pytest.approx(next2, rel=0.03)
            assert not early.loc[(m, n), "speedup_ntp_tokens_extrapolated"]
    # the runs cost more FLOPs per token the wider they are: compute-normalised speedups are smaller
    assert (table["speedup_ntp_flops"] < table["speedup_ntp_tokens"]).all()
    assert (table["gap_ntp_tokens"] > 0).all()
    assert (table["speedup_ntp_tokens_min"] <= table["speedup_ntp_tokens"]).all()
    # the paper's r = 8 figures sit next to our r = 8 rows only
    r8 = table[table["r"] == 8]
    assert list(r8["paper_speedup_ntp"]) == [1.6, 2.0, 2.5] and list(r8["paper_gap_next2"]) == [0.049, 0.051, 0.056]
    assert table.loc[table["r"] != 8, "paper_speedup_ntp"].isna().all()


def test_width_law_table_has_both_fits_and_the_paper(full_report: Path) -> None:
    law = pd.read_csv(full_report.parent / "width_law.csv")
    measured = law[law["source"] == "measured"].set_index(["loss", "fit"])
    assert set(measured.index) == {("ntp", "r>1"), ("ntp", "all"), ("next2", "r>1"), ("next2", "all")}
    assert measured.loc[("ntp", "r>1"), "n_widths"] == 3 and measured.loc[("ntp", "all"), "n_widths"] == 4
    assert (measured["slope"] < 0).all() and (measured["slope_lo"] < measured["slope_hi"]).all()
    paper = law[law["source"] == "paper"].iloc[0]
    assert (paper["slope"], paper["intercept"], paper["r2"]) == (-0.0069, 1.6212, 0.9986)
    finals = pd.read_csv(full_report.parent / "final_losses.csv").set_index("r")
    assert finals.loc[1.0, "delta_ntp"] == 0 and (finals.loc[[2.0, 4.0, 8.0], "delta_ntp"] > 0).all()
    assert list(finals.loc[[2.0, 4.0, 8.0], "paper_delta_next2"]) == [0.030, 0.045, 0.058]
    text = full_report.read_text()
    assert "the paper reports -0.0069, R² = 0.9986" in text and "| paper | next-token | r > 1 | -0.0069" in text


def test_report_is_deterministic(full_grid: Path, full_report: Path, tmp_path: Path) -> None:
    with pytest.warns(SkippedRunWarning):
        again = write_report(full_grid, tmp_path / "again", n_boot=50)
    for path in full_report.parent.iterdir():
        assert (again.parent / path.name).read_bytes() == path.read_bytes(), path.name


def test_grid_without_mtp_and_with_single_seeds(tmp_path: Path) -> None:
    grid = write_grid(tmp_path / "g", widths=((1, 1), (2, 4), (2, 8)), seeds=(0,), mtp=False)
    report = write_report(grid, tmp_path / "out", n_boot=50)
    out = report.parent
    assert {"speedup_m2_n4.png", "speedup_m2_n8.png", "width_law.png"} <= {p.name for p in out.iterdir()}
    table = pd.read_csv(out / "speedups.csv")
    assert not [c for c in table.columns if "next2" in c]
    assert table["speedup_ntp_tokens_min"].isna().all()  # one seed: no seed range
    text = report.read_text()
    assert "next-2-token speedup" not in text and "next-token speedup" in text
    law = pd.read_csv(out / "width_law.csv")
    assert (law.loc[law["source"] == "measured", "loss"] == "ntp").all()
    assert "none: too few runs" in text  # two widths above r = 1, one run each: no interval


def test_grid_with_only_a_baseline(tmp_path: Path) -> None:
    grid = write_grid(tmp_path / "g", widths=((1, 1),), seeds=(0, 1))
    report = write_report(grid, n_boot=50)
    names = {p.name for p in report.parent.iterdir()}
    assert not [n for n in names if n.startswith("speedup_m")]
    assert {"loss_vs_tokens.png", "width_law.png", *TABLES} <= names
    text = report.read_text()
    assert "Too few widths above r = 1" in text and "_No speedups" in text
    assert pd.read_csv(report.parent / "width_law.csv")["source"].tolist() == ["paper"]


def test_swept_setting_gets_its_own_baseline_and_files(tmp_path: Path) -> None:
    grid = tmp_path / "g"
    write_grid(grid, widths=((1, 1), (2, 4)), seeds=(0,), mtp=True)
    write_grid(grid, widths=((1, 1), (2, 4)), seeds=(0,), mtp=False)
    report = write_report(grid, n_boot=20)
    names = {p.name for p in report.parent.iterdir()}
    assert {"speedup_m2_n4_mtp-False.png", "speedup_m2_n4_mtp-True.png", "width_law_mtp-True.png"} <= names
    table = pd.read_csv(report.parent / "speedups.csv")
    assert sorted(table["mtp"]) == [False] * 3 + [True] * 3
    assert table.loc[~table["mtp"], "speedup_next2_tokens"].isna().all()
    assert table.loc[table["mtp"], "speedup_next2_tokens"].notna().all()
    assert "## Results: mtp=False" in report.read_text()


def test_empty_grid_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "g").mkdir()
    with pytest.raises(ValueError, match="no readable run folders"):
        write_report(tmp_path / "g")


def test_analysis_never_imports_the_model_or_torch() -> None:
    code = ("import sys, analysis, analysis.report; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'harness', 'lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
