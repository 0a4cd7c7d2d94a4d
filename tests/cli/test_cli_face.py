"""The command line answers in one line: a mistake in the arguments names the valid choices and the
closest, no command lists every command, ``--version`` answers without torch, and evaluating a run
prints our table without Lightning's copies of it or warnings about what it did right."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from cli_runs import tiny_run_args

from cl_lightning.callbacks.saving import TaskCheckpoint
from cl_lightning.cli.console import COMMANDS
from cl_lightning.cli.lightning_cli import cli_main, main
from cl_lightning.methods.registry import registered_methods

ROOT = Path(__file__).parents[2]
MCSGD = str(ROOT / "configs" / "mcsgd" / "permuted_digits.yaml")
METHOD_NAMES = [method.__name__ for method in registered_methods()]


def refusal(argv: list[str], capsys) -> list[str]:
    """The lines the command line prints when it refuses ``argv`` (exit status 2)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.splitlines()


def error_line(argv: list[str], capsys) -> str:
    """The refusal's error, which must be its last line and its only one after the usage and the tip."""
    lines = refusal(argv, capsys)
    assert [line.split(":")[0] for line in lines] == ["usage", "tip", "error"], lines
    return lines[-1]


def typo_in_callback_config(tmp_path: Path) -> str:
    config = yaml.safe_load(Path(MCSGD).read_text())
    config["trainer"]["callbacks"][0]["class_path"] = "cl_lightning.methods.mcsgd.MCSDG"
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("where", ["command line", "config"])
def test_an_unknown_method_class_names_the_methods_and_the_closest(where, capsys, tmp_path):
    argv = ["fit", "--config", MCSGD, "--trainer.callbacks+=MCSDG"] if where == "command line" else \
        ["fit", "--config", typo_in_callback_config(tmp_path)]
    line = error_line(argv, capsys)
    assert "unknown class" in line and "MCSDG" in line and "(did you mean MCSGD?)" in line
    assert all(name in line for name in METHOD_NAMES)


def test_an_unknown_network_class_names_the_networks(capsys):
    line = error_line(["fit", "--config", MCSGD, "--model.net", "MLPP"], capsys)
    assert line == "error: model.net: unknown class 'MLPP' (did you mean MLP?); one of MLP, ResNet18"


def test_a_refused_method_option_names_the_option_the_value_and_what_is_allowed(capsys):
    line = error_line(["fit", "--config", MCSGD, "--trainer.callbacks.init_args.lr", "-1"], capsys)
    assert line == "error: --trainer.callbacks.init_args.lr -1 refused: MCSGD's lr takes PositiveFloat (v>0) or list[PositiveFloat]"
    line = error_line(["fit", "--config", MCSGD, "--trainer.callbacks.steps", "foo"], capsys)
    assert line == "error: --trainer.callbacks.init_args.steps foo refused: MCSGD's steps takes one of 'minibatch', 'full_batch'"


def test_a_misspelled_method_option_suggests_the_closest(capsys):
    line = error_line(["fit", "--config", MCSGD, "--trainer.callbacks.init_args.alpa0", "0.1"], capsys)
    assert line == ("error: --trainer.callbacks.init_args.alpa0: MCSGD has no option 'alpa0' (did you mean alpha0?); "
                    "--trainer.callbacks.help MCSGD lists them")


@pytest.mark.parametrize(("option", "closest"), [("--data.num_task", "--data.num_tasks"), ("--model.lrr", "--model.lr")])
def test_a_misspelled_option_suggests_the_closest(option, closest, capsys):
    line = error_line(["fit", "--config", MCSGD, option, "5"], capsys)
    assert line == f"error: unrecognized arguments: {option} 5 (did you mean {closest}?)"


def test_a_misspelled_linked_setting_suggests_it_and_it_says_how_to_set_it(capsys):
    line = error_line(["fit", "--config", MCSGD, "--trainer.max_epoch", "5"], capsys)
    assert line == "error: unrecognized arguments: --trainer.max_epoch 5 (did you mean --trainer.max_epochs?)"
    line = error_line(["fit", "--config", MCSGD, "--trainer.max_epochs", "5"], capsys)
    assert line == ("error: trainer.max_epochs follows from data.num_tasks, data.epochs_per_task (sequence_trainer_settings) "
                    "and cannot be set: set data.num_tasks and data.epochs_per_task instead")


def test_a_misspelled_key_in_a_config_suggests_the_closest(capsys, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(Path(MCSGD).read_text().replace("num_tasks:", "num_task:"))
    line = error_line(["fit", "--config", str(config)], capsys)
    assert line == "error: Subcommand 'fit' does not accept option 'data.num_task' (did you mean 'data.num_tasks'?)"


def test_the_usage_tip_names_the_commands_help(capsys):
    lines = refusal(["fit", "--config", MCSGD, "--model.lrr", "0.1"], capsys)
    assert lines[1] == "tip: For details of accepted options run: cl-lightning fit --help"


def test_no_command_prints_the_overview_of_all_seven(capsys):
    lines = refusal([], capsys)
    listed = [line.split()[0] for line in lines[lines.index("commands:") + 1:] if line.startswith("  ")]
    assert listed == list(COMMANDS) == ["fit", "validate", "test", "grid", "report", "path", "sweep"]
    assert not any('expected "subcommand"' in line for line in lines)


def test_an_unknown_command_suggests_the_closest_of_all_seven(capsys):
    line = error_line(["fitt"], capsys)
    assert line == "error: unknown command 'fitt' (did you mean fit?); commands: fit, validate, test, grid, report, path, sweep"


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"cl-lightning {importlib.metadata.version('cl_lightning')}\n"


@pytest.mark.slow
def test_the_entry_point_answers_version_without_importing_torch():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="cl-lightning")
    module, function = script.value.split(":")
    code = (f"import sys\nfrom {module} import {function}\ntry:\n    {function}(['--version'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, 'lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"cl-lightning {importlib.metadata.version('cl_lightning')}", "False False"]


def test_fit_help_says_where_the_method_options_are(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    head = " ".join(capsys.readouterr().out.split("options:")[0].split())
    assert f"--trainer.callbacks.help <method>, one of {', '.join(METHOD_NAMES)}" in head


@pytest.mark.parametrize("monitor", [None, "val/acc/task_01"])
def test_a_checkpoint_loaded_into_another_folder_warns_only_with_a_ranking(monitor, tmp_path):
    """Lightning's "dirpath has changed" is about the top-k ranking's state: without a monitor there is none."""
    written = TaskCheckpoint(dirpath=tmp_path / "run" / "checkpoints", monitor=monitor).state_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TaskCheckpoint(dirpath=tmp_path / "member" / "checkpoints", monitor=monitor).load_state_dict(written)
    assert any("dirpath has changed" in str(w.message) for w in caught) == (monitor is not None)


@pytest.fixture(scope="module")
def population(mnist_root: Path, tmp_path_factory) -> Path:
    """A finished 2-task population of seeds 0 and 3: its run folder."""
    out = tmp_path_factory.mktemp("population")
    cli_main(["fit", *tiny_run_args("naive/permuted_mnist.yaml", mnist_root, out, tasks=2), "--seeds", "[0,3]"])
    return out / "lightning_logs" / "version_0"


def member_folder(run: Path, seed: int) -> Path:
    """A member's folder: inside the run folder, or beside it (the layout before populations moved inside)."""
    inside = run / f"seed_{seed}"
    return inside if inside.is_dir() else run.parent / f"seed_{seed}"


def test_testing_a_member_prints_our_table_only_and_warns_nothing(population, capsys, recwarn):
    member = member_folder(population, 3)
    cli_main(["test", "--config", str(member / "config.yaml"), "--ckpt_path", str(population / "checkpoints" / "last.ckpt")])
    out = capsys.readouterr().out
    assert "Test accuracy (%) of this model on every task" in out and "DataLoader" not in out
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "population_member" in m or "dirpath has changed" in m], messages


def test_lightnings_test_tables_can_be_asked_for(population, capsys):
    member = member_folder(population, 3)
    cli_main(["test", "--config", str(member / "config.yaml"), "--ckpt_path", str(population / "checkpoints" / "last.ckpt"),
              "--verbose", "true"])
    assert "DataLoader 1" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["validate", "test"])
def test_lightnings_tables_are_off_by_default_and_can_be_asked_for(command, capsys):
    def verbose(*extra: str) -> bool:
        with pytest.raises(SystemExit):
            cli_main([command, "--config", MCSGD, *extra, "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)["verbose"]

    assert verbose() is False and verbose("--verbose", "true") is True
