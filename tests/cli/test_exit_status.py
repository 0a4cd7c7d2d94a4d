"""``cl-lightning``'s exit status when a scheduler stops a command that is not ``fit`` (``fit``'s own
stop with a checkpoint is tested in ``test_signals.py``)."""

import os
import signal
from pathlib import Path

import processes
import pytest
from signal_probes import is_paused, wait_until

REPO = Path(__file__).parents[2]
pytestmark = pytest.mark.slow  # a real `cl-lightning validate` process (warm: tests/processes.py)


def test_validate_stopped_by_sigterm_exits_143_not_0(tmp_path):
    """Lightning ends an evaluation on SIGTERM with ``SIGTERMException``, a ``SystemExit`` of status 0:
    a preempted job would count as a success. The process pauses itself at the first of the
    evaluation's batches (``signal_probes.PauseAt``), gets SIGTERM there and goes on; Lightning stops
    the evaluation at that batch (it finishes one stopped at its last batch)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    command = ["validate", "--config", str(REPO / "configs" / "naive" / "permuted_digits.yaml"),
               "--data.num_tasks", "2", "--data.eval_batch_size", "32", "--trainer.logger.init_args.save_dir", str(tmp_path),
               "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=signal_probes.PauseAt",
               "--trainer.callbacks.where", "evaluation", "--trainer.callbacks.step", "0"]
    process = processes.start(command, tmp_path / "validate.log", env=env, cwd=tmp_path)
    try:
        wait_until(lambda: is_paused(process.pid) or process.poll() is not None, "the pause in the evaluation")
        assert process.poll() is None, "the evaluation ended before its pause point"
        os.kill(process.pid, signal.SIGTERM)
        os.kill(process.pid, signal.SIGCONT)
        assert process.wait(timeout=300) == 128 + signal.SIGTERM
    finally:
        process.kill()
    output = (tmp_path / "validate.log").read_text()
    assert "Traceback" not in output and "Validate metric" not in output  # stopped, no results
