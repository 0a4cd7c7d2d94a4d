"""One run-folder layout in which no fit writes over another's results, and records that say what ran.

Every ``fit`` gets a new run folder (``version_N``, or the folder it names, which must not hold a
run); a population's members write inside it (``seed_<n>/``) or into ``--member_dirs`` that hold no
run; a resume continues its own folder; ``test`` and ``validate`` write into the run they evaluate.
Each refused input leaves a folder that holds results byte-identical and creates nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from cli_runs import hparams_of
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from user_errors import user_error

from cl_lightning.cli.lightning_cli import cli_main, main

CONFIGS = Path(__file__).parents[2] / "configs"
MCSGD = str(CONFIGS / "mcsgd" / "permuted_digits.yaml")
EWC = str(CONFIGS / "ewc" / "permuted_digits.yaml")
NAIVE = str(CONFIGS / "naive" / "permuted_digits.yaml")


def fit_args(config: str, save_dir: Path, *extra: str, tasks: int = 2) -> list[str]:
    return ["fit", "--config", config, "--data.num_tasks", str(tasks), "--trainer.logger.init_args.save_dir", str(save_dir),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--accuracy_matrix.print_table", "false", *extra]


def tree(folder: Path) -> dict[str, str]:
    """Every file and folder below ``folder``: its digest (a folder: ``dir``)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def population(tmp_path_factory) -> Path:
    """The save_dir of a finished 2-task MC-SGD population of seeds 0 and 1 (``lightning_logs/version_0``)."""
    save_dir = tmp_path_factory.mktemp("population")
    main(fit_args(MCSGD, save_dir, "--seeds", "[0,1]"))
    return save_dir


@pytest.fixture
def results(population: Path, tmp_path: Path) -> Path:
    """A copy of the population's save_dir for one test to run commands against."""
    return Path(shutil.copytree(population, tmp_path / "results"))


def test_a_population_writes_its_members_inside_its_own_run_folder(population: Path) -> None:
    run = population / "lightning_logs" / "version_0"
    assert sorted(p.name for p in (population / "lightning_logs").iterdir()) == ["version_0"]
    for k, seed in enumerate((0, 1)):
        member = run / f"seed_{seed}"
        assert json.loads((member / "accuracy_matrix.json").read_text())["tasks_completed"] == 2
        assert json.loads((member / "population.json").read_text())["population"] == str(run)
    # the population's own run in TensorBoard is not empty: the members' mean summaries
    assert "cl/average_accuracy" in EventAccumulator(str(run)).Reload().Tags()["scalars"]


def test_a_second_population_in_the_same_folder_gets_a_folder_of_its_own(results: Path) -> None:
    before = tree(results / "lightning_logs" / "version_0")
    main(fit_args(MCSGD, results, "--seeds", "[0,1]", "--model.lr", "0.05"))
    assert tree(results / "lightning_logs" / "version_0") == before
    second = results / "lightning_logs" / "version_1"
    for seed in (0, 1):
        assert yaml.safe_load((second / f"seed_{seed}" / "config.yaml").read_text())["model"]["lr"] == 0.05


@pytest.mark.parametrize("extra, expected", [
    pytest.param([EWC, "--seeds", "[0,1]", "--trainer.callbacks.init_args.lam", "[1,2,3]"],
                 "lam has 3 values but the population has 2 member(s)", id="per-member list of the wrong length"),
    pytest.param([MCSGD, "--seeds", "[0,1]", "--trainer.callbacks.init_args.alpha0", "[0.1,0.2,0.3]"],
                 "alpha0 has 3 values but the population has 2 member(s)", id="method list of the wrong length"),
    pytest.param([MCSGD, "--model.lr", "inf"], "model.lr", id="lr inf"),
    pytest.param([MCSGD, "--seeds", "[-1]"], "--seeds has -1, which is not a seed", id="negative seed in seeds"),
    pytest.param([MCSGD, "--seed_everything", "-1"], "--seed_everything has -1, which is not a seed", id="negative seed"),
    pytest.param([MCSGD, "--seeds", "[0,4294967296]"], "not a seed: give integers from 0 to 4294967295", id="seed too large"),
    pytest.param([MCSGD, "--seeds", "[0,1]", "--trainer.logger.init_args.version", "version_0"],
                 "already holds a run", id="a new fit naming a run's folder"),
    pytest.param([NAIVE, "--trainer.logger.init_args.version", "version_0/seed_1"],
                 "already holds a run", id="a plain run into a member's folder"),
])
def test_a_refused_run_leaves_a_folder_with_results_byte_identical(results: Path, extra: list[str], expected: str) -> None:
    before = tree(results)
    config, *options = extra
    message = user_error(fit_args(config, results, *options))
    assert expected in message and "\n" not in message
    assert tree(results) == before  # nothing changed, nothing created


def test_member_folders_holding_a_run_are_refused(results: Path) -> None:
    before = tree(results)
    taken = results / "lightning_logs" / "version_0" / "seed_1"
    message = user_error(fit_args(MCSGD, results, "--seeds", "[0,1]", "--member_dirs",
                                  json.dumps([str(results / "new" / "seed_0"), str(taken)])))
    assert f"the member folder {taken} already holds a run" in message
    assert tree(results) == before


def test_member_folders_under_a_file_are_refused_before_anything_is_made(results: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    before = tree(results)
    message = user_error(fit_args(MCSGD, results, "--seeds", "[0,1]", "--member_dirs",
                                  json.dumps([str(blocker / "seed_0"), str(blocker / "seed_1")])))
    assert f"{blocker} is a file, not a folder" in message and "--member_dirs" in message
    assert tree(results) == before


@pytest.mark.slow
def test_a_resume_continues_in_its_own_folder(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(fit_args(NAIVE, tmp_path, "--trainer.callbacks+=sequence_runs.CrashAtTaskStart", "--trainer.callbacks.task", "2",
                      "--trainer.callbacks.only_fresh", "true", tasks=3))
    run = tmp_path / "lightning_logs" / "version_0"
    config = (run / "config.yaml").read_text()
    main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    assert json.loads((run / "accuracy_matrix.json").read_text())["tasks_completed"] == 3
    assert (run / "config.yaml").read_text() == config  # the run's own config is kept


@pytest.mark.slow
def test_validate_evaluates_every_task_seen_in_the_runs_folder(tmp_path: Path, capsys) -> None:
    main(fit_args(NAIVE, tmp_path, tasks=3))
    run = tmp_path / "lightning_logs" / "version_0"
    before = tree(run)
    capsys.readouterr()
    cli = cli_main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                    "--accuracy_matrix.print_table", "true"])
    logged = sorted(k for k in cli.trainer.callback_metrics if k.startswith("val/acc/task_"))
    assert logged == ["val/acc/task_01", "val/acc/task_02", "val/acc/task_03"]
    matrix = json.loads((run / "accuracy_matrix.json").read_text())["matrix"]
    assert float(cli.trainer.callback_metrics["val/acc/task_02"]) == pytest.approx(matrix[2][1], abs=1e-4)
    printed = capsys.readouterr()
    assert "steps in" not in printed.err  # no training line about a task it did not train
    assert "on the 3 task(s) it has seen:" in printed.out and f"T2 {matrix[2][1]:.1f}" in printed.out
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]  # no new folder
    assert {k: v for k, v in tree(run).items() if k in before} == before  # the training's files untouched


@pytest.mark.slow
def test_a_population_of_one_records_the_seed_it_trains(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO):
        main(fit_args(NAIVE, tmp_path, "--seeds", "[3]"))
    assert "Seed set to 3" in caplog.text and "Seed set to 0" not in caplog.text
    run = tmp_path / "lightning_logs" / "version_0"
    assert yaml.safe_load((run / "config.yaml").read_text())["seed_everything"] == 3
    values, _ = hparams_of(EventAccumulator(str(run)).Reload())
    assert values["seed"] == 3


def test_grid_refuses_a_root_it_cannot_write_and_a_bad_seed_before_anything_runs(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    grid = ["grid", "--methods", "naive", "--benchmarks", "permuted_digits", "--configs", str(CONFIGS)]
    message = user_error([*grid, "--seeds", "0", "--root", str(blocker / "runs")])
    assert f"{blocker} is a file, not a folder" in message and "--root" in message
    with pytest.raises(SystemExit) as info:
        main([*grid, "--seeds", "0", "-1", "--root", str(tmp_path / "runs")])
    assert info.value.code == 2 and "--seeds must be integers from 0 to 4294967295" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
