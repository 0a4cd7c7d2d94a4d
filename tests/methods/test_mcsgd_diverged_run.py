"""A run that diverges writes no result files that look like results (issue 14, item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl_lightning.cli import main

MCSGD = str(Path(__file__).parents[2] / "configs" / "mcsgd" / "permuted_digits.yaml")


def test_run_diverging_in_task_1_writes_no_accuracy_matrix_files(tmp_path, capsys):
    # lr 1e6: the loss of task 1 overflows within a few steps; before the fix MC-SGD's
    # end-of-task report still wrote w_hat_accuracy_matrix.csv with a chance-level row.
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", MCSGD, "--data.num_tasks", "2", "--model.lr", "1e6",
              "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false"])
    assert str(stop.value.code).startswith("error: the training loss is not finite (nan) at task 1, epoch 0")
    run = tmp_path / "lightning_logs" / "version_0"
    assert (run / "config.yaml").exists()  # the run did start
    assert sorted(p.name for p in run.glob("*accuracy_matrix*")) == []
    assert not (run / "checkpoints").exists()
