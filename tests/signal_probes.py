"""A callback that stops its own process (SIGSTOP) at a chosen point of a fresh run, so that a test
can send it a signal there and let it go on (SIGCONT): the signal arrives at that point whatever the
machine's speed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

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


def _status(pid: int, field: str) -> str:
    """A field of ``/proc/<pid>/status`` ("" once the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(f"{field}:")), "")


def is_paused(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP), e.g. by :class:`PauseAt`."""
    return _status(pid, "State").startswith("T")


def has_pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` was sent to the (stopped) process and waits to be delivered."""
    pending = _status(pid, "ShdPnd")
    return bool(pending) and bool(int(pending, 16) >> (signum - 1) & 1)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """Poll ``condition`` until it holds; the timeout only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
