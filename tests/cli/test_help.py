"""``--help`` of every command: says what the tool and the command do, lists only our choices, and
(analysis commands) fits a screen."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import yaml

from cl_lightning.cli.lightning_cli import HIDDEN_TRAINER_OPTIONS, cli_main, main

CONFIGS = Path(__file__).parents[2] / "configs"
COMMANDS = ["fit", "validate", "test", "grid", "report", "path", "sweep"]

#: Lines of a terminal screen: an analysis command's whole help fits on one.
SCREEN = 50
#: `fit --help` is Lightning's trainer options plus ours: 1518 lines before torch's module and optimizer classes
#: and the option-per-line usage were cut, 722 after; 781 before the trainer options that a task sequence sets
#: were left out and Lightning's long texts (ModelCheckpoint's, ckpt_path's, the links') replaced, 565 after
#: (80 columns). The bound leaves room for new options, not for class lists.
FIT_HELP_LINES = 600
#: What a researcher sets for a paper's runs: each must stay in `fit --help`.
KEY_OPTIONS = (
    "--config", "--print_config", "--seed_everything", "--seeds", "--model.net", "--model.lr", "--data.source",
    "--data.benchmark", "--data.num_tasks", "--data.epochs_per_task", "--data.batch_size", "--trainer.callbacks",
    "--trainer.callbacks.help", "--trainer.logger", "--trainer.accelerator", "--trainer.devices", "--trainer.strategy",
    "--trainer.num_nodes", "--trainer.precision", "--trainer.deterministic", "--trainer.gradient_clip_val",
    "--trainer.limit_train_batches", "--trainer.default_root_dir", "--checkpoint.dirpath",
    "--checkpoint.every_n_train_steps", "--ckpt_path",
)


@pytest.fixture(scope="module")
def fit_help() -> str:
    """`fit --help` as `cl-lightning fit --help | wc -l` sees it (80 columns, argparse's width off a terminal),
    run once for the tests that read it."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        env.setenv("COLUMNS", "80")
        cli_main(["fit", "--help"])
    assert exit_info.value.code == 0
    return out.getvalue()


def listed_options(help_out: str) -> set[str]:
    """The option strings that the help lists (an option line starts with two spaces and a dash)."""
    return {name for line in help_out.splitlines() if line.startswith("  -")
            for name in re.findall(r"--?[\w.]+", line.split("  ")[1])}


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


def test_fit_help_starts_with_what_to_do_and_lists_our_networks_only(fit_help):
    lines = fit_help.splitlines()
    out = "\n".join(lines)
    assert "cl-lightning fit --config configs/<method>/<benchmark>.yaml" in lines[0]
    assert "--print_config" in "\n".join(lines[:8])
    assert "known subclasses: cl_lightning.models.nets.MLP, cl_lightning.models.nets.ResNet18" in " ".join(out.split())
    for torch_class in ("torch.nn.Transformer", "torch.nn.Linear", "torchvision.models", "torch.optim.SGD"):
        assert torch_class not in out
    assert "--optimizer" not in out and "--lr_scheduler" not in out  # the module's own per-task SGD


def test_fit_help_is_short_and_lists_every_option_a_run_needs(fit_help):
    assert len(fit_help.splitlines()) <= FIT_HELP_LINES
    listed = listed_options(fit_help)
    assert not set(KEY_OPTIONS) - listed
    flat = " ".join(fit_help.split())
    assert "--trainer.callbacks.help <method>" in flat  # where a method's own options are
    assert "--> trainer.max_epochs [applied on parse] data.num_tasks * data.epochs_per_task" in flat


def test_fit_help_leaves_out_the_trainer_options_a_task_sequence_sets_and_names_them(fit_help):
    listed = listed_options(fit_help)
    hidden = {f"--trainer.{name}" for name in HIDDEN_TRAINER_OPTIONS}
    assert not hidden & listed and not {f"{option}.help" for option in hidden} & listed
    note = " ".join(fit_help.split("--trainer CONFIG")[0].split("Customize every aspect of training via flags:")[1].split())
    assert all(name in note for name in HIDDEN_TRAINER_OPTIONS) and "HIDDEN_TRAINER_OPTIONS" in note


def test_every_fit_option_has_a_description(fit_help):
    """An option whose help is only its type lost its docstring (docstring_parser read the wrong style, say)."""
    lines = fit_help.splitlines()
    for number, line in enumerate(lines):
        option = re.match(r"  (-\S.*?)(?: {2,}(\S.*))?$", line)
        if option:
            text = option.group(2) or lines[number + 1].strip()  # the help starts beside the option or below
            assert not text.startswith("("), f"{option.group(1)} has no description"


def test_hidden_trainer_options_still_parse_and_are_recorded(capsys):
    """Left out of the help only: a config (or an old run's config.yaml) that sets one keeps working."""
    out = help_text(cli_main, ["fit", "--config", str(CONFIGS / "naive" / "permuted_digits.yaml"), "--trainer.max_steps",
                               "7", "--trainer.use_distributed_sampler", "false", "--print_config"], capsys)
    trainer = yaml.safe_load(out)["trainer"]
    assert trainer["max_steps"] == 7 and trainer["use_distributed_sampler"] is False
    assert set(HIDDEN_TRAINER_OPTIONS) <= trainer.keys()


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
            if path.parent.name not in ("grids", "protocol")}
    assert nets == {"cl_lightning.models.nets.MLP", "cl_lightning.models.nets.ResNet18"}
    for config in ("naive/permuted_digits.yaml", "mcsgd/split_cifar100.yaml"):
        out = help_text(cli_main, ["fit", "--config", str(CONFIGS / config), "--print_config"], capsys)
        assert yaml.safe_load(out)["model"]["net"]["class_path"] in nets
