"""Launch a grid's runs through submitit, and report their state from the run folders alone.

Executors (`--cluster`):
    local   submitit's local executor: at most `max_parallel` runs at once, each run's processes given an
            equal share of this machine's cores as torch threads; `vwn submit` waits for the grid.
    slurm   one job array per grid (per distinct train.devices, which sets the tasks per node), throttled
            by `array_parallelism`; `vwn submit` returns once the arrays are queued.
    debug   in-process, one run after another, for tests and debugging.

Run states, read from `results/<grid>/<run_id>/`:
    done, failed, diverged   summary.json is present (the trainer writes it last)
    running                  a process holds the run's lock file (an flock taken for the whole training)
    pending                  otherwise: queued, not started yet, or stopped and resumable from last.ckpt
Resubmitting a grid skips finished runs (failed ones too, unless retried) and resumes every other run.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import fcntl
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from harness.config import ConfigError, RunConfig, from_dict, load_run_config, to_dict
from harness.grid import Grid, LauncherConfig, Run, format_value, load_grid
from harness.model.accounting import flops_per_token

STATES = ("pending", "running", "done", "failed", "diverged")
FINISHED = ("done", "failed", "diverged")
LOCK_FILE = ".lock"
Log = Callable[[str], None]


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


# ----------------------------------------------------------------------------- run lock


class RunBusyError(RuntimeError):
    """Another process is training this run."""


@contextmanager
def hold_run_lock(run_dir: Path, wait_s: float = 10.0) -> Iterator[None]:
    """Hold `run_dir`'s lock for the duration: the run reads as running, and no second process trains it.
    The kernel drops the lock when the process dies, so a killed run never looks alive."""
    run_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s  # status probes hold the lock (shared) for an instant
    with (run_dir / LOCK_FILE).open("a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RunBusyError(f"{run_dir}: another process is training this run") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_running(run_dir: Path) -> bool:
    try:
        lock = (run_dir / LOCK_FILE).open()
    except FileNotFoundError:
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
        return False


# ----------------------------------------------------------------------------- the job


class TrainJob(submitit.helpers.Checkpointable):
    """One run as a submitit job: `TrainJob()(config_dict, run_dir, threads)` trains it to completion
    (`threads`: the run's torch threads, which the trainer shares among its train.devices processes).

    On timeout or preemption submitit signals the job (USR2); the trainer saves checkpoints/last.ckpt at
    the next step and hands the signal back to submitit, which calls `checkpoint` (inherited: requeue this
    same call) and requeues the job; the requeued job resumes from last.ckpt."""

    def __call__(self, config: dict[str, Any], run_dir: str, threads: int | None = None) -> dict[str, Any]:
        # NOTE: imported here, on the worker: Lightning takes seconds to import and `vwn status` needs none of it
        from harness.train import run_training

        run_config, folder = from_dict(RunConfig, config), Path(run_dir)
        if int(os.environ.get("SLURM_PROCID", "0")) != 0:  # DDP peers under SLURM: rank 0 owns the lock
            return run_training(run_config, folder, threads=threads)
        with hold_run_lock(folder):
            summary = folder / "summary.json"
            if summary.exists():  # finished meanwhile by a duplicate submission
                return json.loads(summary.read_text())
            return run_training(run_config, folder, threads=threads)


# ----------------------------------------------------------------------------- reading run folders


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    state: str  # one of STATES
    tokens: int  # tokens trained so far
    target_tokens: int | None  # None when config.yaml cannot be read
    train_loss: float | None  # latest train/loss_ntp
    error: str | None  # the run's last error line
    config: dict[str, Any]  # the resolved config, flattened to dotted keys ({} when unreadable)


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'d_model': 64}} -> {'model.d_model': 64}."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _progress(metrics_path: Path) -> tuple[int, float | None]:
    """Tokens of the last row of metrics.csv and the latest train loss; tolerant of a half-written row."""
    tokens, loss = 0, None
    if not metrics_path.exists():
        return tokens, loss
    with metrics_path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                tokens = int(row["tokens"])
                loss = float(row["train/loss_ntp"]) if row.get("train/loss_ntp") else loss
            except (TypeError, ValueError):
                continue
    return tokens, loss


def read_run(run_dir: Path) -> RunStatus:
    """The state of one run folder, from its files alone."""
    config: dict[str, Any] = {}
    target = error = None
    try:
        run_config = load_run_config(run_dir / "config.yaml")
        config, target = flatten(to_dict(run_config)), run_config.max_steps * run_config.tokens_per_step
    except ConfigError as problem:
        error = str(problem)
    tokens, loss = _progress(run_dir / "metrics.csv")
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text())
            state, tokens, error = summary["status"], summary.get("tokens", tokens), summary.get("error") or error
        except (ValueError, KeyError) as problem:
            state, error = "failed", f"{summary_path}: unreadable ({problem})"
    else:
        state = "running" if is_running(run_dir) else "pending"
    return RunStatus(run_dir.name, state, tokens, target, loss, error, config)


def run_dirs(grid_dir: Path) -> list[Path]:
    """Every run folder of a grid: the sub-folders holding a config.yaml."""
    return sorted(path.parent for path in grid_dir.glob("*/config.yaml"))


def varying_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Dotted keys whose values differ between runs: what was swept, recovered from the folders alone."""
    if not configs:
        return []
    return [key for key in configs[0] if any(c.get(key) != configs[0][key] for c in configs[1:])]


# ----------------------------------------------------------------------------- tables


def si(number: float) -> str:
    """12_345_678 -> '12.3M'; numbers under a thousand stay as they are."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= factor:
            return f"{number / factor:.1f}{suffix}"
    return f"{number:g}"


def render_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in [header, ["-" * width for width in widths], *rows]]
    return "\n".join(lines)


def count_states(states: Iterable[str]) -> str:
    """['done', 'failed', 'done'] -> '2 done, 1 failed' (in the order of STATES)."""
    counts = collections.Counter(states)
    return ", ".join(f"{counts[state]} {state}" for state in STATES if counts[state])


def _natural(text: str) -> list[Any]:
    """Sort key that orders embedded numbers numerically: '[1,2]' before '[1,16]'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def dry_run_table(grid: Grid, grid_dir: Path) -> str:
    """One row per run of the grid: id, swept values, tokens, forward FLOPs per token, current state."""
    rows = []
    for run in grid.runs:
        run_dir = grid_dir / run.run_id
        state = read_run(run_dir).state if (run_dir / "config.yaml").exists() else "pending"
        rows.append([run.run_id, *(format_value(v) for v in run.label.values()),
                     si(run.config.max_steps * run.config.tokens_per_step),
                     si(flops_per_token(run.config.model)["total"]), state])
    totals = f"{len(rows)} runs in {grid_dir}: {count_states(row[-1] for row in rows)}"
    return render_table(["id", *grid.columns, "tokens", "FLOPs/token", "state"], rows) + "\n" + totals


def status_table(statuses: list[RunStatus]) -> str:
    """One row per run: id, swept values, state, tokens done/target, latest train loss, last error line."""
    keys = varying_keys([s.config for s in statuses])

    def cells(status: RunStatus) -> list[str]:
        target = si(status.target_tokens) if status.target_tokens is not None else "?"
        loss = f"{status.train_loss:.4f}" if status.train_loss is not None else "-"
        error = status.error.splitlines()[0][:120] if status.error else ""
        return [status.run_id, *(format_value(status.config.get(k, "?")) for k in keys), status.state,
                f"{si(status.tokens)}/{target}", loss, error]

    rows = sorted((cells(s) for s in statuses), key=lambda row: [_natural(c) for c in row[1:len(keys) + 1]])
    done = sum(s.tokens for s in statuses)
    target = sum(s.target_tokens or 0 for s in statuses)
    totals = f"{len(statuses)} runs: {count_states(s.state for s in statuses)}; tokens {si(done)}/{si(target)}"
    return render_table(["id", *keys, "state", "tokens", "train loss", "error"], rows) + "\n" + totals


# ----------------------------------------------------------------------------- submission


@dataclass
class Launch:
    """What `submit_grid` did: the runs it started (with their submitit jobs) and the runs it skipped."""

    grid_dir: Path
    cluster: str
    started: list[Run]
    jobs: list[submitit.Job]  # one per started run, in the same order
    skipped: dict[str, str]  # run id -> the state that made it skip


def slurm_parameters(launcher: LauncherConfig, name: str, devices: int) -> dict[str, Any]:
    """submitit AutoExecutor parameters for one job array whose runs use `devices` processes each."""
    parameters: dict[str, Any] = {
        "name": name,
        "timeout_min": launcher.timeout_min,
        "nodes": 1,
        "tasks_per_node": devices,  # Lightning's SLURMEnvironment wires these tasks into one DDP group
        "cpus_per_task": launcher.cpus_per_task,
        "slurm_array_parallelism": launcher.array_parallelism,
        "slurm_additional_parameters": dict(launcher.sbatch),
    }
    optional = {"slurm_partition": launcher.partition, "gpus_per_node": launcher.gpus_per_node,
                "mem_gb": launcher.mem_gb, "slurm_account": launcher.account, "slurm_qos": launcher.qos}
    return parameters | {key: value for key, value in optional.items() if value}


def make_executor(cluster: str, folder: Path, launcher: LauncherConfig) -> submitit.AutoExecutor:
    """An executor whose jobs are requeued (and resume from last.ckpt) after up to `max_requeues` timeouts."""
    return submitit.AutoExecutor(folder, cluster=cluster, slurm_max_num_timeout=launcher.max_requeues,
                                 local_max_num_timeout=launcher.max_requeues)


def local_share(max_parallel: int, n_runs: int, devices: int, cores: int) -> tuple[int, int]:
    """(runs at once, torch threads per run): never more runs at once than `max_parallel`, than runs to
    do, or than the cores can give each of a run's `devices` processes; the cores are split evenly."""
    parallel = max(1, min(max_parallel, n_runs, cores // devices))
    return parallel, max(1, cores // parallel)


def select_runs(grid: Grid, grid_dir: Path, retry_failed: bool) -> tuple[list[Run], dict[str, str]]:
    """Split the grid into runs to launch (new, pending, and failed when retried) and runs to skip."""
    todo, skipped = [], {}
    for run in grid.runs:
        run_dir = grid_dir / run.run_id
        state = read_run(run_dir).state if run_dir.exists() else "pending"
        if state == "pending" or (state == "failed" and retry_failed):
            todo.append(run)
        else:
            skipped[run.run_id] = state
    return todo, skipped


def _prepare(grid: Grid, runs: list[Run], grid_dir: Path) -> None:
    """Check every run's data settings, then write each run folder's config.yaml (so status lists it)."""
    from harness.data import check_data_config  # NOTE: imports Lightning; only submission needs it
    from harness.train import claim_run_dir

    for run in runs:
        try:
            check_data_config(run.config.data, run.config.model.vocab_size)
        except ConfigError as error:
            raise ConfigError(f"{grid.path}: run {run.describe()}: {error}") from None
    for run in runs:
        (grid_dir / run.run_id / "summary.json").unlink(missing_ok=True)  # a retried failure
        claim_run_dir(run.config, grid_dir / run.run_id)


def _report_end(run: Run, run_dir: Path, job_error: BaseException | None, log: Log) -> None:
    status = read_run(run_dir)
    detail = status.error or (str(job_error).strip().splitlines()[-1] if job_error else "")
    log(f"{status.state:<8} {run.run_id}  {run.describe()}" + (f"  ({detail})" if detail else ""))


def _run_debug(executor: submitit.AutoExecutor, runs: list[Run], grid_dir: Path, log: Log) -> list[submitit.Job]:
    jobs = []
    for run in runs:
        log(f"started  {run.run_id}  {run.describe()}")
        job = executor.submit(TrainJob(), to_dict(run.config), str(grid_dir / run.run_id), available_cores())
        # runs the job in this process; unlike job.result() it never opens pdb on a failure
        _report_end(run, grid_dir / run.run_id, job.exception(), log)
        jobs.append(job)
    return jobs


def _run_local(executor: submitit.AutoExecutor, runs: list[Run], grid_dir: Path, max_parallel: int,
               log: Log, poll_s: float) -> list[submitit.Job]:
    devices = max(run.config.train.devices for run in runs)
    parallel, threads = local_share(max_parallel, len(runs), devices, available_cores())
    log(f"local: {parallel} run(s) at once, {threads} thread(s) each on {available_cores()} cores")
    queue, active, jobs = collections.deque(runs), [], []
    while queue or active:
        while queue and len(active) < parallel:
            run = queue.popleft()
            job = executor.submit(TrainJob(), to_dict(run.config), str(grid_dir / run.run_id), threads)
            log(f"started  {run.run_id}  {run.describe()}")
            active.append((run, job))
            jobs.append(job)
        for run, job in [(run, job) for run, job in active if job.done()]:
            active.remove((run, job))
            _report_end(run, grid_dir / run.run_id, job.exception(), log)
        if active:
            time.sleep(poll_s)
    return jobs


def _submit_slurm(grid: Grid, launcher: LauncherConfig, runs: list[Run], grid_dir: Path, folder: Path,
                  log: Log) -> list[submitit.Job]:
    by_devices: dict[int, list[Run]] = collections.defaultdict(list)
    for run in runs:
        by_devices[run.config.train.devices].append(run)
    jobs_of: dict[str, submitit.Job] = {}
    for devices, group in by_devices.items():
        executor = make_executor("slurm", folder, launcher)
        executor.update_parameters(**slurm_parameters(launcher, grid.name, devices))
        threads = [launcher.cpus_per_task * devices] * len(group)  # the trainer splits them among the tasks
        jobs = executor.map_array(TrainJob(), [to_dict(r.config) for r in group],
                                  [str(grid_dir / r.run_id) for r in group], threads)
        log(f"slurm: array {jobs[0].job_id.split('_')[0]} queued: {len(group)} run(s) of {devices} task(s), "
            f"at most {launcher.array_parallelism} at once")
        jobs_of |= {run.run_id: job for run, job in zip(group, jobs, strict=True)}
    return [jobs_of[run.run_id] for run in runs]


def submit_grid(grid: Grid, results: Path, *, cluster: str | None = None, max_parallel: int | None = None,
                retry_failed: bool = False, log: Log = log_stderr, poll_s: float = 1.0) -> Launch:
    """Launch the runs of `grid` that are not finished into `results/<grid.name>/`.

    `cluster` and `max_parallel` override the grid's launcher (`max_parallel` sets `array_parallelism` on
    SLURM). Local and debug runs are waited for; SLURM arrays are only queued. Raises ConfigError, before
    anything starts, if any run's settings are wrong."""
    cluster = cluster or grid.launcher.cluster
    launcher = grid.launcher
    if max_parallel is not None:
        key = "array_parallelism" if cluster == "slurm" else "max_parallel"
        launcher = dataclasses.replace(launcher, **{key: max_parallel})
    grid_dir = (results / grid.name).resolve()
    runs, skipped = select_runs(grid, grid_dir, retry_failed)
    _prepare(grid, runs, grid_dir)
    if skipped:
        log(f"skipping {len(skipped)} run(s): {count_states(skipped.values())}")
    if not runs:
        return Launch(grid_dir, cluster, [], [], skipped)
    # a fresh folder per submission: SLURM job ids restart when a cluster's state is reset
    folder = grid_dir / "submitit" / time.strftime("%Y%m%d-%H%M%S") / "%j"
    if cluster == "slurm":
        jobs = _submit_slurm(grid, launcher, runs, grid_dir, folder, log)
    else:
        executor = make_executor(cluster, folder, launcher)
        executor.update_parameters(timeout_min=launcher.timeout_min)
        jobs = (_run_debug(executor, runs, grid_dir, log) if cluster == "debug"
                else _run_local(executor, runs, grid_dir, launcher.max_parallel, log, poll_s))
    return Launch(grid_dir, cluster, runs, jobs, skipped)


# ----------------------------------------------------------------------------- CLI entry points


def submit_command(grid_file: str, *, cluster: str | None = None, dry_run: bool = False,
                   max_parallel: int | None = None, retry_failed: bool = False,
                   overrides: list[str] | None = None, results: str = "results") -> int:
    """`vwn submit`: returns the exit code (0 ok, 1 a run failed, 2 a config error, printed as one line)."""
    try:
        grid = load_grid(grid_file, overrides)
        grid_dir = Path(results) / grid.name
        if dry_run:
            print(dry_run_table(grid, grid_dir))
            return 0
        launch = submit_grid(grid, Path(results), cluster=cluster, max_parallel=max_parallel,
                             retry_failed=retry_failed)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if launch.cluster == "slurm":
        if launch.started:
            log_stderr(f"watch it with: vwn status {grid_dir} --watch")
        return 0
    statuses = [read_run(path) for path in run_dirs(launch.grid_dir)]
    print(status_table(statuses))
    started = {run.run_id for run in launch.started}
    return 1 if any(s.state == "failed" and s.run_id in started for s in statuses) else 0


def status_command(grid_dir: str, *, watch: bool = False, interval_s: float = 10.0) -> int:
    """`vwn status`: print the grid's table (with `watch`, redraw until every run is finished)."""
    folder = Path(grid_dir)
    while True:
        statuses = [read_run(path) for path in run_dirs(folder)]
        if not statuses:
            print(f"error: {folder}: no run folders (sub-folders with a config.yaml)", file=sys.stderr)
            return 2
        if watch and sys.stdout.isatty():
            print("\033[2J\033[H", end="")  # clear the screen
        print(status_table(statuses), flush=True)
        if not watch or all(s.state in FINISHED for s in statuses):
            return 0
        time.sleep(interval_s)
