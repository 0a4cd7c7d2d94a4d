"""TaskProgressBar: task labels, and one line per task instead of animated bars in a log file."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from sequence_runs import CrashAtStep

from cl_lightning.callbacks.progress import TaskProgressBar
from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.evaluation.accuracy_matrix import AccuracyMatrix
from cl_lightning.models.module import ContinualModule
from cl_lightning.models.nets import MLP


@pytest.mark.slow
def test_a_log_file_gets_one_line_per_task_with_the_average_accuracy(tmp_path: Path, caplog, capsys) -> None:
    seed_everything(0)
    dm = ContinualDataModule(source="digits", num_tasks=3, batch_size=16, seed=0)
    matrix, bar = AccuracyMatrix(print_table=False), TaskProgressBar(interactive=False)
    trainer = Trainer(**dm.trainer_settings(), callbacks=[bar, matrix], logger=False, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    with caplog.at_level(logging.INFO):
        trainer.fit(ContinualModule(MLP(64, [32], 10)), dm)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("task ")]
    assert len(lines) == 3
    steps = trainer.num_training_batches
    for t, line in enumerate(lines):
        found = re.fullmatch(rf"task {t + 1}/3: (\d+) steps in [\d.]+ s \(with evaluation\), average accuracy ([\d.]+) %", line)
        assert found and int(found[1]) == steps
        assert float(found[2]) == pytest.approx(matrix.matrix[0, t, : t + 1].mean().item(), abs=0.01)
    assert "\r" not in capsys.readouterr().err  # no animated bar in a non-interactive output


def test_the_bar_is_labelled_with_the_task(tmp_path: Path) -> None:
    seed_everything(0)
    dm = ContinualDataModule(source="digits", num_tasks=2, epochs_per_task=2, batch_size=64, seed=0)
    bar = TaskProgressBar(interactive=True)
    trainer = Trainer(**dm.trainer_settings(), callbacks=[bar], logger=False, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(ContinualModule(MLP(64, [32], 10)), dm)
    assert bar.train_progress_bar.desc.startswith("Task 2/2 epoch 2/2")


def test_after_a_mid_task_resume_the_task_line_counts_from_the_resume(tmp_path: Path, caplog) -> None:
    def fit(callbacks: list, ckpt_path: Path | None = None) -> Trainer:
        seed_everything(0)
        dm = ContinualDataModule(source="digits", num_tasks=2, batch_size=16, seed=0)
        trainer = Trainer(**dm.trainer_settings(), callbacks=callbacks, logger=False, enable_model_summary=False,
                          default_root_dir=tmp_path)
        trainer.fit(ContinualModule(MLP(64, [32], 10)), dm, ckpt_path=ckpt_path)
        return trainer

    # task 2 owns steps 90..179; the run stops at step 130, right after a checkpoint there
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=130, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit([TaskProgressBar(interactive=False), checkpoint, CrashAtStep(130)])
    caplog.clear()
    started = time.perf_counter()
    with caplog.at_level(logging.INFO):
        fit([TaskProgressBar(interactive=False)], ckpt_path=tmp_path / "last.ckpt")
    elapsed = time.perf_counter() - started
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("task ")]
    found = re.fullmatch(r"task 2/2: 50 steps in ([\d.]+) s since the resume \(with evaluation\), average accuracy [\d.]+ %",
                         lines[0])
    assert len(lines) == 1 and found, lines
    assert float(found[1]) <= elapsed
