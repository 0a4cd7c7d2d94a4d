"""Through the command line, as a user runs it: a run that crashed after a task and was resumed
with ``fit --config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt`` ends exactly as
the uninterrupted run, and the seed alone decides a run (permutations, memory, results)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cl_lightning.cli.lightning_cli import ContinualCLI, cli_main
from cl_lightning.methods.mcsgd import MCSGD

CONFIGS = Path(__file__).parents[2] / "configs"
METHODS = ("naive", "mcsgd")
pytestmark = pytest.mark.slow  # whole runs, crashed and resumed


def fit_args(method: str, out: Path, *extra: str) -> list[str]:
    """Three permuted-digits tasks of a shipped config, deterministic, writing under ``out``."""
    return ["fit", "--config", str(CONFIGS / method / "permuted_digits.yaml"), "--data.num_tasks", "3",
            "--trainer.deterministic", "true", "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--accuracy_matrix.print_table", "false", *extra]


def run_folder(out: Path, version: int) -> Path:
    return out / "lightning_logs" / f"version_{version}"


def matrix_files(run: Path) -> dict[str, str]:
    """Every accuracy-matrix file of a run (MC-SGD also writes the w_hat matrix), as text."""
    return {p.name: p.read_text() for p in sorted(run.glob("*accuracy_matrix.*"))}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, mcsgd_digits_run) -> dict[str, tuple[Path, ContinualCLI]]:
    """Each method's uninterrupted seed-0 run: its folder and the CLI object (trained objects)."""
    out = tmp_path_factory.mktemp("straight_naive")
    # MC-SGD's is the session's (conftest: the same arguments as fit_args, shared with the signal and fault tests)
    return {"naive": (run_folder(out, 0), cli_main(fit_args("naive", out))), "mcsgd": mcsgd_digits_run}


@pytest.mark.parametrize("method", METHODS)
def test_run_crashed_after_a_task_resumes_to_the_same_results(method, straight, tmp_path):
    crash = ["--trainer.callbacks+=sequence_runs.CrashAtTaskStart", "--trainer.callbacks.task", "1",
             "--trainer.callbacks.only_fresh", "true"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli_main(fit_args(method, tmp_path, *crash))
    crashed = run_folder(tmp_path, 0)
    assert json.loads((crashed / "accuracy_matrix.json").read_text())["tasks_completed"] == 1

    # The documented resume command: the saved config (it still lists the crash callback, which
    # stays quiet in a resumed run) and the last checkpoint. It continues in the run's own folder.
    cli_main(["fit", "--config", str(crashed / "config.yaml"), "--ckpt_path", str(crashed / "checkpoints" / "last.ckpt")])
    resumed = run_folder(tmp_path, 0)
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]

    straight_run, straight_cli = straight[method]
    assert matrix_files(resumed) == matrix_files(straight_run)  # every digit printed, all rows
    assert len(matrix_files(resumed)) == (4 if method == "mcsgd" else 2)
    final = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    expected = torch.load(straight_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["state_dict"].keys() == expected["state_dict"].keys()
    for name, value in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][name], value), name
    if method == "mcsgd":
        state, expected_state = final["callbacks"]["MCSGD"], expected["callbacks"]["MCSGD"]
        assert torch.equal(state["w_bar"], expected_state["w_bar"]) and torch.equal(state["w_hat"], expected_state["w_hat"])
        assert state["memory"]["indices"].keys() == expected_state["memory"]["indices"].keys() == {0, 1, 2}
        for task, indices in expected_state["memory"]["indices"].items():
            assert torch.equal(state["memory"]["indices"][task], indices)


def _mcsgd(cli: ContinualCLI) -> MCSGD:
    return next(c for c in cli.trainer.callbacks if isinstance(c, MCSGD))


def test_same_seed_same_run_other_seed_other_run(straight, tmp_path):
    seed0_run, seed0 = straight["mcsgd"]
    again = cli_main(fit_args("mcsgd", tmp_path / "again", "--seed_everything", "0"))
    assert matrix_files(run_folder(tmp_path / "again", 0)) == matrix_files(seed0_run)
    assert torch.equal(again.datamodule.tasks.pixel_maps, seed0.datamodule.tasks.pixel_maps)
    for a, b in zip(again.model.parameters(), seed0.model.parameters()):
        assert torch.equal(a, b)

    other = cli_main(fit_args("mcsgd", tmp_path / "other", "--seed_everything", "1"))
    # task 1 is the identity in every seed; the other tasks' permutations change
    assert torch.equal(other.datamodule.tasks.pixel_maps[0, 0], seed0.datamodule.tasks.pixel_maps[0, 0])
    assert not torch.equal(other.datamodule.tasks.pixel_maps[0, 1:], seed0.datamodule.tasks.pixel_maps[0, 1:])
    memory, memory0 = _mcsgd(other).memory.indices, _mcsgd(seed0).memory.indices
    assert memory.keys() == memory0.keys() == {0, 1, 2}
    assert all(not torch.equal(memory[t], memory0[t]) for t in memory)
    other_matrix = json.loads((run_folder(tmp_path / "other", 0) / "accuracy_matrix.json").read_text())["matrix"]
    seed0_matrix = json.loads((seed0_run / "accuracy_matrix.json").read_text())["matrix"]
    assert other_matrix != seed0_matrix


def test_step_checkpoint_on_a_tasks_last_step_resumes_to_the_same_run(straight, tmp_path):
    # Tasks of 90 steps: every 90 steps falls on each task's last step, before its evaluation.
    steps = ["--checkpoint.every_n_train_steps", "90", "--checkpoint.save_top_k", "-1"]
    crash = ["--trainer.callbacks+=sequence_runs.CrashAtTaskStart", "--trainer.callbacks.task", "2",
             "--trainer.callbacks.only_fresh", "true"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli_main(fit_args("mcsgd", tmp_path, *steps, *crash))
    crashed = run_folder(tmp_path, 0)
    cli_main(["fit", "--config", str(crashed / "config.yaml"),
              "--ckpt_path", str(crashed / "checkpoints" / "epoch=1-step=180.ckpt")])
    resumed = run_folder(tmp_path, 0)
    straight_run, _ = straight["mcsgd"]
    assert matrix_files(resumed) == matrix_files(straight_run)  # row 2 evaluated, row 3 trained
    final = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    expected = torch.load(straight_run / "checkpoints" / "last.ckpt", weights_only=True)
    for name, value in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][name], value), name
    assert torch.equal(final["callbacks"]["MCSGD"]["w_bar"], expected["callbacks"]["MCSGD"]["w_bar"])
