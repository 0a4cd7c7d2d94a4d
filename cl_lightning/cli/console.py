"""``cl-lightning``'s entry point and face: what the tool is, its commands and its version.

These answers, and the refusal of an unknown command, import neither torch nor Lightning (seconds on
a busy machine, for a line of text). A command imports what it needs only: an extra command (grid,
report, path, sweep) its own module, which parses its arguments before loading torch or matplotlib;
a trainer command :func:`cl_lightning.cli.lightning_cli.run`, with torch and Lightning.
"""

from __future__ import annotations

import difflib
import importlib
import sys
import textwrap
from collections.abc import Sequence

from cl_lightning.errors import user_errors_in_one_line

#: What ``cl-lightning --help`` says the tool is, before its list of commands.
DESCRIPTION = (
    "Continual learning on task sequences with PyTorch Lightning: MC-SGD (Mirzadeh et al., ICLR 2021) and its "
    "baselines on permuted/rotated MNIST, Fashion-MNIST and split CIFAR-100, run, resumed, compared and analysed. "
    "See README.md; each command's options: cl-lightning <command> --help."
)

#: LightningCLI's commands that a task sequence uses: name -> (usage line, what it does, where to start).
#: The usage line stands for Lightning's ~90-line list of every option, which the help lists below anyway.
TRAINER_COMMANDS = {
    "fit": (
        "cl-lightning fit --config configs/<method>/<benchmark>.yaml [--<section>.<option> VALUE ...]",
        "train a method on a whole task sequence (or resume it with --ckpt_path <run>/checkpoints/last.ckpt)",
        "Start from a shipped config; options below override it (--print_config shows the result).",
    ),
    "validate": (
        "cl-lightning validate --config <run>/config.yaml --ckpt_path <checkpoint> [--<section>.<option> VALUE ...]",
        "evaluate a checkpoint on the tasks it has seen, on the validation split (test split if data.val_fraction is 0)",
        "Give the run's own config.yaml (next to its checkpoints/); --print_config shows the resolved config",
    ),
    "test": (
        "cl-lightning test --config <run>/config.yaml --ckpt_path <checkpoint> [--<section>.<option> VALUE ...]",
        "evaluate a checkpoint on every task's test split",
        "Give the run's own config.yaml (next to its checkpoints/); --print_config shows the resolved config",
    ),
}

#: Commands beside LightningCLI's: name -> (module with ``main(argv)``, what it does).
EXTRA_COMMANDS = {
    "grid": ("cl_lightning.launch.grid", "run methods x benchmarks x seeds into <root>/<benchmark>/<method>/seed_<n>/"),
    "report": ("cl_lightning.analysis.report", "the paper's table (mean ± std, 95 % interval) over seeds, methods against MC-SGD, plots"),
    "path": ("cl_lightning.analysis.linear_path", "loss and accuracy along the line between two solutions"),
    "sweep": ("cl_lightning.sweep.run", "a grid of settings x seeds on Ray Tune, selected on validation, best config on test seeds"),
}

#: Every command, in the order the overview lists them.
COMMANDS = (*TRAINER_COMMANDS, *EXTRA_COMMANDS)


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point of ``cl-lightning`` (and the in-process one of tests and scripts):
    ``--help``, ``--version``, a missing and an unknown command are answered here, an extra command
    by :func:`run_extra_command`, the trainer commands by :func:`cl_lightning.cli.lightning_cli.run`."""
    argv = sys.argv[1:] if args is None else list(args)
    answer_without_torch(argv)
    if argv[0] in EXTRA_COMMANDS:
        run_extra_command(argv[0], argv[1:])
        return
    from cl_lightning.cli.lightning_cli import run  # torch and Lightning: only for a trainer command

    run(args)


def run_extra_command(name: str, argv: list[str]) -> None:
    """``cl-lightning <name> <argv>`` for a command beside LightningCLI's: only its module is imported,
    not LightningCLI's (seconds of torch and Lightning before its ``--help`` could print), and a
    :class:`~cl_lightning.errors.UserError` ends it in one line, as it ends a trainer command."""
    with user_errors_in_one_line():
        importlib.import_module(EXTRA_COMMANDS[name][0]).main(argv)


def answer_without_torch(argv: list[str]) -> None:
    """Exit with the answer if ``argv`` asks for the overview or the version, or names no command or
    an unknown one. LightningCLI's parser would name only its own three commands (``fit``,
    ``validate``, ``test``), after importing torch: the overview and the refusal name all seven."""
    if argv[:1] in (["-h"], ["--help"]):
        print(overview())
        sys.exit(0)  # as every parser's --help
    if argv[:1] == ["--version"]:
        print(version())
        sys.exit(0)
    if not argv:
        print(f"{overview()}\n\nerror: no command given: cl-lightning <command> ...", file=sys.stderr)
        sys.exit(2)  # as every parser's refusal of its arguments
    if not argv[0].startswith("-") and argv[0] not in COMMANDS:  # an option first is LightningCLI's to judge
        print(f"usage: {usage()}\ntip: For details of accepted options run: cl-lightning --help\n"
              f"error: {unknown_command(argv[0])}", file=sys.stderr)  # the lines a parser's refusal has
        sys.exit(2)


def unknown_command(name: str) -> str:
    """The refusal of command ``name``, with the closest command if one is near enough to be a typo
    (:mod:`cl_lightning.cli.parse_errors` words LightningCLI's refusal of one the same)."""
    closest = difflib.get_close_matches(name.lower(), COMMANDS, n=1)
    return f"unknown command '{name}'{f' (did you mean {closest[0]}?)' if closest else ''}; commands: {', '.join(COMMANDS)}"


def version() -> str:
    """``cl-lightning --version``: the installed package's version (the one pip reports)."""
    import importlib.metadata  # most of this module's import time (50 ms): not for the other answers

    return f"cl-lightning {importlib.metadata.version('cl_lightning')}"


def usage() -> str:
    """The top-level usage line, with every command: LightningCLI's own (shown when no command is
    given) would name only its trainer commands."""
    return f"cl-lightning <command> [options]   (commands: {', '.join(COMMANDS)})"


def overview() -> str:
    """``cl-lightning --help``: what the tool is and its commands, one line each. LightningCLI's
    own top-level help knows only its trainer commands, with the Trainer's docstrings."""
    summaries = {name: summary for name, (_, summary, _) in TRAINER_COMMANDS.items()}
    summaries |= {name: summary for name, (_, summary) in EXTRA_COMMANDS.items()}
    lines = [f"  {name:<10}{summary}" for name, summary in summaries.items()]
    return "\n".join([f"usage: {usage()}", "", *textwrap.wrap(DESCRIPTION, 100), "",
                      "options: -h, --help (this overview), --version", "", "commands:", *lines])
