"""Run one RunConfig end to end into a run folder: Trainer, callbacks, resume, summary.

Run folder contract (results/<grid>/<run_id>/):
    config.yaml            the complete resolved RunConfig (reloadable with load_run_config)
    metrics.csv            one row per log step and per evaluation (columns: callbacks.METRIC_COLUMNS)
    checkpoints/last.ckpt  written atomically every train.checkpoint_every steps and on SIGTERM/SIGUSR1/2
    summary.json           written last and atomically; its presence marks the run finished
"""

from __future__ import annotations

import csv
import json
import os
import platform
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from harness.callbacks import MetricsWriter, PeriodicCheckpoint
from harness.config import ConfigError, RunConfig, dump_run_config, load_run_config
from harness.data import TokenDataModule, check_data_config, prepare_corpus
from harness.lit import DivergenceError, VWNModule
from harness.model import accounting, gemm


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def launched_rank() -> int:
    """This process's rank when a launcher started every DDP process itself (SLURM tasks); else 0.
    Only rank 0 writes config.yaml and summary.json."""
    return int(os.environ.get("SLURM_PROCID", "0"))


def claim_run_dir(config: RunConfig, run_dir: Path) -> None:
    """Create the run folder and write config.yaml, or check that an existing one holds this config."""
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    if launched_rank() != 0:
        return
    if config_path.exists():
        existing = load_run_config(config_path)
        if existing != config:
            raise ConfigError(f"{config_path}: holds run {existing.run_id()}, not {config.run_id()}; "
                              "use another --out folder")
        return
    dump_run_config(config, config_path)


def read_progress(metrics_path: Path) -> tuple[int, dict[str, float | None]]:
    """The last logged step of metrics.csv, and the last value of each of its loss columns.

    Read from the file rather than the trainer, whose state stays in the workers under ddp_spawn."""
    step, final = 0, dict.fromkeys(("train/loss_ntp", "train/loss_next2", "val/loss_ntp", "val/loss_next2"))
    if metrics_path.exists():
        with metrics_path.open(newline="") as f:
            for row in csv.DictReader(f):
                step = max(step, int(row["step"]))
                final.update({k: float(row[k]) for k in final if row.get(k)})
    return step, final


def build_trainer(config: RunConfig, run_dir: Path) -> L.Trainer:
    train = config.train
    metrics = MetricsWriter(run_dir / "metrics.csv", train.log_every, train.val_every, config.tokens_per_step)
    under_slurm = SLURMEnvironment.detect()
    strategy = "auto" if train.devices == 1 else ("ddp" if under_slurm else "ddp_spawn")
    trainer = L.Trainer(
        devices=train.devices,
        strategy=strategy,
        num_nodes=1,
        precision=train.precision,
        max_steps=config.max_steps,
        accumulate_grad_batches=train.grad_accum,
        gradient_clip_val=config.optim.grad_clip or None,
        val_check_interval=train.val_every * train.grad_accum,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
        callbacks=[metrics, PeriodicCheckpoint(run_dir / "checkpoints" / "last.ckpt", train.checkpoint_every)],
        # submitit owns requeueing on SLURM; Lightning must not install its own SIGUSR1 requeue handler
        plugins=[SLURMEnvironment(auto_requeue=False)] if under_slurm else None,
        default_root_dir=run_dir,
    )
    return trainer


def code_revision() -> str | None:
    """`git describe --always --dirty` of the checkout the harness runs from (None outside one), so a
    run folder tells which code trained it, local edits included."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                                   cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if described.returncode != 0:
        return None
    return described.stdout.strip() or None


def versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "vwn-harness": metadata.version("vwn-harness"),
        "code_revision": code_revision(),
        "cpu_gemm": gemm.backend(),  # the cross-entropy's GEMM library (harness.model.gemm)
    }


def run_training(config: RunConfig, run_dir: str | Path, *, threads: int | None = None) -> dict:
    """Train one run into run_dir, resuming from checkpoints/last.ckpt if present; return the summary.

    A diverged run (NaN/inf loss) returns a summary with status "diverged". Any other failure writes
    a summary with status "failed" and the error line, then re-raises. A stop by signal (preemption)
    writes no summary, so the run stays unfinished and resumes when started again."""
    run_dir = Path(run_dir)
    check_data_config(config.data, config.model.vocab_size)
    claim_run_dir(config, run_dir)
    # every training process (devices of them) gets an equal share of this process's threads
    threads_per_process = max(1, (threads or torch.get_num_threads()) // config.train.devices)
    torch.set_num_threads(threads_per_process)
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    started = time.time()
    summary = {
        "run_id": config.run_id(),
        "params": accounting.count_parameters(config.model),
        "flops_per_token": accounting.flops_per_token(config.model),
        "target_tokens": config.max_steps * config.tokens_per_step,
        "threads_per_process": threads_per_process,
        "versions": versions(),
        "error": None,
    }
    trainer = None
    try:
        module = VWNModule.from_run_config(config)
        module.threads = threads_per_process
        datamodule = TokenDataModule(config.data, config.model.vocab_size, config.model.seq_len,
                                     config.train.batch_size, config.train.seed)
        trainer = build_trainer(config, run_dir)
        trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint if checkpoint.exists() else None)
        # NOTE: under ddp_spawn the corpus was prepared in the workers; here it is a cached re-load.
        corpus = prepare_corpus(config.data, config.model.vocab_size)
        summary |= {"status": "done", "corpus_fingerprint": corpus.fingerprint, "tokenizer_id": corpus.tokenizer_id}
    except DivergenceError as error:
        summary |= {"status": "diverged", "error": f"diverged: {error}", "diverged_at_step": error.step}
    except Exception as error:
        summary |= {"status": "failed", "error": f"{type(error).__name__}: {error}".splitlines()[0]}
        raise
    finally:
        if "status" in summary and launched_rank() == 0:
            steps, final = read_progress(run_dir / "metrics.csv")
            if summary["status"] == "diverged":
                steps = summary["diverged_at_step"]
            summary |= {
                "steps": steps,
                "tokens": steps * config.tokens_per_step,
                "wall_time_s": round(module_wall_time(trainer) + time.time() - started, 3),
                "final": final,
            }
            write_json_atomic(run_dir / "summary.json", summary)
    return summary


def module_wall_time(trainer: L.Trainer | None) -> float:
    """Wall time of earlier attempts of this run, carried in the checkpoint it resumed from."""
    if trainer is None or trainer.lightning_module is None:
        return 0.0
    return trainer.lightning_module.earlier_wall_time


def train_from_cli(config_path: str | None, overrides: list[str], out: str | None) -> int:
    """`vwn train`: returns the process exit code; errors are one line on stderr."""
    try:
        config = load_run_config(config_path, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        check_data_config(config.data, config.model.vocab_size)
    except ConfigError as error:
        print(f"error: {config_path or '--set'}: {error}", file=sys.stderr)
        return 2
    stem = Path(config_path).stem if config_path else "single"
    run_dir = Path(out) if out else Path("results") / stem / config.run_id()
    print(f"run {config.run_id()} -> {run_dir} ({config.max_steps} steps, "
          f"{config.max_steps * config.tokens_per_step:,} tokens)", file=sys.stderr)
    try:
        summary = run_training(config, run_dir)
    except SIGTERMException:  # Lightning's own SIGTERM handler stops the loop with a SystemExit of code 0
        return 128 + signal.SIGTERM
    if summary["status"] != "done":
        print(f"error: run {summary['run_id']} {summary['error']}", file=sys.stderr)
        return 1
    final = summary["final"]
    next2 = final["val/loss_next2"]
    print(f"done: val/loss_ntp {final['val/loss_ntp']:.4f}"
          + (f", val/loss_next2 {next2:.4f}" if next2 is not None else "")
          + f" after {summary['tokens']:,} tokens in {summary['wall_time_s']:.0f} s", file=sys.stderr)
    return 0
