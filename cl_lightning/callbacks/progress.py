"""A progress display that speaks in tasks and stays out of the way of training speed."""

from __future__ import annotations

import sys
import time

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


class TaskProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar labelled "Task k/T" instead of "Epoch e", with one line per task.

    - The bar is redrawn every ``refresh_rate`` steps: Lightning redraws on each step it is
      told to, and at batch size 10 a redraw every step costs a tenth of the step.
    - When the output is not a terminal (a log file, a batch job), animated bars would write
      thousands of carriage-return updates into the log: the bars are off there, and only the
      line per task is printed.
    - After each task's evaluation one line reports the task, its steps and wall time, and the
      average accuracy over the tasks seen so far. In a run resumed in the middle of a task, the
      steps and time of that task count from the resume (Lightning does not replay the task's
      ``on_train_epoch_start``), and the line says so.

    Args:
        refresh_rate: Redraw the bars every this many batches.
        interactive: Draw bars (True) or print lines only (False); None: bars when stderr is a
            terminal.
    """

    def __init__(self, refresh_rate: int = 10, interactive: bool | None = None) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._task_started = 0.0
        self._first_step = 0
        self._resumed_mid_task = False

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not self.interactive:
            self.disable()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start_counting(trainer)
        self._resumed_mid_task = trainer.global_step > 0  # a task start, if it is one, restarts the count

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        dm = trainer.datamodule
        epoch = trainer.current_epoch
        if dm.is_task_start(epoch):
            self._start_counting(trainer)
            self._resumed_mid_task = False
        label = f"Task {dm.task_of_epoch(epoch) + 1}/{dm.num_tasks}"
        if dm.epochs_per_task > 1:
            label += f" epoch {epoch % dm.epochs_per_task + 1}/{dm.epochs_per_task}"
        self.train_progress_bar.set_description(label)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        dm = trainer.datamodule
        fitting = trainer.state.fn == TrainerFn.FITTING  # `validate` has no task and no steps to report
        if trainer.sanity_checking or not fitting or not dm.is_task_end(trainer.current_epoch):
            return
        task = dm.task_of_epoch(trainer.current_epoch)
        # each member's average over the tasks seen so far, then their mean over the members still training
        seen = pl_module.task_accuracy["val"][:, : task + 1].nanmean(dim=1)
        seen = seen[~seen.isnan()]
        average = ""
        if len(seen):
            label = "average accuracy" if pl_module.size == 1 else f"average accuracy (mean of {len(seen)} members)"
            average = f", {label} {float(seen.mean()):.2f} %"
        seconds = time.perf_counter() - self._task_started
        steps = trainer.global_step - self._first_step
        since = " since the resume" if self._resumed_mid_task else ""
        self._resumed_mid_task = False
        rank_zero_info(f"task {task + 1}/{dm.num_tasks}: {steps} steps in {seconds:.1f} s{since} (with evaluation)"
                       f"{average}")

    def _start_counting(self, trainer: Trainer) -> None:
        self._task_started, self._first_step = time.perf_counter(), trainer.global_step
