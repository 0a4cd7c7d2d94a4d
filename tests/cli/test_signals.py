"""A real ``cl-lightning fit`` process stopped by SIGTERM (a scheduler's preemption) or SIGINT
(Ctrl-C) at a chosen point writes a checkpoint, prints one line with the resume command and exits
with 128 + the signal; that command ends the run exactly as the uninterrupted run (same machine).

The process pauses itself at the point (``signal_probes.PauseAt``), the test sends the signal and
lets it go on: where the signal lands does not depend on the machine's speed."""

from __future__ import annotations

import json
import os
import shlex
import signal
from pathlib import Path

import processes
import pytest
import torch
from signal_probes import is_paused, wait_until

from cl_lightning.cli.lightning_cli import main

REPO = Path(__file__).parents[2]
CONFIG = REPO / "configs" / "mcsgd" / "permuted_digits.yaml"
STEPS_PER_TASK = 90  # 1438 training digits in batches of 16
pytestmark = pytest.mark.slow  # real `cl-lightning fit` processes (warm: tests/processes.py)


def fit_args(out: Path, *extra: str) -> list[str]:
    """Three permuted-digits MC-SGD tasks, deterministic, writing under ``out``."""
    return ["fit", "--config", str(CONFIG), "--data.num_tasks", "3", "--trainer.deterministic", "true",
            "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--accuracy_matrix.print_table", "false", *extra]


def results(run: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A finished run's accuracy-matrix files (as text) and final weights."""
    files = {p.name: p.read_text() for p in sorted(run.glob("*accuracy_matrix.*"))}
    return files, torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.fixture
def straight(mcsgd_digits_run) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The uninterrupted run of ``fit_args`` (conftest: one in-process run shared with the fault and resume tests)."""
    return results(mcsgd_digits_run[0])


@pytest.mark.parametrize(
    ("where", "step", "signum", "stop_step"),
    [
        ("train_step", STEPS_PER_TASK * 3 // 2, signal.SIGTERM, STEPS_PER_TASK * 3 // 2),  # mid-task 2: after that step
        ("train_step", STEPS_PER_TASK, signal.SIGINT, STEPS_PER_TASK),  # a task's last step: after its evaluation
        ("evaluation", STEPS_PER_TASK, signal.SIGTERM, STEPS_PER_TASK),  # during the evaluation: at its end
    ],
    ids=["sigterm-mid-task", "sigint-last-step-of-task", "sigterm-during-evaluation"],
)
def test_signal_stops_with_a_checkpoint_that_resumes_exactly(where, step, signum, stop_step, straight, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    probe = ["--trainer.callbacks+=signal_probes.PauseAt", "--trainer.callbacks.where", where,
             "--trainer.callbacks.step", str(step)]
    process = processes.start(fit_args(tmp_path, *probe), tmp_path / "fit.log", env=env, cwd=tmp_path)
    try:
        wait_until(lambda: is_paused(process.pid) or process.poll() is not None, "the pause point")
        assert process.poll() is None, "the run ended before its pause point"
        os.kill(process.pid, signum)
        os.kill(process.pid, signal.SIGCONT)
        assert process.wait(timeout=300) == 128 + signum
    finally:
        process.kill()
    output = (tmp_path / "fit.log").read_text().splitlines()
    assert "Traceback" not in "\n".join(output)
    run = tmp_path / "lightning_logs" / "version_0"
    ckpt = run / "checkpoints" / f"interrupted-epoch={(stop_step - 1) // STEPS_PER_TASK}-step={stop_step}.ckpt"
    command = f"cl-lightning fit --config {run / 'config.yaml'} --ckpt_path {ckpt}"
    assert output[-1] == (f"stopped by {signal.Signals(signum).name} at epoch {(stop_step - 1) // STEPS_PER_TASK}, "
                          f"step {stop_step}: checkpoint {ckpt}; resume with: {command}")
    assert not list(run.glob("checkpoints/*.partial"))
    # the after-task checkpoint of task 1 (written after a stop there too) and last.ckpt are kept
    assert {"epoch=0-step=90.ckpt", "last.ckpt"} <= {p.name for p in run.glob("checkpoints/*.ckpt")}
    tasks_done = json.loads((run / "accuracy_matrix.json").read_text())["tasks_completed"]
    assert tasks_done == stop_step // STEPS_PER_TASK  # the task of a mid-task stop is not evaluated

    main(shlex.split(command)[1:])  # the printed command, as the user would run it

    files, weights = results(run)  # resumed in its own folder
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    expected_files, expected_weights = straight
    assert files == expected_files and len(files) == 4  # every digit of both matrices, all rows
    assert weights.keys() == expected_weights.keys()
    for name, value in expected_weights.items():
        assert torch.equal(weights[name], value), name
