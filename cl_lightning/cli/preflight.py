"""Check a run's inputs and output folders before the Trainer creates anything.

Lightning creates the logger's ``version_N`` folder and its events file (``logger.experiment``)
*before* the datamodule's ``setup`` reads the data (lightning/pytorch/trainer/call.py,
``_call_setup_hook``), and restores the checkpoint after that. A run that then fails on a missing
dataset, a damaged data file or a checkpoint of another seed leaves an empty ``version_N`` that
looks like a run; an unwritable output folder fails deep inside the logger with a traceback; and a
fit into a folder that holds another run's results would write over them. :func:`check_run_inputs`
does all of these checks first, so a failing run creates nothing and no run overwrites another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from cl_lightning.methods.base import Method
from cl_lightning.rundir import check_new_run, check_writable, loggers_run_dir, member_dirs


def check_run_inputs(datamodule: LightningDataModule, trainer_config: dict[str, Any], callbacks: list[Callback],
                     ckpt_path: str | None, fitting: bool = True) -> None:
    """Raise the run's :class:`~cl_lightning.errors.UserError` now rather than after its folder exists.

    ``trainer_config`` holds the Trainer's (instantiated) arguments, as LightningCLI passes them;
    ``fitting``: the command trains (or resumes), rather than evaluates.
    """
    for folder, option in _output_folders(trainer_config, callbacks):
        check_writable(folder, option)
    loggers = trainer_config.get("logger")
    folder = loggers_run_dir(loggers if isinstance(loggers, list) else [loggers], trainer_config.get("default_root_dir"))
    members = member_dirs(folder, datamodule.seeds, datamodule.member_dirs)
    configured = trainer_config.get("callbacks") or []
    _check_member_settings([*callbacks, *(configured if isinstance(configured, list) else [configured])], len(members))
    if len(members) > 1:
        for member in members:
            check_writable(member, "member_dirs")
    if fitting:
        check_new_run(folder, members, ckpt_path)
    datamodule.setup("fit")  # reads and checks the data; idempotent, the Trainer's call is then free
    if ckpt_path and Path(ckpt_path).is_file():
        _check_datamodule_state(datamodule, ckpt_path, fitting)


def _check_member_settings(callbacks: list[Callback], size: int) -> None:
    """Each method's per-member settings (one value, or one per member) against the population's size,
    now rather than in the method's ``setup``, after the run folder exists."""
    for callback in callbacks:
        if isinstance(callback, Method):
            callback.check_settings(size)


def _output_folders(trainer_config: dict[str, Any], callbacks: list[Callback]) -> list[tuple[str, str]]:
    """(folder, the option that sets it) for every folder the run writes into."""
    loggers = trainer_config.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    folders = [(str(logger.root_dir), "trainer.logger.init_args.save_dir") for logger in loggers
               if isinstance(logger, Logger) and logger.root_dir is not None]
    if not folders:
        folders.append((str(trainer_config.get("default_root_dir") or "."), "trainer.default_root_dir"))
    folders += [(str(c.dirpath), "checkpoint.dirpath") for c in callbacks
                if isinstance(c, ModelCheckpoint) and c.dirpath is not None]
    return folders


def _check_datamodule_state(datamodule: LightningDataModule, ckpt_path: str, fitting: bool) -> None:
    """Check the checkpoint's datamodule state now: ``check_seeds`` refuses a checkpoint of other
    seeds. ``mmap`` reads only the small entries, not the weights."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    state = checkpoint.get(type(datamodule).__qualname__)
    if state is not None:
        datamodule.check_seeds(state, fitting)
