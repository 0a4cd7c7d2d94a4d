"""A run that diverges writes no result files that look like results (issue 14, item 7); in a
population, a member whose consolidation diverges is stopped and the others carry on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl_lightning.cli.lightning_cli import main

MCSGD = str(Path(__file__).parents[2] / "configs" / "mcsgd" / "permuted_digits.yaml")


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_member_whose_consolidation_diverges_is_stopped_and_the_other_trains_on(tmp_path):
    # member 1's consolidation lr (inf in float32) makes its w_bar_2 NaN: the guard, run before MC-SGD
    # reports the task, stops member 1 with a warning; it keeps the rows of task 1 only, member 0 has all 3
    with pytest.warns(UserWarning, match=r"Member 1 \(seed 4\): the weights are not finite at task 2"):
        main(["fit", "--config", MCSGD, "--data.num_tasks", "3", "--seeds", "[3,4]",
              "--trainer.callbacks.init_args.lr", "[0.005,1e300]", "--trainer.callbacks.init_args.save_solutions", "true",
              "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false", "--accuracy_matrix.print_table", "false"])
    logs = tmp_path / "lightning_logs" / "version_0"  # the members' folders are inside the run folder
    for seed, rows in ((3, 3), (4, 1)):
        for stem in ("accuracy_matrix", "w_hat_accuracy_matrix"):
            record = json.loads((logs / f"seed_{seed}" / f"{stem}.json").read_text())
            assert record["tasks_completed"] == rows, (seed, stem)
        assert len(list((logs / f"seed_{seed}" / "solutions").glob("w_bar_*.pt"))) == rows
