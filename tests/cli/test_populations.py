"""A population from the command line: ``fit --seeds [...]`` trains the members in one fit, each
member's folder holds what a plain run with its seed and settings writes, and the member's own
config.yaml re-runs it alone to the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_runs import hparams_of, tiny_run_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from user_errors import user_error

from cl_lightning.cli.lightning_cli import cli_main
from cl_lightning.evaluation.accuracy_matrix import AccuracyMatrix

SEEDS = [0, 3]


@pytest.fixture(scope="module")
def population(mnist_root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("population")
    cli_main(["fit", *tiny_run_args("naive/permuted_mnist.yaml", mnist_root, out), "--seeds", "[0,3]",
              "--model.lr", "[0.1,0.05]"])
    return out / "lightning_logs"


@pytest.mark.slow
def test_members_write_what_a_plain_run_writes(population: Path) -> None:
    members = json.loads((population / "version_0" / "members.json").read_text())
    assert members["seeds"] == SEEDS and (population / "version_0" / "checkpoints" / "last.ckpt").exists()
    for k, seed in enumerate(SEEDS):
        folder = population / "version_0" / f"seed_{seed}"  # inside the population's own run folder
        assert members["folders"][k] == str(folder)
        record = json.loads((folder / "accuracy_matrix.json").read_text())
        assert record["tasks_completed"] == 3 and record["matrix"][0][0] > 50
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["seed_everything"] == seed and config["seeds"] is None
        assert config["trainer"]["logger"]["init_args"]["version"] is None  # re-run alone: a new folder
        assert config["model"]["lr"] == [0.1, 0.05][k]
        assert json.loads((folder / "population.json").read_text())["member"] == k
        events = EventAccumulator(str(folder)).Reload()
        assert {"val/acc/task_01", "cl/average_accuracy", "matrix/task_02", "train/loss"} <= set(events.Tags()["scalars"])
        values, _ = hparams_of(events)
        assert values["seed"] == seed and values["model/lr"] == [0.1, 0.05][k]


@pytest.mark.slow
def test_a_members_config_reruns_it_alone_to_the_same_numbers(population: Path, tmp_path: Path) -> None:
    folder = population / "version_0" / "seed_3"
    cli_main(["fit", "--config", str(folder / "config.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    solo = json.loads((tmp_path / "lightning_logs" / "version_0" / "accuracy_matrix.json").read_text())
    member = json.loads((folder / "accuracy_matrix.json").read_text())
    assert solo["matrix"] == member["matrix"]  # bitwise: the same floats


def test_a_setting_list_of_the_wrong_length_is_refused(mnist_root: Path, tmp_path: Path) -> None:
    message = user_error(["fit", *tiny_run_args("naive/permuted_mnist.yaml", mnist_root, tmp_path), "--seeds", "[0,1,2]",
                          "--model.lr", "[0.1,0.05]"])
    assert "model.lr has 2 values but the population has 3 member(s)" in message


@pytest.mark.slow
def test_test_evaluates_a_member_from_the_populations_checkpoint(population: Path, tmp_path: Path) -> None:
    run = population / "version_0"
    checkpoint = run / "checkpoints" / "last.ckpt"
    matrix_file = (run / "seed_3" / "accuracy_matrix.json").read_text()
    cli_main(["test", "--config", str(run / "seed_3" / "config.yaml"), "--ckpt_path", str(checkpoint)])
    member = json.loads((run / "seed_3" / "test_accuracy.json").read_text())  # in the member's folder
    matrix = json.loads(matrix_file)["matrix"]
    assert member["accuracy"] == pytest.approx(matrix[2], abs=1e-9)  # the model kept after task 3
    # the whole population at once: each member's test_accuracy.json in its folder, the training's files kept
    (run / "seed_3" / "test_accuracy.json").unlink()
    cli_main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(checkpoint)])
    both = json.loads((run / "seed_3" / "test_accuracy.json").read_text())
    assert both["accuracy"] == member["accuracy"]
    assert (run / "seed_3" / "accuracy_matrix.json").read_text() == matrix_file
    assert sorted(p.name for p in population.iterdir()) == ["version_0"]  # no new run folder


@pytest.mark.slow
def test_resuming_one_member_of_a_population_is_refused_with_the_fix(population: Path, tmp_path: Path) -> None:
    checkpoint = population / "version_0" / "checkpoints" / "last.ckpt"
    message = user_error(["fit", "--config", str(population / "version_0" / "seed_3" / "config.yaml"), "--ckpt_path", str(checkpoint),
                          "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert "seeds: checkpoint [0, 3]" in message
    assert f"cl-lightning fit --config {population / 'version_0' / 'config.yaml'} --ckpt_path {checkpoint}" in message


def test_a_repeated_seed_needs_member_dirs(mnist_root: Path, tmp_path: Path) -> None:
    args = [*tiny_run_args("naive/permuted_mnist.yaml", mnist_root, tmp_path), "--seeds", "[0,0]", "--model.lr", "[0.1,0.05]"]
    message = user_error(["fit", *args])
    assert "repeat a seed" in message and "--member_dirs" in message
    assert "one folder per member" in user_error(["fit", *args, "--member_dirs", f"[{tmp_path / 'a'}]"])
    assert "name a folder twice" in user_error(["fit", *args, "--member_dirs", f"[{tmp_path / 'a'},{tmp_path / 'a'}]"])


@pytest.mark.slow
def test_settings_on_one_seed_train_together_into_named_folders(mnist_root: Path, tmp_path: Path) -> None:
    """Two learning rates on seed 3 in one population, each member in the folder it was given (as
    ``sweep`` packs settings); member k is its plain run with that lr, bitwise."""
    folders = [tmp_path / "sweep" / "naive[lr=0.1]" / "seed_3", tmp_path / "sweep" / "naive[lr=0.05]" / "seed_3"]
    cli_main(["fit", *tiny_run_args("naive/permuted_mnist.yaml", mnist_root, tmp_path / "population"), "--seeds", "[3,3]",
              "--model.lr", "[0.1,0.05]", "--member_dirs", json.dumps([str(f) for f in folders])])  # JSON: names hold brackets
    population = tmp_path / "population" / "lightning_logs" / "version_0"
    assert json.loads((population / "members.json").read_text())["folders"] == [str(f) for f in folders]
    matrices = []
    for k, folder in enumerate(folders):
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["model"]["lr"] == [0.1, 0.05][k] and config["member_dirs"] is None and config["seed_everything"] == 3
        assert "cl/average_accuracy" in EventAccumulator(str(folder)).Reload().Tags()["scalars"]
        matrices.append(json.loads((folder / "accuracy_matrix.json").read_text())["matrix"])
    assert matrices[0] != matrices[1]  # the same seed, another lr: another run
    cli_main(["fit", "--config", str(folders[1] / "config.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path / "solo")])
    assert json.loads((tmp_path / "solo" / "lightning_logs" / "version_0" / "accuracy_matrix.json").read_text())["matrix"] == matrices[1]
    # the member's config names its place in the population: test takes its weights from the population's checkpoint
    checkpoint = str(population / "checkpoints" / "last.ckpt")
    config = (folders[1] / "config.yaml").read_text()
    cli = cli_main(["test", "--config", str(folders[1] / "config.yaml"), "--ckpt_path", checkpoint])  # into the member's folder
    tested = json.loads((folders[1] / "test_accuracy.json").read_text())["accuracy"]
    assert tested == pytest.approx(matrices[1][2], abs=1e-9)  # the model kept after task 3
    assert (folders[1] / "config.yaml").read_text() == config  # the training's config is kept
    stored = next(c for c in cli.trainer.callbacks if isinstance(c, AccuracyMatrix)).matrix[0]  # its matrix, not member 0's
    assert stored.nan_to_num(-1).tolist() == [[-1 if v is None else v for v in row] for row in matrices[1]]
    message = user_error(["test", "--config", str(folders[1] / "config.yaml"), "--ckpt_path", checkpoint,
                          "--model.population_member", "5", "--trainer.logger.init_args.save_dir", str(tmp_path / "v")])
    assert "population_member 5 is not the member with seed 3" in message
    # without it (a config written by hand) the seed alone cannot say which member: the message says what to do
    message = user_error(["test", "--config", str(folders[1] / "config.yaml"), "--ckpt_path", checkpoint,
                          "--model.population_member", "null", "--trainer.logger.init_args.save_dir", str(tmp_path / "u")])
    assert "holds seed 3 more than once" in message and "model.population_member" in message
