"""Tests against a real SLURM controller and node daemon on localhost (`bash scripts/slurm/up.sh`).

When no cluster answers, every test here skips with the reason (and up.sh's own failure message, if it
left one): run pytest with `-rs` to see it in the summary.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import submitit
import yaml
from test_launch import metric_rows, text_corpus, tiny_grid, write_grid

from harness.config import load_run_config
from harness.grid import load_grid
from harness.launch import Launch, read_run, status_command, submit_grid

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

STATE_DIR = Path(os.environ.get("VWN_SLURM_DIR", "/var/lib/vwn-slurm"))
READY_STATES = {"idle", "mixed", "allocated", "completing"}


def cluster_problem() -> str | None:
    """Why the localhost cluster cannot be used, or None when a node is up."""
    hint = "start it with `bash scripts/slurm/up.sh` (as root)"
    error_file = STATE_DIR / "up.error"
    if error_file.is_file():
        hint = f"scripts/slurm/up.sh failed: {error_file.read_text().strip()}"
    if shutil.which("sinfo") is None:
        return f"no SLURM client (sinfo) on this machine; {hint}"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"sinfo timed out; {hint}"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()}; {hint}"
    states = set(out.stdout.split())
    if not states & READY_STATES:
        return f"no usable SLURM node (states: {sorted(states) or 'none'}); {hint}"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    """A live localhost cluster; skips (with the reason) when there is none."""
    config = STATE_DIR / "etc" / "slurm.conf"
    if "SLURM_CONF" not in os.environ and config.is_file():
        os.environ["SLURM_CONF"] = str(config)
    problem = cluster_problem()
    if problem:
        pytest.skip(f"SLURM tests skipped: {problem}")


def slurm_executor(folder: Path) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=1)
    return executor


def sacct_states(job_id: str) -> list[str]:
    """Every state the job went through (one per requeue), from the accounting database."""
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", "State"],
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.splitlines()


def wait_for_sacct(job_id: str, final_state: str, timeout_s: float = 30) -> list[str]:
    """slurmdbd records the end of a job a moment after it happens."""
    deadline = time.monotonic() + timeout_s
    while (sacct_states(job_id) or [""])[-1] != final_state:
        assert time.monotonic() < deadline, f"job {job_id}: {sacct_states(job_id)}, never {final_state}"
        time.sleep(0.5)
    return sacct_states(job_id)


def test_submitit_job_runs_and_is_accounted(slurm: None, tmp_path: Path) -> None:
    job = slurm_executor(tmp_path).submit(operator.add, 2, 3)  # job functions must be importable on the node
    assert job.result() == 5
    assert wait_for_sacct(job.job_id, "COMPLETED") == ["COMPLETED"]


def test_cancelled_job_resolves(slurm: None, tmp_path: Path) -> None:
    job = slurm_executor(tmp_path).submit(time.sleep, 300)
    deadline = time.monotonic() + 60
    while job.state != "RUNNING":
        assert time.monotonic() < deadline, f"job {job.job_id} never started (state {job.state})"
        time.sleep(0.5)
    job.cancel()
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()
    assert wait_for_sacct(job.job_id, f"CANCELLED by {os.getuid()}") == [f"CANCELLED by {os.getuid()}"]


# ----------------------------------------------------------------------------- grids on the cluster


def submit(grid_file: Path, results: Path) -> Launch:
    launch = submit_grid(load_grid(grid_file), results, cluster="slurm", log=lambda _: None)
    assert launch.cluster == "slurm" and len(launch.jobs) == len(launch.started)
    return launch


def wait_for_step(run_dir: Path, step: int, job: submitit.Job, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(int(r["step"]) >= step for r in metric_rows(run_dir)):
        assert time.monotonic() < deadline, f"{run_dir} never reached step {step} (job state {job.state})"
        time.sleep(0.05)


def final_losses(run_dir: Path) -> dict[str, float | None]:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == STEPS
    return summary["final"]


STEPS = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    return text_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(slurm: None, tmp_path_factory, corpus) -> dict[str, Any]:
    """A 2-run grid (seeds 0 and 1) run to completion as one job array; seed 0 is the uninterrupted
    reference for the interrupted runs below."""
    root = tmp_path_factory.mktemp("reference")
    grid_file = tiny_grid(root / "reference.yaml", corpus, steps=STEPS, sweep={"train.seed": [0, 1]})
    launch = submit(grid_file, root / "results")
    for job in launch.jobs:
        job.result()
    return {"launch": launch, "grid_file": grid_file}


def test_grid_runs_as_one_job_array_and_fills_both_run_folders(reference):
    launch = reference["launch"]
    array_id = launch.jobs[0].job_id.split("_")[0]
    assert [job.job_id for job in launch.jobs] == [f"{array_id}_0", f"{array_id}_1"]
    for run in launch.started:
        run_dir = launch.grid_dir / run.run_id
        assert load_run_config(run_dir / "config.yaml") == run.config
        assert (run_dir / "checkpoints" / "last.ckpt").stat().st_size > 0
        assert max(int(r["step"]) for r in metric_rows(run_dir)) == STEPS
        assert final_losses(run_dir)["val/loss_ntp"] is not None
        assert read_run(run_dir).state == "done"


def interrupted_copy(reference: dict[str, Any], name: str) -> Path:
    """The reference grid's seed-0 run under another grid name (same config, so the same run id)."""
    spec = yaml.safe_load(reference["grid_file"].read_text())
    path = reference["grid_file"].parent / f"{name}.yaml"
    return write_grid(path, spec | {"name": name, "sweep": {"train.seed": [0]}})


def reference_losses(reference: dict[str, Any], run_id: str) -> dict[str, float | None]:
    return final_losses(reference["launch"].grid_dir / run_id)


def step_daemons_alive(job_id: str) -> bool:
    """Whether any slurmstepd of the job still runs on this (the only) node: they title themselves
    "slurmstepd: [<job>.<step>]"."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"slurmstepd: [{job_id}.".encode() in cmdline.read_bytes():
                return True
        except OSError:  # the process ended meanwhile
            continue
    return False


def release_requeued(job_id: str, timeout_s: float = 60) -> None:
    """SLURM holds a requeued job for a fixed 120 s before it may start again; lift the hold once the first
    attempt's step daemons have exited. (Lifted while the first attempt's srun was still terminating, the
    second attempt started under the same job id and was killed at once, state FAILED, on 2026-11-30.)"""
    deadline = time.monotonic() + timeout_s
    while subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True,
                         text=True).stdout.strip() != "PENDING BeginTime" or step_daemons_alive(job_id):
        assert time.monotonic() < deadline, f"job {job_id} was not requeued, or its first attempt never ended"
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def test_preempted_run_is_requeued_and_finishes_like_an_uninterrupted_one(reference):
    grid_file = interrupted_copy(reference, "preempted")
    launch = submit(grid_file, grid_file.parent / "results")
    (run,), (job,) = launch.started, launch.jobs
    run_dir = launch.grid_dir / run.run_id
    wait_for_step(run_dir, 40, job)
    # what SLURM sends before a preemption or the time limit: submitit checkpoints and requeues
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    release_requeued(job.job_id)
    job.result()
    assert "checkpoint saved at step" in job.stderr()
    assert wait_for_sacct(job.job_id, "COMPLETED") == ["REQUEUED", "COMPLETED"]
    assert final_losses(run_dir) == reference_losses(reference, run.run_id)


def test_cancelled_run_resumes_on_resubmit_and_finishes_like_an_uninterrupted_one(reference):
    grid_file = interrupted_copy(reference, "cancelled")
    launch = submit(grid_file, grid_file.parent / "results")
    (run,), (job,) = launch.started, launch.jobs
    run_dir = launch.grid_dir / run.run_id
    wait_for_step(run_dir, 40, job)
    job.cancel()
    deadline = time.monotonic() + 60
    while read_run(run_dir).state != "pending":
        assert time.monotonic() < deadline, f"cancelled job {job.job_id} still {read_run(run_dir).state}"
        time.sleep(0.2)
    wait_for_sacct(job.job_id, f"CANCELLED by {os.getuid()}")
    stopped_at = read_run(run_dir).tokens // (8 * 32)
    assert 40 <= stopped_at < STEPS and (run_dir / "checkpoints" / "last.ckpt").exists()

    again = submit(grid_file, grid_file.parent / "results")
    assert [r.run_id for r in again.started] == [run.run_id]
    again.jobs[0].result()
    assert final_losses(run_dir) == reference_losses(reference, run.run_id)


def test_status_reports_a_failed_run_with_its_error(slurm: None, tmp_path, corpus, capsys):
    (tmp_path / "short.txt").write_text("too short\n")
    grid_file = tiny_grid(tmp_path / "mixed.yaml", corpus, steps=20,
                          variants={"good": None, "bad": {"data.corpus": str(tmp_path / "short.txt")}})
    launch = submit(grid_file, tmp_path / "results")
    for job in launch.jobs:
        job.exception()  # wait, whatever the outcome
    assert status_command(str(launch.grid_dir)) == 0
    lines = capsys.readouterr().out.splitlines()
    bad, good = (next(line for line in lines if str(tmp_path / "short.txt") in line),
                 next(line for line in lines if corpus["corpus"] in line))
    assert " failed " in bad and "ConfigError: model.seq_len: the training split" in bad
    assert " done " in good
    assert lines[-1].startswith("2 runs: 1 done, 1 failed")


def test_two_process_run_is_one_ddp_group_of_slurm_tasks(slurm: None, tmp_path, corpus):
    grid_file = tiny_grid(tmp_path / "ddp.yaml", corpus, steps=40, sweep={"train.devices": [2]})
    launch = submit(grid_file, tmp_path / "results")
    (run,), (job,) = launch.started, launch.jobs
    assert [result["status"] for result in job.results()] == ["done", "done"]  # one result per task
    # two tasks of one job, each a rank of the DDP group, each sampling its own batches: half the steps
    assert "MEMBER: 2/2" in job.stderr() and "MEMBER: 1/2" in job.stderr()
    summary = json.loads((launch.grid_dir / run.run_id / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 20 and summary["tokens"] == 40 * 8 * 32
