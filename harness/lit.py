"""LightningModule: losses, optimiser parameter groups, learning-rate schedule, per-step logging values."""

from __future__ import annotations

import logging
import math
import time
import warnings

import lightning as L
import torch

from harness.config import OptimConfig, RunConfig, from_dict, to_dict
from harness.memory import retain_freed_memory
from harness.model import LanguageModel

# Lightning's start-up banners and the "srun is available but not used" hint are noise in run logs.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*`srun` command is available.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"loss is {value} at step {step}")
        self.step = step


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of optim.lr at optimizer step `step`: linear warm-up, then constant or cosine."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class VWNModule(L.LightningModule):
    """Trains `LanguageModel` on windows (B, seq_len + 2): next-token CE + λ·next-2 CE + MoE terms."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.save_hyperparameters()  # the resolved RunConfig travels inside every checkpoint
        self.run_config: RunConfig = from_dict(RunConfig, config)
        self.model = LanguageModel(self.run_config.model)
        self.step_values: dict[str, torch.Tensor] = {}  # latest training-step values, read by the metrics writer
        self.val_sums: dict[str, float] = {}
        self.earlier_wall_time = 0.0  # seconds spent by earlier attempts of this run (from the checkpoint)
        self.attempt_started = time.time()
        self.threads = torch.get_num_threads()  # intra-op threads of each training process

    def setup(self, stage: str) -> None:
        # NOTE: runs in every training process, ddp_spawn workers included, which start with torch's
        # default threads and glibc's default malloc (which re-maps large tensors every step: ~2× slower)
        torch.set_num_threads(self.threads)
        retain_freed_memory()
        if self.run_config.train.compile:
            self.model.compile(dynamic=False)

    @classmethod
    def from_run_config(cls, config: RunConfig) -> VWNModule:
        return cls(to_dict(config))

    def losses(self, window: torch.Tensor) -> dict[str, torch.Tensor]:
        """window (B, seq_len + 2) -> next-token loss, next-2-token loss (if MTP), MoE aux loss."""
        seq_len = self.run_config.model.seq_len
        out = self.model(window[:, :seq_len], targets=window[:, 1:])
        losses = {"loss_ntp": out.loss_ntp, "aux_loss": out.aux_loss}
        if out.loss_next2 is not None:
            losses["loss_next2"] = out.loss_next2
        return losses | out.router

    def training_step(self, window: torch.Tensor, batch_idx: int) -> torch.Tensor:
        losses = self.losses(window)
        loss = losses["loss_ntp"] + losses["aux_loss"]
        if "loss_next2" in losses:
            loss = loss + self.run_config.model.mtp_weight * losses["loss_next2"]
        if not torch.isfinite(loss):
            raise DivergenceError(self.global_step, loss.item())
        self.step_values = {k: v.detach() for k, v in losses.items()}
        self.log("loss", losses["loss_ntp"], prog_bar=True, logger=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_sums = {}

    def validation_step(self, window: torch.Tensor, batch_idx: int) -> None:
        losses = self.losses(window)
        n = window.shape[0]
        for key in ("loss_ntp", "loss_next2"):
            if key in losses:
                self.val_sums[key] = self.val_sums.get(key, 0.0) + losses[key].item() * n
        self.val_sums["windows"] = self.val_sums.get("windows", 0.0) + n

    def validation_means(self) -> dict[str, float]:
        """Mean validation losses over the fixed held-out set, keyed like metrics.csv columns."""
        count = self.val_sums.get("windows", 0.0)
        return {f"val/{k}": v / count for k, v in self.val_sums.items() if k != "windows" and count}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["wall_time_s"] = self.earlier_wall_time + time.time() - self.attempt_started

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.earlier_wall_time = checkpoint.get("wall_time_s", 0.0)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # NOTE: before the step, after all micro-batches: the loads of the whole step move the bias.
        self.model.update_selection_biases()

    def configure_optimizers(self):
        optim = self.run_config.optim
        no_decay = self.model.no_decay_parameter_names()
        named = list(self.model.named_parameters())
        groups = [
            {"params": [p for n, p in named if n not in no_decay], "weight_decay": optim.weight_decay},
            {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0},
        ]
        # NOTE: fused: one kernel for all tensors; torch's default on CPU is a Python loop over them
        # (AdamW step, tiny config: 1.8 -> 0.6 ms at r = 1, 5.0 -> 1.4 ms at (2, 16))
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=True)
        max_steps = self.run_config.max_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
