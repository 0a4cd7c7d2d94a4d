"""The run folder: layout, the accuracy-matrix file written and read back, and a real fit launched into it."""

import math
import os
from pathlib import Path

import pytest
import torch

from cl_lightning.analysis.report import write_report
from cl_lightning.metrics.continual import summary
from cl_lightning.rundir import (
    CONFIG_FILE,
    FAILED_MARKER,
    LAST_CHECKPOINT,
    LOG_FILE,
    MatrixFileError,
    failure_reason,
    is_finished,
    launch,
    placement,
    prepare,
    read_matrix,
    read_result,
    run_folder,
    set_aside,
    write_matrix,
)

CONFIGS = Path(__file__).parents[1] / "configs"
REPO = CONFIGS.parent
TINY = ["--data.num_tasks", "2", "--data.train_examples_per_task", "200", "--trainer.enable_model_summary", "false",
        "--trainer.enable_progress_bar", "false", "--accuracy_matrix.print_table", "false"]


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


def test_prepare_resumes_an_interrupted_run_and_sets_aside_a_failed_or_checkpointless_one(tmp_path):
    folder = run_folder(tmp_path, "permuted_digits", "naive", 0)
    assert prepare(folder) == []  # nothing there yet
    (folder / "checkpoints").mkdir(parents=True)
    (folder / LAST_CHECKPOINT).write_bytes(b"")
    (folder / CONFIG_FILE).write_text("model: {}\n")
    assert prepare(folder) == ["--ckpt_path", str(folder / LAST_CHECKPOINT)]
    assert (folder / CONFIG_FILE).exists()  # kept: only a fit that writes a new one replaces it
    (folder / FAILED_MARKER).write_text("exit code 1: error: boom\n")
    assert prepare(folder) == []
    assert not folder.exists() and (folder.parent / ".seed_0.attempt1" / FAILED_MARKER).exists()
    folder.mkdir()  # an attempt stopped before its first checkpoint starts again too
    assert prepare(folder) == [] and (folder.parent / ".seed_0.attempt2").is_dir()


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


def test_failure_reason_is_the_exit_code_and_the_last_error_with_its_continuation(tmp_path):
    (tmp_path / LOG_FILE).write_text("$ cl-lightning fit\nValueError: early\nerror: Parser key \"model.lr\":\n"
                                     "  Expected a PositiveFloat\nnot indented\n")
    assert failure_reason(2, tmp_path) == 'exit code 2: error: Parser key "model.lr": Expected a PositiveFloat'
    (tmp_path / LOG_FILE).write_text("all fine\n")
    assert failure_reason(0, tmp_path) == "exit code 0 but only 0 task(s) done"


@pytest.fixture
def env(monkeypatch):
    """The launched ``python -m cl_lightning`` imports this tree."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.slow
def test_launch_runs_a_fit_and_a_relaunch_of_a_finished_checkpoint_keeps_the_config(tmp_path, env):
    """A real 2-task fit launched into its folder finishes with run.log and its wall-time line. A
    run whose matrix file was lost after its final ``last.ckpt`` (killed in between) is relaunched
    from that checkpoint: ``fit`` says there is nothing to resume and writes no config, so the
    previous ``config.yaml`` must still be there (it used to be deleted before the resume)."""
    folder = run_folder(tmp_path, "permuted_digits", "naive", 0)
    fit = ["fit", "--config", str(CONFIGS / "naive" / "permuted_digits.yaml"), *TINY,
           *placement(tmp_path, "permuted_digits", "naive", 0)]
    outcome = launch(folder, fit, prepare(folder))
    assert (outcome.code, outcome.failure) == (0, None) and is_finished(folder)
    assert "wall time of the whole command:" in (folder / LOG_FILE).read_text()
    config = (folder / CONFIG_FILE).read_text()

    (folder / "accuracy_matrix.json").unlink()
    resume = prepare(folder)
    assert resume == ["--ckpt_path", str(folder / LAST_CHECKPOINT)]
    outcome = launch(folder, fit, resume)
    log = (folder / LOG_FILE).read_text()
    assert "--- resumed ---" in log and "nothing to resume" in log
    assert (folder / CONFIG_FILE).read_text() == config
    assert outcome.failure == "exit code 0 but only 0 task(s) done" and (folder / FAILED_MARKER).exists()
