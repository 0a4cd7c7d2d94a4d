"""A callback that interrupts its own ``cl-lightning fit`` process at a named point of a task.

It is added to a real run on the command line (``--trainer.callbacks+=injector.FaultInjector``,
with ``tests/cli/faults`` on ``PYTHONPATH``) and sends ``signal`` to its own process when the run
reaches ``point`` of ``task`` (0-based). The resume command reuses the run's ``config.yaml``,
which still lists the injector: it only fires in a run started from scratch, and with
``once_file`` only in the first such run (a rerun of ``grid`` starts its runs afresh too).

Points, in the order a task goes through them:

- ``mid_task``: before the middle training batch of the task;
- ``last_step``: before the task's last training batch (a step checkpoint may land there);
- ``consolidation``: inside MC-SGD's consolidation at the task end, at its second line-gradient
  call (the SIGTERM handler then runs while the consolidation is half done);
- ``evaluation``: before the first batch of the evaluation after the task;
- ``checkpoint_write``: inside the write of the checkpoint after the task, once part of the
  file's bytes are on disk.
"""

from __future__ import annotations

import os
import signal as signals
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

Point = Literal["mid_task", "last_step", "consolidation", "evaluation", "checkpoint_write"]


class FaultInjector(Callback):
    """Sends ``signal`` (``SIGKILL``, ``SIGTERM`` or ``SIGINT``) to this process at ``point`` of ``task``."""

    def __init__(self, point: Point, task: int = 1, signal: str = "SIGKILL", once_file: str | None = None) -> None:
        self.point = point
        self.task = task
        self.signal = getattr(signals, signal)
        self.once_file = Path(once_file) if once_file else None
        self.armed = False
        self.trainer: Trainer | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Whether this run was resumed is known only later (`trainer.ckpt_path`): see `fire`.
        self.armed, self.trainer = stage == "fit", trainer
        if self.point == "consolidation":
            self._wrap_line_gradient(trainer)
        if self.point == "checkpoint_write":
            self._wrap_checkpoint_write(trainer)

    def fire(self) -> None:
        """Deliver the signal once, in a run started from scratch; Python runs a handler (SIGTERM,
        SIGINT) at its next bytecode."""
        if self.armed and self.trainer.ckpt_path is None and not (self.once_file and self.once_file.exists()):
            self.armed = False
            if self.once_file:
                self.once_file.touch()
            os.kill(os.getpid(), self.signal)

    def _in_task(self, trainer: Trainer) -> bool:
        return trainer.datamodule.task_of_epoch(trainer.current_epoch) == self.task

    # ------------------------------------------------------------------ training and evaluation
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._in_task(trainer):
            return
        last = trainer.num_training_batches - 1
        if (self.point == "mid_task" and batch_idx == last // 2) or (self.point == "last_step" and batch_idx == last):
            self.fire()

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.point == "evaluation" and trainer.training is False and self._in_task(trainer):
            self.fire()

    # ------------------------------------------------------------------ inside other components
    def _wrap_line_gradient(self, trainer: Trainer) -> None:
        """Fire at MC-SGD's second line-gradient call while consolidating ``task``."""
        mcsgd = next(c for c in trainer.callbacks if type(c).__name__ == "MCSGD")
        make_line, calls = mcsgd.line_gradient, [0]

        def line_gradient(population: Any) -> Any:
            line = make_line(population)

            def counted(*args: Any, **kwargs: Any) -> Any:
                if self._in_task(trainer):
                    calls[0] += 1
                    if calls[0] == 2:
                        self.fire()
                return line(*args, **kwargs)

            return counted

        mcsgd.line_gradient = line_gradient

    def _wrap_checkpoint_write(self, trainer: Trainer) -> None:
        """Fire while the checkpoint after ``task`` is being written, half of its bytes on disk.

        Every file write of the process goes through the wrapper while that checkpoint is saved;
        the first one that writes more than a few bytes writes half of them and then fires.
        """
        checkpoint_io = trainer.strategy.checkpoint_io
        save = checkpoint_io.save_checkpoint

        def save_checkpoint(checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            if not (self.armed and trainer.ckpt_path is None and self._in_task(trainer)):
                return save(checkpoint, path, storage_options)
            with _PartialWrites(self.fire):
                return save(checkpoint, path, storage_options)

        checkpoint_io.save_checkpoint = save_checkpoint


class _PartialWrites:
    """Within the block, the first large write to a file opened for writing stops half-way."""

    def __init__(self, fire: Any) -> None:
        self.fire = fire

    def __enter__(self) -> _PartialWrites:
        import builtins
        import io

        self._open, fire = builtins.open, self.fire

        class Stopping(io.FileIO):
            def write(self, data: Any) -> int:  # noqa: D401 (a file method)
                view = memoryview(data)
                if len(view) > 1024:
                    half = len(view) // 2
                    super().write(view[:half])
                    os.fsync(self.fileno())
                    fire()  # SIGKILL ends here; after a handled signal, the write goes on
                    return half + super().write(view[half:])
                return super().write(view)

        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if "w" in mode and "b" in mode and not args and not kwargs:
                return Stopping(file, mode.replace("b", ""))
            return self._open(file, mode, *args, **kwargs)

        builtins.open = open_
        return self

    def __exit__(self, *exc: Any) -> None:
        import builtins

        builtins.open = self._open
