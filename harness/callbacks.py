"""Lightning callbacks that keep the run folder's contract: metrics.csv rows and an atomic last.ckpt."""

from __future__ import annotations

import csv
import os
import signal
import sys
import time
from pathlib import Path

import lightning as L
import torch

METRIC_COLUMNS = [
    "step", "tokens",
    "train/loss_ntp", "train/loss_next2", "val/loss_ntp", "val/loss_next2",
    "lr", "tokens_per_s", "grad_norm",
    "moe/aux_loss", "moe/balance_loss", "moe/z_loss", "moe/max_load",
]


class MetricsWriter(L.Callback):
    """Appends one row per `log_every` optimizer steps (training values) and one per evaluation
    (validation values) to metrics.csv. Columns are fixed (METRIC_COLUMNS); absent values stay empty.

    tokens_per_s counts only time spent in training batches (not evaluation or checkpointing), so it
    is comparable with `vwn bench`. On resume, rows beyond the restored step are dropped first, so the
    file reads as if the run had never stopped; an evaluation due at the restored step that never
    wrote its row (the checkpoint is written before the step's evaluation, and the process stopped in
    between) runs first."""

    def __init__(self, path: Path, log_every: int, val_every: int, tokens_per_step: int) -> None:
        self.path, self.log_every, self.val_every, self.tokens_per_step = path, log_every, val_every, tokens_per_step
        self.batch_started = 0.0
        self.train_seconds = 0.0  # since the last training row
        self.grad_norm: float | None = None
        self.last_val_step = -1
        self.last_train_step = -1

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        self._truncate_after(step)
        if step > 0 and step % self.val_every == 0 and self.last_val_step != step:
            self._evaluate(trainer, module)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(METRIC_COLUMNS)
            return
        with self.path.open(newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["step"]) <= step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        self.last_val_step = max((int(r["step"]) for r in rows if r["val/loss_ntp"]), default=-1)
        self.last_train_step = step

    def _append(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, METRIC_COLUMNS).writerow(row)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batch_started = time.perf_counter()

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if (trainer.global_step + 1) % self.log_every == 0:
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            self.grad_norm = torch.nn.utils.get_total_norm(grads).item()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.train_seconds += time.perf_counter() - self.batch_started
        step = trainer.global_step
        # with gradient accumulation this hook runs once per micro-batch; log each optimizer step once
        if not trainer.is_global_zero or step % self.log_every != 0 or step == self.last_train_step:
            return
        self.last_train_step = step
        values = {k: v.item() for k, v in module.step_values.items()}
        self._append({
            "step": step,
            "tokens": step * self.tokens_per_step,
            "train/loss_ntp": values["loss_ntp"],
            "train/loss_next2": values.get("loss_next2", ""),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "tokens_per_s": self.log_every * self.tokens_per_step / self.train_seconds,
            "grad_norm": self.grad_norm,
            "moe/aux_loss": values["aux_loss"],
            "moe/balance_loss": values.get("moe/balance_loss", ""),
            "moe/z_loss": values.get("moe/z_loss", ""),
            "moe/max_load": values.get("moe/max_load", ""),
        })
        self.train_seconds = 0.0

    def on_validation_epoch_end(self, trainer, module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.global_step == self.last_val_step:
            return
        self.last_val_step = trainer.global_step
        self._append({"step": trainer.global_step, "tokens": trainer.global_step * self.tokens_per_step}
                     | module.validation_means())

    def on_train_end(self, trainer, module) -> None:
        """Evaluate the final step too when the evaluation schedule did not end on it."""
        if trainer.global_step != self.last_val_step:
            self._evaluate(trainer, module)

    @torch.no_grad()
    def _evaluate(self, trainer, module) -> None:
        """One evaluation of the held-out set at the trainer's step, written like a scheduled one.

        NOTE: done here rather than with trainer.validate() so it also happens inside ddp_spawn
        workers, where the trainer's step is known."""
        module.eval()
        module.on_validation_epoch_start()
        for index, window in enumerate(trainer.datamodule.val_dataloader()):
            module.validation_step(window.to(module.device), index)
        module.train()
        self.on_validation_epoch_end(trainer, module)


class PeriodicCheckpoint(L.Callback):
    """Writes checkpoints/last.ckpt atomically every `every` optimizer steps and when the process is
    asked to stop (SIGTERM, SIGUSR1, SIGUSR2).

    On a signal the checkpoint is written at the next step boundary; then the handler that was
    installed before ours runs (e.g. submitit's, which requeues the job; for SIGTERM Lightning's,
    whose loop then raises SIGTERMException) or, if there was none, the process exits with code
    128 + signal number."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every = path, every
        self.pending_signal: int | None = None
        self.last_saved_step = -1
        self.previous_handlers: dict[int, object] = {}

    def on_train_end(self, trainer, module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)

    def _request(self, signum: int, frame) -> None:
        self.pending_signal = signum

    def save(self, trainer: L.Trainer) -> None:
        tmp = self.path.with_suffix(".tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self.last_saved_step = trainer.global_step

    def on_train_start(self, trainer, module) -> None:
        self.last_saved_step = trainer.global_step
        for sig in self.SIGNALS:
            self.previous_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._request)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # runs once per micro-batch under gradient accumulation: act once per optimizer step
        if step % self.every == 0 and step != self.last_saved_step:
            self.save(trainer)
        if self.pending_signal is not None:
            signum, self.pending_signal = self.pending_signal, None
            if step != self.last_saved_step:
                self.save(trainer)
            previous = self.previous_handlers.get(signum)
            print(f"received signal {signum}: checkpoint saved at step {trainer.global_step}", file=sys.stderr)
            if callable(previous):
                previous(signum, None)
            else:
                raise SystemExit(128 + signum)
