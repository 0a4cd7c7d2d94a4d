"""A callback that stops its own process (SIGSTOP) at a chosen point of a fresh run, so that a test
can send it a signal there and let it go on (SIGCONT): the signal arrives at that point whatever the
machine's speed."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class PauseAt(Callback):
    """Pause after training step ``step`` (``where="train_step"``), or after the first evaluation
    batch of the evaluation that follows it (``where="evaluation"``). A resumed run never pauses."""

    def __init__(self, where: str = "train_step", step: int = 1) -> None:
        self.where, self.step = where, step

    def _pause(self, trainer: Trainer, where: str) -> None:
        if where == self.where and trainer.global_step == self.step and not trainer.ckpt_path:
            os.kill(os.getpid(), signal.SIGSTOP)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._pause(trainer, "train_step")

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("batch_idx", args[2] if len(args) > 2 else 0) == 0:
            self._pause(trainer, "evaluation")
