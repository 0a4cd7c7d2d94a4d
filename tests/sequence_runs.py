"""Seeded small task sequences on the offline digits, shared by the method tests.

Every method test compares a method with naive SGD on *the same* seeded run, and checks that a
run interrupted at a task boundary and resumed from its checkpoint ends exactly where the
uninterrupted run ends; both patterns live here once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.evaluation.accuracy_matrix import AccuracyMatrix
from cl_lightning.methods.base import TaskAwareCallback
from cl_lightning.models.module import ContinualModule
from cl_lightning.models.nets import MLP


def fit_permuted_digits(
    tmp_path: Path,
    callbacks: list[Callback] = (),
    *,
    num_tasks: int = 5,
    hidden: tuple[int, ...] = (100, 100),
    dropout: float | list[float] = 0.0,
    lr: float | list[float] = 0.1,
    lr_decay: float | list[float] = 1.0,
    joint: bool = False,
    ckpt_path: Path | None = None,
    seed: int = 0,
    seeds: list[int] | None = None,
) -> tuple[Tensor, ContinualModule]:
    """Seed 0 (or ``seed``), permuted 8x8 digits, MLP 64-hidden-10, batch 16: returns (accuracy matrix, module).

    With ``seeds``, a population of those members (``dropout``, ``lr``, ``lr_decay`` may then be
    lists, one value per member) and the ``[N, T, T]`` accuracy matrices; else the ``[T, T]`` matrix
    of the population of one with ``seed``.
    """
    seed_everything(seed)
    members = seeds if seeds is not None else [seed]
    dm = ContinualDataModule(source="digits", benchmark="permuted", num_tasks=num_tasks, batch_size=16,
                             joint=joint, seeds=members)
    module = ContinualModule(MLP(64, list(hidden), 10, dropout=0.0 if isinstance(dropout, list) else dropout),
                             lr=lr, lr_decay=lr_decay, dropout=dropout if isinstance(dropout, list) else None,
                             seeds=members)
    matrix = AccuracyMatrix(print_table=False)
    trainer = Trainer(
        **dm.trainer_settings(), callbacks=[*callbacks, matrix], logger=False, default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return (matrix.matrix if seeds is not None else matrix.matrix[0]), module


class CrashAtTaskStart(TaskAwareCallback):
    """Simulates a crash when ``task`` starts, after the previous task's checkpoint was written.

    With ``only_fresh``, only a run started from scratch crashes, not one resumed from a
    checkpoint: a CLI run saves its callbacks in ``config.yaml``, which the resume reuses.
    """

    def __init__(self, task: int, only_fresh: bool = False) -> None:
        self.task = task
        self.only_fresh = only_fresh

    def on_task_start(self, trainer, pl_module, task):
        if task == self.task and not (self.only_fresh and trainer.ckpt_path is not None):
            raise RuntimeError("simulated crash")


class CrashAtStep(Callback):
    """Simulates a crash before training step ``step`` (0-based global step), mid-task."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def straight_and_resumed(tmp_path: Path, make_method, crash_task: int = 2, crash_step: int | None = None, **fit_args):
    """Run a method uninterrupted, and crashed then resumed from ``last.ckpt``.

    The crash comes at the start of ``crash_task`` (after its predecessor's checkpoint), or, with
    ``crash_step``, in the middle of a task right after a checkpoint written at that step.
    ``make_method()`` returns a fresh list of the method's callbacks. Returns, for each run, the
    method callbacks, the accuracy matrix and the module, to compare state by state.
    """
    straight_method = make_method()
    straight = fit_permuted_digits(tmp_path / "straight", straight_method, **fit_args)
    if crash_step is None:
        checkpoint, crash = ModelCheckpoint(dirpath=tmp_path / "crashed", save_last=True), CrashAtTaskStart(crash_task)
    else:
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "crashed", save_last=True, every_n_train_steps=crash_step)
        crash = CrashAtStep(crash_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_permuted_digits(tmp_path / "crashed", [*make_method(), checkpoint, crash], **fit_args)
    resumed_method = make_method()
    resumed = fit_permuted_digits(tmp_path / "resumed", [*resumed_method, ModelCheckpoint(dirpath=tmp_path / "resumed")],
                                  ckpt_path=tmp_path / "crashed" / "last.ckpt", **fit_args)
    return (straight_method, *straight), (resumed_method, *resumed)


def assert_same_run(straight: tuple, resumed: tuple) -> None:
    """Same accuracy matrix and bitwise-identical weights."""
    (_, straight_matrix, straight_module), (_, resumed_matrix, resumed_module) = straight, resumed
    assert torch.equal(resumed_matrix.nan_to_num(-1), straight_matrix.nan_to_num(-1))
    for a, b in zip(resumed_module.parameters(), straight_module.parameters()):
        assert torch.equal(a, b)


class OutOfMemoryAbove(Callback):
    """Simulates an accelerator running out of memory when a population has more than ``members``
    members (as PyTorch raises it: a CUDA allocation failure), at the start of training."""

    def __init__(self, members: int) -> None:
        self.members = members

    def on_train_start(self, trainer, pl_module):
        if pl_module.size > self.members:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {pl_module.size} GiB (simulated)")
