"""Where a run's metrics go besides log.csv: TensorBoard and Weights & Biases, both optional extras.

Both get the per-step training loss and learning rate (x axis: the optimizer step) and every epoch
metric of log.csv (TensorBoard: x axis the epoch, as before; W&B: at the epoch's last step, with the
epoch as a value). Per-step losses reach the host once per log interval (`DeviceLog`), so they are
written in bursts. Only process 0 tracks; under several processes the per-step loss is process 0's
micro-batches (the epoch values are over all processes, as in log.csv).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["EPOCH_KEYS", "Trackers", "check_available"]

_logger = logging.getLogger(__name__)

# the log.csv columns the trackers receive at the end of each epoch
EPOCH_KEYS = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "train_img_s")


def check_available(tensorboard: bool, wandb_project: str | None) -> None:
    """Refuse now (ValueError), before anything is written, a tracker whose package is missing."""
    if tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ValueError(
                "--tensorboard needs the tensorboard package: pip install 'lowformer[tensorboard]'"
            ) from None
    if wandb_project is not None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--wandb needs the wandb package: pip install 'lowformer[wandb]'") from None


class Trackers:
    """The trackers one run writes to (none, TensorBoard, W&B or both).

    Args:
        out: the run folder; TensorBoard writes `out/tensorboard`, W&B `out/wandb`.
        wandb_project: the W&B project, or None for no W&B. W&B's own settings apply
            (`WANDB_MODE=offline` keeps everything on disk; `wandb sync` uploads it later).
        wandb_id: the W&B run to continue (a resumed run continues its W&B run).
        config: what W&B records as the run's configuration (the recipe).
    """

    def __init__(
        self,
        out: Path,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        wandb_id: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.writer = None
        self.wandb_run = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        if wandb_project is not None:
            import wandb

            (out / "wandb").mkdir(exist_ok=True)  # W&B writes its files under dir/wandb
            self.wandb_run = wandb.init(
                project=wandb_project,
                dir=str(out),
                name=out.name,
                id=wandb_id,
                resume="allow" if wandb_id else None,
                config=dict(config or {}),
            )

    @property
    def wandb_id(self) -> str | None:
        """The W&B run's id (saved in checkpoints, so that a resumed run continues it)."""
        return self.wandb_run.id if self.wandb_run is not None else None

    def log_steps(self, steps: Mapping[int, Mapping[str, float]]) -> None:
        """Per-step values, {optimizer step: {"loss": ..., "lr": ...}}, in step order."""
        for step, values in sorted(steps.items()):
            if self.writer is not None:
                for key, value in values.items():
                    self.writer.add_scalar(f"step/{key}", value, step)
            if self.wandb_run is not None:
                self.wandb_run.log({f"train/{key}": value for key, value in values.items()}, step=step)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """One row of log.csv (the `EPOCH_KEYS` that have a value)."""
        values = {key: row[key] for key in EPOCH_KEYS if row.get(key) is not None}
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({"epoch": row["epoch"], **{f"epoch/{k}": v for k, v in values.items()}},
                               step=row["global_step"])  # fmt: skip

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
