"""A fit in a child process: why it failed, read from its log, and a real fit launched into its folder."""

import os
from pathlib import Path

import pytest

from cl_lightning.launch.jobs import prepare
from cl_lightning.launch.process import failure_reason, launch
from cl_lightning.rundir import CONFIG_FILE, FAILED_MARKER, LAST_CHECKPOINT, LOG_FILE, is_finished, placement, run_folder

CONFIGS = Path(__file__).parents[2] / "configs"
REPO = CONFIGS.parent
TINY = ["--data.num_tasks", "2", "--data.train_examples_per_task", "200", "--trainer.enable_model_summary", "false",
        "--trainer.enable_progress_bar", "false", "--accuracy_matrix.print_table", "false"]


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
