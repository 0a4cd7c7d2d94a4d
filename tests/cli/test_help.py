"""``--help`` of every command: says what the tool and the command do, lists only our choices, and
(analysis commands) fits a screen."""

from pathlib import Path

import pytest
import yaml

from cl_lightning.cli import cli_main, main

CONFIGS = Path(__file__).parents[2] / "configs"
COMMANDS = ["fit", "validate", "test", "grid", "report", "path", "sweep"]

#: Lines of a terminal screen: an analysis command's whole help fits on one.
SCREEN = 50
#: `fit --help` is Lightning's trainer options plus ours: 1518 lines before torch's module and optimizer classes
#: and the option-per-line usage were cut, 722 after. The bound leaves room for new options, not for class lists.
FIT_HELP_LINES = 800


def help_text(run, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_describes_the_tool_and_lists_our_commands(capsys):
    out = help_text(main, ["--help"], capsys)
    lines = out.splitlines()
    assert "Continual learning on task sequences" in out and "README.md" in out
    listed = [line.split()[0] for line in lines[lines.index("commands:") + 1:]]
    assert listed == COMMANDS
    assert "predict" not in out and "Lightning Trainer command line tool" not in out


def test_no_command_names_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert f"(commands: {', '.join(COMMANDS)})" in capsys.readouterr().err


def test_predict_is_not_a_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(CONFIGS / "naive" / "permuted_digits.yaml")])
    assert exit_info.value.code == 2 and "predict" in capsys.readouterr().err


def test_fit_help_starts_with_what_to_do_and_lists_our_networks_only(capsys):
    lines = help_text(cli_main, ["fit", "--help"], capsys).splitlines()
    out = "\n".join(lines)
    assert "cl-lightning fit --config configs/<method>/<benchmark>.yaml" in lines[0]
    assert "--print_config" in "\n".join(lines[:8])
    assert "known subclasses: cl_lightning.models.nets.MLP, cl_lightning.models.nets.ResNet18" in " ".join(out.split())
    for torch_class in ("torch.nn.Transformer", "torch.nn.Linear", "torchvision.models", "torch.optim.SGD"):
        assert torch_class not in out
    assert "--optimizer" not in out and "--lr_scheduler" not in out  # the module's own per-task SGD
    assert len(lines) < FIT_HELP_LINES


@pytest.mark.parametrize("command", ["validate", "test"])
def test_evaluation_help_says_to_give_the_run_config_and_checkpoint(command, capsys):
    first = help_text(cli_main, [command, "--help"], capsys).splitlines()[0]
    assert f"cl-lightning {command} --config <run>/config.yaml --ckpt_path <checkpoint>" in first


@pytest.mark.parametrize("command", ["grid", "report", "path", "sweep"])
def test_analysis_command_help_fits_a_screen(command, capsys):
    out = help_text(main, [command, "--help"], capsys)
    assert len(out.splitlines()) <= SCREEN
    assert "<function" not in out and "<class" not in out


def test_path_help_shows_the_split_choices_and_points_to_fit_for_overrides(capsys):
    out = " ".join(help_text(main, ["path", "--help"], capsys).split())
    assert "Literal['train', 'val', 'test']" in out
    assert "--model.lr" not in out and "cl-lightning fit --help" in out


def test_path_still_takes_model_and_data_overrides(capsys):
    """The options hidden from ``path --help`` still parse (here: refused by their own type)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["path", "--config", str(CONFIGS / "naive" / "permuted_digits.yaml"), "--data.num_tasks", "0",
              "--solutions", "1", "2"])
    assert exit_info.value.code == 2 and "data.num_tasks" in capsys.readouterr().err


def test_every_shipped_network_is_one_the_model_offers(capsys):
    """``net`` is typed with our networks only: every shipped config's network must be one of them."""
    nets = {yaml.safe_load(path.read_text())["model"]["net"]["class_path"] for path in CONFIGS.glob("*/*.yaml")
            if path.parent.name != "grids"}
    assert nets == {"cl_lightning.models.nets.MLP", "cl_lightning.models.nets.ResNet18"}
    for config in ("naive/permuted_digits.yaml", "mcsgd/split_cifar100.yaml"):
        out = help_text(cli_main, ["fit", "--config", str(CONFIGS / config), "--print_config"], capsys)
        assert yaml.safe_load(out)["model"]["net"]["class_path"] in nets
