"""Experiment tracking: each epoch's record of metrics.jsonl, also written as TensorBoard scalars.

`digitlab train --tensorboard DIR` (the `tensorboard` extra) writes every numeric field of each epoch record
(train_loss, train_accuracy, val_loss, val_accuracy, epoch_seconds, images_per_second, lr) under its own name,
at step = epoch; `tensorboard --logdir DIR` shows them. A resumed run writes on in the same DIR and drops
the events of epochs it replays.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .extras import require


class Tracker:
    """Where epoch records go besides metrics.jsonl: a TensorBoard dir, or nowhere (log_dir None)."""

    def __init__(self, log_dir: str | Path | None):
        self.log_dir = Path(log_dir) if log_dir else None
        self._writer = None
        if self.log_dir is not None:
            require("tensorboard", "tensorboard")  # before any training: a missing extra fails at once

    def log(self, record: dict[str, Any]) -> None:
        """Write the record's numeric fields (not `epoch`, the step) as scalars at step = epoch."""
        if self.log_dir is None:
            return
        step = int(record["epoch"])
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run replays epochs after its last checkpoint; their old events go
            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step)
        for name, value in record.items():
            if name == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
