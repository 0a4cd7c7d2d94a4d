"""The HParams columns chosen from the configs this project ships (the CLI's run is in tests/cli/test_tensorboard.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import backend_context, plugin_data_pb2

from cl_lightning.cli.hparams import log_row, population_rows, science
from cl_lightning.cli.lightning_cli import cli_main

CONFIGS = Path(__file__).parents[2] / "configs"
SCREENSHOTS = Path(__file__).parents[2] / "docs" / "screenshots.py"


def parsed(config: str, *extra: str) -> dict:
    """The config as LightningCLI resolves it (defaults filled in), via ``--print_config``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIGS / config), *extra, "--print_config"])
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize(("config", "method"), [("naive/permuted_digits.yaml", "naive"),
                                                ("multitask/permuted_digits.yaml", "multitask"),
                                                ("ewc/permuted_digits.yaml", "EWC")])
def test_method_named_from_its_callback_or_the_data(config, method):
    assert science(parsed(config))["method"] == method


def test_benchmark_settings_only_for_their_benchmark():
    rotated = science(parsed("naive/permuted_digits.yaml", "--data.benchmark", "rotated"))
    assert rotated["sequence/degrees_per_task"] == 9.0 and "sequence/classes_per_task" not in rotated
    assert "sequence/degrees_per_task" not in science(parsed("naive/permuted_digits.yaml"))


def test_every_column_is_a_scalar_tensorboard_accepts():
    columns = science(parsed("mcsgd/permuted_digits.yaml"))
    assert all(isinstance(v, (int, float, str, bool)) for v in columns.values())
    assert columns["method/memory_per_class"] == "None" and columns["model/net/hidden_sizes"] == "[256, 256]"


def shown_columns(folder: Path) -> list[str]:
    """The HParams columns of the run logged in ``folder``, in the order TensorBoard gives its HParams pane (its
    own sort of the logged experiment summary: differing columns first, then by name); the pane shows the first five."""
    content = EventAccumulator(str(folder)).Reload().PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    backend_context._sort_and_reduce_to_hparams_limit(experiment)
    return [info.name for info in experiment.hparam_infos]


def test_population_rows_put_the_columns_that_differ_first():
    configs = [parsed("mcsgd/permuted_digits.yaml", "--seed_everything", str(seed), "--model.lr", str(lr))
               for seed, lr in ((0, 0.1), (1, 0.05))]
    rows, differs = population_rows(configs)
    assert differs == ["model/lr", "seed"]
    assert [list(row)[:2] for row in rows] == [["model/lr", "seed"]] * 2
    assert rows[1] == science(configs[1]) and list(rows[1])[2:] == [c for c in science(configs[1]) if c not in differs]


def test_the_columns_flagged_as_differing_are_the_first_tensorboard_shows(tmp_path):
    row = science(parsed("mcsgd/permuted_digits.yaml"))
    for version, differs in (("run", ["seed", "model/lr"]), ("plain", [])):
        logger = TensorBoardLogger(tmp_path, name="", version=version)
        log_row(logger, row, differs)
        logger.finalize("success")
    assert shown_columns(tmp_path / "run")[:2] == ["model/lr", "seed"]
    assert shown_columns(tmp_path / "plain") == sorted(row)  # nothing differs: by name, as TensorBoard orders them


@pytest.mark.slow
def test_a_populations_members_show_their_differing_settings_first(tmp_path):
    """Before, the five columns shown (method, method/alpha0, method/backend, ...) were equal across the members."""
    cli_main(["fit", "--config", str(CONFIGS / "mcsgd" / "permuted_digits.yaml"), "--seeds", "[0,1]", "--model.lr", "[0.1,0.05]",
              "--data.num_tasks", "2", "--data.train_examples_per_task", "200", "--trainer.logger.init_args.save_dir",
              str(tmp_path), "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--accuracy_matrix.print_table", "false"])
    members = [Path(folder) for folder in json.loads(next(tmp_path.rglob("members.json")).read_text())["folders"]]
    for member in members:
        assert shown_columns(member)[:2] == ["model/lr", "seed"]


class Server:
    """Stands for the TensorBoard process ``docs/screenshots.py`` serves the runs with."""

    def terminate(self) -> None:
        pass

    def wait(self) -> None:
        pass


@pytest.mark.parametrize("out", [None, "shots"])
def test_screenshots_are_written_into_the_folder_given_with_out(tmp_path, monkeypatch, out):
    """``docs/screenshots.py`` (HParams and Images tabs) writes docs/images only by default; its fits,
    TensorBoard and Chromium are stood in for, so nothing is written but the paths are recorded."""
    spec = importlib.util.spec_from_file_location("screenshots", SCREENSHOTS)
    screenshots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshots)
    written: list[Path] = []
    monkeypatch.setattr(screenshots, "fit", lambda folder, tasks, alpha0: folder / f"alpha0_{alpha0}")
    monkeypatch.setattr(screenshots, "save_last_heatmap", lambda run, path: written.append(path))
    monkeypatch.setattr(screenshots, "serve", lambda logdir, port: Server())
    monkeypatch.setattr(screenshots, "screenshot", lambda chromium, url, path: written.append(path))
    screenshots.main([] if out is None else ["--out", str(tmp_path / out)])
    folder = screenshots.IMAGES if out is None else tmp_path / out
    assert sorted(p.name for p in written) == ["accuracy_matrix_heatmap.png", *sorted(screenshots.TABS)]
    assert {p.parent for p in written} == {folder}
