"""ContinualModule: one-task runs and exact resume in the middle of a task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sequence_runs import assert_same_run, fit_permuted_digits, straight_and_resumed

from cl_lightning.methods.mcsgd import MCSGD


def test_a_single_task_run_has_a_one_by_one_matrix(tmp_path: Path) -> None:
    matrix, _ = fit_permuted_digits(tmp_path, num_tasks=1)
    assert matrix.shape == (1, 1) and 50 < matrix[0, 0] <= 100


@pytest.mark.slow
@pytest.mark.parametrize("method", ["naive", "mcsgd"])
def test_resume_in_the_middle_of_a_task_gives_the_same_run(tmp_path: Path, method: str) -> None:
    """A crash at step 130 of 3 tasks x 90 steps (inside task 2), resumed from the checkpoint of
    that step: same weights and accuracy matrix as the straight run, dropout included (the
    checkpoint carries the position in the epoch and the random state)."""
    def make_method():
        return [MCSGD(memory_per_task=20, subset_size=50, batch_size=16, epochs=1)] if method == "mcsgd" else []

    straight, resumed = straight_and_resumed(tmp_path, make_method, crash_step=130, num_tasks=3, dropout=0.2)
    assert_same_run(straight, resumed)
    assert torch.isfinite(straight[1].tril()).all()


@pytest.mark.slow
def test_resume_with_another_seed_is_refused(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from cl_lightning.errors import ConfigError

    fit_permuted_digits(tmp_path / "run", [ModelCheckpoint(dirpath=tmp_path / "run", save_last=True)], num_tasks=2)
    with pytest.raises(ConfigError, match=r"seeds \[0\] but this run has seeds \[1\].*config.yaml"):
        fit_permuted_digits(tmp_path / "other", num_tasks=2, seed=1, ckpt_path=tmp_path / "run" / "last.ckpt")
