"""Stop a run on SIGTERM (a batch scheduler's preemption) or SIGINT (Ctrl-C) with a checkpoint that
resumes exactly, and a non-zero exit status.

Lightning alone turns SIGTERM into ``SIGTERMException``, a ``SystemExit`` with status 0 (a scheduler
counts the preempted job as a success), raised wherever its loops next look, even in the middle of
the evaluation after a task, and writes no checkpoint; Ctrl-C raises ``KeyboardInterrupt`` wherever
the program is, e.g. in the middle of an optimizer step or of MC-SGD's consolidation.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from cl_lightning.rundir import CONFIG_FILE, run_dir

#: The signals that stop a run with a checkpoint: a scheduler's stop (SLURM preemption, ``kill``) and Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(SIGTERMException):
    """Lightning's exception for a stop on a signal (``on_exception`` hooks see a ``SIGTERMException``),
    carrying the shell's status for a death by that signal, 128 + its number (143 for SIGTERM, 130
    for SIGINT), so a scheduler sees the run as unfinished."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.message = message


def resume_command(trainer: Trainer, ckpt: Path) -> str:
    """How to go on from ``ckpt``: the ``cl-lightning fit`` command when the run folder holds the
    CLI's ``config.yaml``, else the Trainer call."""
    config = run_dir(trainer) / CONFIG_FILE
    if config.is_file():
        return f"cl-lightning fit --config {config} --ckpt_path {ckpt}"
    return f"trainer.fit(model, datamodule, ckpt_path='{ckpt}')"


class CheckpointOnSignal(Callback):
    """On SIGTERM or SIGINT during ``fit``: finish the current step, write a checkpoint, print one
    line naming it and the resume command, and exit with status 128 + signal (:class:`RunInterrupted`).

    The signal handler only records the signal; the run stops at the next point where Lightning's
    own checkpoints are written, so the file resumes exactly like them (task batches position, RNG
    states, the method's state):

    - after a training step that is not its epoch's last (the point of ``every_n_train_steps``);
    - after the evaluation at the end of a task (the after-task checkpoint's point), when tasks
      remain: a signal during a task's last step, its consolidation or its evaluation stops there.

    A signal after the last task's evaluation lets the run finish (exit 0). A second Ctrl-C
    interrupts at once (Lightning's ``KeyboardInterrupt`` handling, exit 1, no checkpoint). In
    multi-process runs the ranks agree at every step on whether any rank got a signal, so all of
    them stop at the same step.

    The handlers are installed at the start of training, after Lightning's (which they replace
    for the run; Lightning restores the previous ones at its teardown).
    """

    def __init__(self) -> None:
        self._signal: int | None = None
        self._previous: dict[int, Callable | int | None] = {}
        self._stop: RunInterrupted | None = None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._signal, self._stop = None, None
        if threading.current_thread() is not threading.main_thread():  # only there can Python set handlers
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self._signal is None:
            self._signal = signum
        if signum == signal.SIGINT:  # a second Ctrl-C means "now"
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    # ------------------------------------------------------------------ the stopping points
    def _asked(self, trainer: Trainer) -> bool:
        """Whether any process got a stop signal (every process calls this at the same points)."""
        return trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._stop is not None:  # saved at the evaluation before
            raise self._stop
        # An epoch's last step is followed by its evaluation (and a task's by the consolidation
        # before it): a checkpoint taken here would resume past them, so that step waits.
        if self._asked(trainer) and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            raise self._save(trainer)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if self._asked(trainer) and not last_epoch:
            # Raised when the next epoch (or step) starts: the after-task ModelCheckpoint (at this
            # epoch's end, or after this callback here) still writes its file and last.ckpt.
            self._stop = self._save(trainer)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._stop is not None:
            raise self._stop

    def _save(self, trainer: Trainer) -> RunInterrupted:
        """Write the checkpoint (under a temporary name, renamed once complete, so a kill during the
        write leaves no truncated file that looks resumable) and print the line; returns the stop."""
        folder = self._folder(trainer)
        ckpt = folder / f"interrupted-epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt"
        partial = ckpt.with_name(ckpt.name + ".partial")
        trainer.save_checkpoint(partial, weights_only=False)
        if trainer.is_global_zero:
            os.replace(partial, ckpt)
            self._update_last(trainer, ckpt)
        trainer.strategy.barrier("CheckpointOnSignal")
        signum = self._signal if self._signal is not None else signal.SIGTERM  # a signal another process got
        message = (f"stopped by {signal.Signals(signum).name} at epoch {trainer.current_epoch}, step "
                   f"{trainer.global_step}: checkpoint {ckpt}; resume with: {resume_command(trainer, ckpt)}")
        if trainer.is_global_zero:
            print(message, file=sys.stderr, flush=True)
        return RunInterrupted(signum, message)

    @staticmethod
    def _update_last(trainer: Trainer, ckpt: Path) -> None:
        """Make ``last.ckpt`` this state too, so the README's resume command (and ``grid``/``sweep``,
        which resume from ``last.ckpt``) go on from here. A copy renamed into place, never a
        half-written ``last.ckpt``."""
        checkpoint = trainer.checkpoint_callback
        if not (isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_last):
            return
        last = ckpt.with_name(checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
        copy = last.with_name(last.name + ".partial")
        shutil.copyfile(ckpt, copy)
        os.replace(copy, last)

    @staticmethod
    def _folder(trainer: Trainer) -> Path:
        """The run's checkpoint folder (the ModelCheckpoint's, else ``<run>/checkpoints``)."""
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:
            return Path(checkpoint.dirpath)
        return run_dir(trainer) / "checkpoints"
