"""Tests against a real SLURM controller and node daemon on localhost (`bash scripts/slurm/up.sh`).

When no cluster answers, every test here skips with the reason (and up.sh's own failure message, if it
left one): run pytest with `-rs` to see it in the summary.
"""

from __future__ import annotations

import operator
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import submitit

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


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"],
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip()


def test_submitit_job_runs_and_is_accounted(slurm: None, tmp_path: Path) -> None:
    job = slurm_executor(tmp_path).submit(operator.add, 2, 3)  # job functions must be importable on the node
    assert job.result() == 5
    deadline = time.monotonic() + 30  # slurmdbd records the end of a job a moment after it happens
    while sacct_state(job.job_id) != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sacct_state(job.job_id) == "COMPLETED"


def test_cancelled_job_resolves(slurm: None, tmp_path: Path) -> None:
    job = slurm_executor(tmp_path).submit(time.sleep, 300)
    deadline = time.monotonic() + 60
    while job.state != "RUNNING":
        assert time.monotonic() < deadline, f"job {job.job_id} never started (state {job.state})"
        time.sleep(0.5)
    job.cancel()
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()
    assert sacct_state(job.job_id).startswith("CANCELLED")
