"""Real Lightning training of tiny models into real run folders: contract, exact resume, divergence, errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch._dynamo.utils
import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException
from test_launch import corpus_text

import harness.train
from harness.config import load_run_config
from harness.train import build_trainer, run_training

pytestmark = pytest.mark.integration

LOSS_COLUMNS = ["train/loss_ntp", "train/loss_next2", "val/loss_ntp", "val/loss_next2"]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> tuple[Path, Path]:
    """A small real-text corpus (`corpus_text`) and a private cache folder."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "text.txt").write_text(corpus_text())
    return root / "text.txt", root / "cache"


def tiny_config_file(tmp_path: Path, tiny_corpus, **sections) -> Path:
    corpus, cache = tiny_corpus
    config = {
        "model": {"vocab_size": 512, "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32,
                  "n_experts": 4, "top_k": 2, "d_ff": 32, "virtual_width": [2, 4], "mtp": True},
        "data": {"corpus": str(corpus), "cache_dir": str(cache), "val_tokens": 512, "val_fraction": 0.1},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"tokens": 40 * 8 * 32, "batch_size": 8, "log_every": 2, "val_every": 10, "checkpoint_every": 5},
    }
    for section, values in sections.items():
        config[section] |= values
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_metrics(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def losses_by_step(rows: list[dict[str, str]]) -> dict[tuple[int, str], float]:
    return {(int(r["step"]), k): float(r[k]) for r in rows for k in LOSS_COLUMNS if r[k]}


def vwn(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=cwd, stderr=subprocess.PIPE,
                            text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_tiny_run_fills_the_run_folder_and_learns(tmp_path, tiny_corpus):
    config = load_run_config(tiny_config_file(tmp_path, tiny_corpus))
    run_dir = tmp_path / "run"
    summary = run_training(config, run_dir, threads=1)

    assert summary["status"] == "done"
    assert load_run_config(run_dir / "config.yaml") == config
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_size > 0
    rows = read_metrics(run_dir / "metrics.csv")
    train_rows = [r for r in rows if r["train/loss_ntp"]]
    val_rows = [r for r in rows if r["val/loss_ntp"]]
    assert [int(r["step"]) for r in train_rows] == list(range(2, 41, 2))
    assert [int(r["step"]) for r in val_rows] == [10, 20, 30, 40]
    assert all(int(r["tokens"]) == int(r["step"]) * 8 * 32 for r in rows)
    assert all(float(r["tokens_per_s"]) > 0 and r["train/loss_next2"] and r["moe/max_load"] for r in train_rows)
    assert float(val_rows[-1]["val/loss_ntp"]) < float(train_rows[0]["train/loss_ntp"]) - 1.0
    assert float(val_rows[-1]["val/loss_next2"]) < float(train_rows[0]["train/loss_next2"]) - 0.5
    assert summary["steps"] == 40 and summary["tokens"] == 40 * 8 * 32
    assert summary["final"]["val/loss_ntp"] == float(val_rows[-1]["val/loss_ntp"])
    assert summary["params"]["total"] > 0 and summary["flops_per_token"]["ghc"] > 0
    assert len(summary["corpus_fingerprint"]) >= 16
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                          capture_output=True, text=True, check=True).stdout.strip()
    assert summary["versions"]["code_revision"].startswith(head)  # the commit that trained it, "-dirty" if edited


def test_run_without_mtp_leaves_next2_empty(tmp_path, tiny_corpus):
    path = tiny_config_file(tmp_path, tiny_corpus, model={"mtp": False, "virtual_width": [1, 1]},
                            train={"tokens": 10 * 8 * 32, "val_every": 5})
    summary = run_training(load_run_config(path), tmp_path / "run", threads=1)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert summary["final"]["val/loss_next2"] is None
    assert not any(r["train/loss_next2"] or r["val/loss_next2"] for r in rows)


def test_compiled_run_follows_the_eager_run(tmp_path, tiny_corpus):
    steps = {"tokens": 10 * 8 * 32, "val_every": 10, "log_every": 2}
    runs = {}
    torch._dynamo.utils.counters.clear()
    for compile in (False, True):
        folder = tmp_path / f"compile_{compile}"
        folder.mkdir()
        path = tiny_config_file(folder, tiny_corpus, train=steps | {"compile": compile})
        runs[compile] = run_training(load_run_config(path), tmp_path / f"run_{compile}", threads=1)
        assert runs[compile]["status"] == "done"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the model really ran compiled
    breaks = torch._dynamo.utils.counters["graph_break"]  # MoE dispatch included: the losses are the only break
    assert all("linear_cross_entropy" in reason for reason in breaks), list(breaks)
    eager, compiled = (losses_by_step(read_metrics(tmp_path / f"run_{c}" / "metrics.csv")) for c in (False, True))
    assert compiled.keys() == eager.keys()
    for key, value in eager.items():  # fused kernels may round differently; the trajectory is the same
        assert compiled[key] == pytest.approx(value, abs=2e-3), key


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_losses(tmp_path, tiny_corpus, sig):
    config_path = tiny_config_file(tmp_path, tiny_corpus)
    reference = vwn("train", str(config_path), "--out", str(tmp_path / "reference"), cwd=tmp_path)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    interrupted = tmp_path / "interrupted"
    first = vwn("train", str(config_path), "--out", str(interrupted), cwd=tmp_path)
    metrics = interrupted / "metrics.csv"
    deadline = time.time() + 240
    while time.time() < deadline:  # stop it between the checkpoint at step 15 and the one at step 20
        if metrics.exists() and any(int(r["step"]) >= 16 for r in read_metrics(metrics)):
            break
        time.sleep(0.05)
    first.send_signal(sig)
    assert first.wait(timeout=60) == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig)
    assert not (interrupted / "summary.json").exists()
    stopped_at = max(int(r["step"]) for r in read_metrics(metrics))
    assert stopped_at < 40

    second = vwn("train", str(config_path), "--out", str(interrupted), cwd=tmp_path)
    assert second.wait(timeout=300) == 0, second.stderr.read()
    expected = losses_by_step(read_metrics(tmp_path / "reference" / "metrics.csv"))
    resumed = losses_by_step(read_metrics(metrics))
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        assert resumed[key] == pytest.approx(value, abs=1e-6), key


class SignalDuringStep(L.Callback):
    """Sends this process `sig` while the optimizer step that ends at `step` runs."""

    def __init__(self, step: int, sig: int) -> None:
        self.step, self.sig = step, sig

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), self.sig)


def test_stop_at_a_checkpoint_step_that_also_evaluates_resumes_with_its_evaluation(tmp_path, tiny_corpus, monkeypatch):
    """Step 20 writes its checkpoint before its evaluation; stopped in between, the resume evaluates it."""
    config = load_run_config(tiny_config_file(tmp_path, tiny_corpus))
    reference = run_training(config, tmp_path / "reference", threads=1)
    stop = 20
    assert stop % config.train.checkpoint_every == 0 and stop % config.train.val_every == 0

    def build_stopping_trainer(*args):
        trainer = build_trainer(*args)
        trainer.callbacks.insert(0, SignalDuringStep(stop, signal.SIGTERM))
        return trainer

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(harness.train, "build_trainer", build_stopping_trainer)
        with pytest.raises(SIGTERMException):
            run_training(config, interrupted, threads=1)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer's handler did not outlive it
    assert torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == stop
    assert max(int(r["step"]) for r in read_metrics(interrupted / "metrics.csv") if r["val/loss_ntp"]) < stop

    resumed = run_training(config, interrupted, threads=1)
    assert resumed["status"] == reference["status"] == "done"
    expected = losses_by_step(read_metrics(tmp_path / "reference" / "metrics.csv"))
    got = losses_by_step(read_metrics(interrupted / "metrics.csv"))
    assert (stop, "val/loss_ntp") in got
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_divergence_stops_with_a_diverged_summary(tmp_path, tiny_corpus):
    path = tiny_config_file(tmp_path, tiny_corpus, optim={"lr": 1e30, "warmup_steps": 0, "grad_clip": 0.0})
    process = vwn("train", str(path), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert process.wait(timeout=300) == 1
    error_lines = [line for line in process.stderr.read().splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "diverged" in error_lines[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_at_step"] < 40


@pytest.mark.parametrize("override, message", [
    ("model.d_modle=64", "model.d_modle: unknown key; did you mean 'model.d_model'?"),
    ("model.virtual_width=[3,6]", "model.virtual_width: m must divide d_model=32"),
    ("optim.schedule=linear", "optim.schedule: expected one of 'constant', 'cosine'"),
    ("data.corpus=/no/such/corpus.txt", "data.corpus"),
])
def test_bad_config_fails_before_any_work(tmp_path, tiny_corpus, override, message):
    path = tiny_config_file(tmp_path, tiny_corpus)
    process = vwn("train", str(path), "--set", override, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert process.wait(timeout=120) == 2
    stderr = process.stderr.read()
    assert message in stderr and str(path) in stderr
    assert not (tmp_path / "run").exists()


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, tiny_corpus):
    """devices: 2 splits each global batch between two gloo workers; the trajectory stays that of one
    process with twice the batch. NOTE: measured gaps of up to 0.042 nats after 20 steps (also with the
    balancing terms off) are not yet explained; the tolerance guards against gross errors (a rank training
    on the wrong shard or not at all), not against that drift."""
    steps = {"tokens": 20 * 8 * 32, "val_every": 10, "log_every": 5}
    # the balancing terms are per-rank batch statistics, so they are switched off to compare trajectories
    model = {"balance_loss_weight": 0.0, "z_loss_weight": 0.0}
    single = run_training(load_run_config(tiny_config_file(tmp_path, tiny_corpus, train=steps, model=model)),
                          tmp_path / "single", threads=1)
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    two = load_run_config(tiny_config_file(ddp_dir, tiny_corpus, model=model,
                                           train=steps | {"batch_size": 4, "devices": 2}))
    summary = run_training(two, tmp_path / "ddp_run", threads=2)
    assert summary["status"] == "done" and summary["steps"] == single["steps"] == 20
    assert summary["threads_per_process"] == 1
    for key in ("val/loss_ntp", "val/loss_next2"):
        assert summary["final"][key] == pytest.approx(single["final"][key], abs=0.1)
