"""Writing checkpoints a task sequence can always be resumed from.

Two faults of Lightning's stock checkpointing, both seen in real runs, are fixed here:

- **A step checkpoint written on an epoch's last batch loses the rest of that epoch.**
  ``ModelCheckpoint(every_n_train_steps=N)`` saves in ``on_train_batch_end``. On the epoch's last
  batch that is *before* the epoch's validation and ``on_train_epoch_end``. Resuming such a
  checkpoint, ``FitLoop.reset`` sees "restarted on train batch end" with ``is_last_batch`` and
  marks the epoch processed and completed (lightning/pytorch/loops/fit_loop.py, ``reset``;
  the epoch loop's ``reset`` likewise resets its batch progress "in which save happened
  on_train_batch_end and epoch is at end"), so the resumed run never runs that validation: the
  task's accuracy-matrix row stays empty and the run still exits 0. A task ends on an epoch's
  last batch, so any N that divides the steps per task (e.g. 1000 with 6000 steps per task) hits
  it. :class:`TaskCheckpoint` writes a step checkpoint that falls on an epoch's last batch at the
  end of that epoch instead (after its validation), the point Lightning resumes exactly.
- **Step checkpoints replace the after-task checkpoints**: ``every_n_train_steps`` sets
  ``every_n_epochs`` to 0, and asking for both raises ``MisconfigurationException``.
  :class:`TaskCheckpoint` takes both and saves on either, so ``last.ckpt`` is always the latest
  state and, at the end of the run, the final model.

And :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the same folder
and renames it into place. Lightning's own write goes through an fsspec transaction whose
temporary file lives in the system temp folder and is *moved* (a copy across file systems) onto
the checkpoint, so a full disk leaves a truncated ``.ckpt`` that a later resume picks up.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from cl_lightning.errors import ConfigError, OutputWriteError


class TaskCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with step checkpoints added to the after-task ones.

    Each is written where a resume continues exactly:

    - ``every_n_epochs`` (default 1: after every task; the CLI validates once per task, and the
      checkpoint of an epoch with validation is written after it) and ``every_n_train_steps``
      both apply; ``last.ckpt`` (``save_last``) follows every save, so it is always the latest
      state, and the final model at the end of the run.
    - A step checkpoint that falls on an epoch's last training batch is written at the end of
      that epoch, after its validation, with the same name (``epoch=E-step=S``): see the module
      docstring for why the stock one cannot be resumed.

    The arguments are ``ModelCheckpoint``'s; only ``every_n_train_steps`` no longer excludes
    ``every_n_epochs``. They are described here for this use (``fit --help`` shows these texts);
    ``ModelCheckpoint``'s documentation has the rest.

    Args:
        dirpath: Folder of the checkpoint files. None: ``checkpoints`` in the run folder.
        filename: File name, formatted with ``epoch``, ``step`` and logged metrics (e.g.
            ``'{epoch}-{val_loss:.2f}'``); ``.ckpt`` is appended. None: ``'{epoch}-{step}'``.
        monitor: Logged metric that ranks the checkpoints for ``save_top_k``. None: no ranking.
        verbose: Log each save.
        save_last: Also write ``last.ckpt`` at every save (``'link'``: a symbolic link), the file
            to resume from.
        save_top_k: Checkpoints to keep: the best ``k`` by ``monitor``, -1 all, 0 none (but
            ``last.ckpt``). Without a ``monitor`` only -1, 0 or 1 (the newest).
        save_on_exception: Also write a checkpoint when training raises an exception.
        save_weights_only: Write the weights only, without the optimizer, loop and callback
            states (a method's memory, the accuracy matrix): ``--ckpt_path`` refuses such a file.
        mode: ``min`` or ``max``: whether a lower or a higher ``monitor`` is better.
        auto_insert_metric_name: Write ``name=value`` for each field of ``filename`` (turn it
            off for metric names with ``/``, which would make folders).
        every_n_train_steps: Also save every this many training steps (None or 0: never).
        train_time_interval: Also save each time this much time has passed (checked after each
            training batch).
        every_n_epochs: Save every this many epochs (None: 1); 0: never at an epoch's end (the
            step and time saves and the final ``last.ckpt`` remain).
        save_on_train_epoch_end: Save at the end of every training epoch (True) or only after an
            evaluation, i.e. once per task (False). None: Lightning's choice, False when a task
            has several epochs. An epoch's evaluation comes before its checkpoint either way.
        enable_version_counter: Name a file that exists ``<name>-v1.ckpt`` (and so on) instead of
            overwriting it.
    """

    def __init__(
        self,
        dirpath: Optional[_PATH] = None,
        filename: Optional[str] = None,
        monitor: Optional[str] = None,
        verbose: bool = False,
        save_last: Optional[Union[bool, Literal["link"]]] = None,
        save_top_k: int = 1,
        save_on_exception: bool = False,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: Optional[int] = None,
        train_time_interval: Optional[timedelta] = None,
        every_n_epochs: Optional[int] = None,
        save_on_train_epoch_end: Optional[bool] = None,
        enable_version_counter: bool = True,
    ) -> None:
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 0:
                raise ConfigError(f"checkpoint.{name} must be 0 (off) or a positive integer, got {value}")
        # The parent allows one trigger: give it the time trigger (or none) and set the others after.
        super().__init__(
            dirpath, filename, monitor, verbose, save_last, save_top_k, save_on_exception, save_weights_only, mode,
            auto_insert_metric_name, every_n_train_steps=0, train_time_interval=train_time_interval,
            every_n_epochs=0, save_on_train_epoch_end=save_on_train_epoch_end,
            enable_version_counter=enable_version_counter,
        )
        self._every_n_train_steps = every_n_train_steps or 0
        self._every_n_epochs = 1 if every_n_epochs is None else every_n_epochs
        self._step_save_due = False

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._ends_epoch(trainer, batch_idx):
            if self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0:
                self._step_save_due = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        due, self._step_save_due = self._step_save_due, False
        if due and not self._should_skip_saving_checkpoint(trainer):  # skipped: saved after validation already
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # `every_n_epochs` > 1 may skip the last epoch: `last.ckpt` must still be the final model.
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with warnings.catch_warnings():
            if self.monitor is None:
                # Loaded into another folder than it was written from (`test` of a population member writes
                # into the member's folder), Lightning warns that the top-k ranking's state is not reloaded:
                # without a monitor there is no ranking, so the warning is noise. With one it stays.
                warnings.filterwarnings("ignore", message="The dirpath has changed from ", category=UserWarning)
            super().load_state_dict(state_dict)
        if self.save_last and self.dirpath is not None and state_dict.get("dirpath") == self.dirpath:
            # A resume continues in its own folder, whose last.ckpt is this run's latest state, to be replaced.
            # The checkpoint's own record may predate it (`CheckpointOnSignal` copies its checkpoint to
            # last.ckpt after writing it), and Lightning would then write last-v1.ckpt beside it.
            self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)

    @staticmethod
    def _ends_epoch(trainer: Trainer, batch_idx: int) -> bool:
        """Whether this is the epoch's last training batch (the condition Lightning's resume tests)."""
        return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or batch_idx + 1 == trainer.num_training_batches


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to ``<name>.tmp`` beside it, flushes it to disk, then renames it into
    place (``os.replace``, atomic on one file system): a failed or interrupted write leaves the
    previous file as it was, and no partial ``.ckpt``. A failed write is one
    :class:`OutputWriteError` naming the file and the fix; remote paths keep Lightning's writer."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OutputWriteError(
                f"could not write checkpoint {path} ({err}); the checkpoints written before it are kept. Free disk "
                f"space (or fix the folder's permissions), then resume from the latest one in {path.parent}: "
                "cl-lightning fit --config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt"
            ) from err
