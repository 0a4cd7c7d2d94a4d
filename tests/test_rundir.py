"""The run folder: layout, the accuracy-matrix file written and read back, ``run.log`` read back."""

import math
from pathlib import Path

import pytest
import torch

from cl_lightning.analysis.report import write_report
from cl_lightning.metrics.continual import summary
from cl_lightning.rundir import (
    FAILED_MARKER,
    LOG_FILE,
    MatrixFileError,
    WallTime,
    attempt_line,
    is_finished,
    placement,
    read_matrix,
    read_result,
    run_folder,
    set_aside,
    wall_time,
    wall_time_line,
    write_matrix,
)


def test_placement_puts_the_fit_into_the_run_folder():
    assert run_folder(Path("runs"), "rotated_mnist", "mcsgd", 3) == Path("runs/rotated_mnist/mcsgd/seed_3")
    assert placement(Path("runs"), "rotated_mnist", "mcsgd", 3) == [
        "--seed_everything", "3", "--trainer.logger.init_args.save_dir", "runs",
        "--trainer.logger.init_args.name", "rotated_mnist/mcsgd", "--trainer.logger.init_args.version", "seed_3"]


def test_the_matrix_file_reads_back_what_was_written_with_its_summaries(tmp_path):
    nan = math.nan
    matrix = torch.tensor([[90.0, 12.5, nan], [70.0, 80.25, nan], [nan, nan, nan]], dtype=torch.float64)
    write_matrix(tmp_path, "accuracy_matrix", matrix, 1, "val")
    read = read_matrix(tmp_path / "accuracy_matrix.json")
    assert torch.equal(read.matrix.isnan(), matrix.isnan()) and torch.equal(read.matrix.nan_to_num(), matrix.nan_to_num())
    assert (read.split, read.tasks_completed, read.num_tasks, read.finished) == ("val", 2, 3, False)
    assert read_result(tmp_path) == {"tasks_completed": 2, "num_tasks": 3, "split": "val", **summary(matrix, 1)}
    assert not is_finished(tmp_path)
    matrix[2] = torch.tensor([60.0, 70.0, 80.0])
    write_matrix(tmp_path, "accuracy_matrix", matrix, 2, "val")
    assert is_finished(tmp_path)
    (tmp_path / FAILED_MARKER).write_text("exit code 1\n")
    assert not is_finished(tmp_path)  # a marker wins over the matrix


def test_a_damaged_matrix_file_is_a_user_error_naming_the_file(tmp_path):
    (tmp_path / "accuracy_matrix.json").write_text('{"num_tasks": 2, "matrix": [[null, 1]]}')
    with pytest.raises(MatrixFileError, match=r"accuracy_matrix.json: row 1 has no accuracy on task 1; rerun"):
        read_matrix(tmp_path / "accuracy_matrix.json")
    assert read_result(tmp_path) is None and not is_finished(tmp_path)


def test_a_set_aside_attempt_is_hidden_from_the_report(tmp_path):
    broken = tmp_path / "permuted_digits" / "naive" / "seed_0"
    broken.mkdir(parents=True)
    (broken / FAILED_MARKER).write_text("exit code 1: boom\n")
    (tmp_path / "permuted_digits" / "naive" / ".seed_0.attempt1").mkdir()
    assert set_aside(broken) == broken.parent / ".seed_0.attempt2"
    assert not broken.exists() and (broken.parent / ".seed_0.attempt2" / FAILED_MARKER).exists()
    broken.mkdir()  # the new attempt, not started yet: failed (no matrix); the attempts are not runs
    report, _ = write_report(tmp_path, draw=False)
    assert [r.name for r in report.runs] == ["permuted_digits/naive/seed_0"]


def test_run_log_reads_back_the_wall_time_of_each_attempt(tmp_path):
    """Each launched process's part of ``run.log``: its command line, its output, its wall-time line."""
    log = (attempt_line(["fit", "--config", "c.yaml"], resumed=False) + "task 1/2: 5 steps in 1.5 s\n"
           + wall_time_line(3.0, 143) + attempt_line(["fit", "--ckpt_path", "last.ckpt"], resumed=True))
    assert log.startswith("$ cl-lightning fit --config c.yaml\n\n") and "\n--- resumed ---\n$ cl-lightning fit --ckpt" in log
    (tmp_path / LOG_FILE).write_text(log + wall_time_line(1.0, 0))
    assert wall_time(tmp_path) == WallTime(4.0, True)
    (tmp_path / LOG_FILE).write_text(log + "task 1/2: 5 steps in 2.0 s\n")  # killed with its launcher: no wall-time line
    assert wall_time(tmp_path) == WallTime(5.0, False)  # 3.0 s, and the 2.0 s of the tasks it logged
