"""The task-boundary events every continual-learning method builds on."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class TaskAwareCallback(Callback):
    """A callback with ``on_task_start`` / ``on_task_end`` events.

    The whole task sequence runs in one ``fit`` (task t owns epochs [t*E, (t+1)*E)), so task
    boundaries are epoch boundaries known to the datamodule:

    - ``on_task_start`` fires from ``on_train_epoch_start`` of a task's first epoch. Lightning
      does not replay that hook when it resumes in the middle of an epoch, so the event fires
      once per task across a resume.
    - ``on_task_end`` fires from ``on_train_batch_end`` of the task's last training batch, i.e.
      *before* that epoch's validation and checkpoint: the evaluated and saved model is the one
      the method keeps after the task (for MC-SGD, w_bar_t). ``on_train_epoch_end`` would be too
      late: Lightning validates before it.

    Subclasses that override ``on_train_epoch_start`` or ``on_train_batch_end`` must call
    ``super()``.
    """

    def on_task_start(self, trainer: Trainer, pl_module: LightningModule, task: int) -> None:
        """Called before the first training batch of ``task`` (0-based)."""

    def on_task_end(self, trainer: Trainer, pl_module: LightningModule, task: int) -> None:
        """Called after the last training batch of ``task`` (0-based), before its evaluation."""

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        if dm.is_task_start(trainer.current_epoch):
            self.on_task_start(trainer, pl_module, dm.task_of_epoch(trainer.current_epoch))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        dm = trainer.datamodule
        if batch_idx + 1 == trainer.num_training_batches and dm.is_task_end(trainer.current_epoch):
            self.on_task_end(trainer, pl_module, dm.task_of_epoch(trainer.current_epoch))
