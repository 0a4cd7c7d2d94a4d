"""``cl-lightning``: LightningCLI for task sequences.

``cl-lightning fit --config configs/<method>/<benchmark>.yaml`` runs a whole task sequence in
one ``fit``; ``cl-lightning test --config ... --ckpt_path ...`` evaluates a checkpoint on every
task. Everything else (overrides, ``--print_config``, each command's ``--help``) is LightningCLI's;
``cl-lightning --help`` lists them with the analysis commands (grid, report, path, sweep).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import textwrap
import warnings
from typing import Any, Callable, Optional

import torch
from jsonargparse import Namespace
from jsonargparse.typing import PositiveInt
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

import cl_lightning.methods  # noqa: F401  (registers the method callbacks' short names, e.g. MCSGD)
from cl_lightning.checkpoints import check_checkpoint, finished_run_message
from cl_lightning.data.datamodule import ContinualDataModule, sequence_trainer_settings
from cl_lightning.errors import DeviceMemoryError, UserError
from cl_lightning.evaluation.accuracy_matrix import AccuracyMatrix
from cl_lightning.guards import FiniteGuard
from cl_lightning.hparams import METRICS, science
from cl_lightning.member_outputs import member_loggers, write_member_files
from cl_lightning.models.module import ContinualModule
from cl_lightning.preflight import check_run_inputs
from cl_lightning.progress import TaskProgressBar
from cl_lightning.rundir import OUT_OF_MEMORY
from cl_lightning.saving import AtomicCheckpointIO, TaskCheckpoint
from cl_lightning.signals import CheckpointOnSignal

# Data are in-memory tensors served a whole batch at a time: worker processes would only add
# inter-process copies, so Lightning's advice to add workers does not apply.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# Lightning (2.6) still builds torch's deprecated pytree LeafSpec: a notice about Lightning's own code
# that the user cannot act on, printed at every resume and stop, where it buried the line that matters.
warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the run folder and shows the run's science in TensorBoard's HParams
    tab, one column per method, model and data setting (:mod:`cl_lightning.hparams`)."""

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" and not self.already_saved:
            # Evaluating a run with its own config.yaml (`test --config <run>/config.yaml`) logs into
            # the run's folder: its config.yaml is the training's, to be kept, not a reason to fail.
            folder = trainer.log_dir  # a collective: every process
            exists = trainer.strategy.broadcast(bool(folder) and os.path.isfile(os.path.join(folder, self.config_filename))
                                                if trainer.is_global_zero else False)
            if exists:
                self.already_saved = True
                return
        super().setup(trainer, pl_module, stage)

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
        seeds = list(trainer.datamodule.seeds)
        if len(seeds) > 1:  # each member's own config.yaml and HParams row, in its own folder
            for logger, member in zip(member_loggers(trainer), write_member_files(trainer, config, seeds)):
                if logger is not None:
                    logger.log_hyperparams(science(member), metrics=dict.fromkeys(METRICS, 0.0))
        elif isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.log_hyperparams(science(config), metrics=dict.fromkeys(METRICS, 0.0))


#: Where the TensorBoard logger writes unless ``trainer.default_root_dir`` or its own ``save_dir`` says otherwise.
DEFAULT_SAVE_DIR = "."


def logger_follows_default_root_dir(trainer: Namespace) -> None:
    """Point the logger's ``save_dir`` at ``trainer.default_root_dir`` when that is given and
    ``save_dir`` is not. Lightning users expect ``default_root_dir`` to move every output, and it
    does so for Lightning's own default logger; the CLI's logger (with its fixed default
    ``save_dir``, see :func:`cli_main`) would ignore it. The run folder's ``config.yaml`` then
    records the folder actually used. A ``save_dir`` other than the default wins."""
    logger, root = trainer.get("logger"), trainer.get("default_root_dir")
    init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
    if root is not None and init_args is not None and init_args.get("save_dir") == DEFAULT_SAVE_DIR:
        init_args.save_dir = str(root)


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
        "Start from a shipped config; --print_config shows the whole resolved config, and any option below "
        "overrides it, e.g. --data.num_tasks 5 --trainer.accelerator gpu",
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


#: The task sequence's trainer settings that follow from the data section: linked, so they cannot be
#: set by hand. The others of :func:`sequence_trainer_settings` are the CLI's trainer defaults.
LINKED_TRAINER_SETTINGS = ("max_epochs", "check_val_every_n_epoch")


def linked_trainer_setting(name: str) -> Callable[[int, int], int]:
    """``compute_fn`` of the link from ``(data.num_tasks, data.epochs_per_task)`` to ``trainer.<name>``."""

    def compute(num_tasks: int, epochs_per_task: int) -> int:
        return sequence_trainer_settings(int(num_tasks), int(epochs_per_task))[name]

    compute.__name__ = sequence_trainer_settings.__name__  # what `fit --help` shows for the link
    return compute


def sequence_trainer_defaults() -> dict[str, int]:
    """The task sequence's trainer settings that do not depend on its length (defaults one may override)."""
    settings = sequence_trainer_settings(num_tasks=1, epochs_per_task=1)
    return {name: value for name, value in settings.items() if name not in LINKED_TRAINER_SETTINGS}


class ContinualCLI(LightningCLI):
    """LightningCLI with the task sequence wired in.

    - ``trainer.max_epochs`` = ``data.num_tasks * data.epochs_per_task`` and validation runs
      once per task (``check_val_every_n_epoch = data.epochs_per_task``): both are linked, not
      typed twice, and cannot be set by hand.
    - The accuracy matrix, a checkpoint with ``last.ckpt``, the task progress bar and the guard
      that stops a diverged run are always on (``accuracy_matrix``, ``checkpoint``,
      ``progress_bar`` and ``finite_guard`` sections), whatever ``trainer.callbacks`` a config lists;
      so is the stop on SIGTERM/SIGINT with a checkpoint and the resume command (``signals.py``).
    - ``--ckpt_path`` is checked against the config before anything runs (``checkpoints.py``).
    """

    @override
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """LightningCLI's subcommands but ``predict``: a task sequence has no prediction step."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in TRAINER_COMMANDS}

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # No prefix abbreviations (the main parser and each subcommand's): `--data.num_task 5` in
        # a long sweep command must be refused, not silently taken for `--data.num_tasks`.
        return super().init_parser(**{"allow_abbrev": False, **kwargs})

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED_TRAINER_SETTINGS:
            parser.link_arguments(("data.num_tasks", "data.epochs_per_task"), f"trainer.{name}",
                                  compute_fn=linked_trainer_setting(name))
        parser.add_argument(
            "--seeds", type=Optional[list[int]], default=None,
            help="Train these seeds together as one population in one fit, e.g. --seeds [0,1,2,3,4]: member k is "
            "the run with seed_everything seeds[k] (its own initial weights, tasks, batch order, dropout and "
            "memories) and writes its results into its own folder seed_<seeds[k]> beside the run folder (or --member_dirs). Settings "
            "that change no shape may then be lists with one value per member (e.g. --model.lr [0.1,0.05]). "
            "Default (null): one member, seed_everything.",
        )
        # One list of members: the model's population and the datamodule's task sequences.
        parser.link_arguments("seeds", "data.seeds")
        parser.link_arguments("seeds", "model.seeds")
        parser.add_argument(
            "--member_dirs", type=Optional[list[str]], default=None,
            help="The folder each member of a population writes its results into, one per seed, e.g. "
            "--seeds [0,0] --model.lr [0.1,0.01] --member_dirs [runs/lr0.1/seed_0,runs/lr0.01/seed_0]. Default "
            "(null): seed_<seed> beside the run folder; needed when a seed repeats.",
        )
        parser.link_arguments("member_dirs", "data.member_dirs")
        parser.add_lightning_class_args(AccuracyMatrix, "accuracy_matrix")
        parser.add_lightning_class_args(TaskCheckpoint, "checkpoint")
        parser.add_lightning_class_args(TaskProgressBar, "progress_bar")
        parser.add_lightning_class_args(FiniteGuard, "finite_guard")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "{epoch}-{step}"})
        parser.add_argument(
            "--num_threads", type=Optional[PositiveInt], default=1,
            help="CPU threads for torch's intra-op parallelism (torch.set_num_threads). Default 1: "
            "continual-learning batches (10-64 examples) are too small to gain from more (same "
            "speed with 1 or 2 threads on an idle 2-core machine), and when another process "
            "competes for the cores extra threads stall each other (a training step measured 26x "
            "slower with 2 threads). Raise it for big models on many idle cores; null keeps "
            "torch's default.",
        )
        # After the accuracy matrix: the checkpoint it writes on a signal holds the task's row.
        parser.add_lightning_class_args(CheckpointOnSignal, "checkpoint_on_signal")

    @override
    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters here: check the file and that it
        # belongs to this config first, so a bad one fails with a clear message and writes nothing.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        checkpoint = check_checkpoint(ckpt_path, self.config[subcommand].as_dict(), subcommand) if ckpt_path else None
        finished = finished_run_message(ckpt_path, checkpoint) if checkpoint and subcommand == "fit" else None
        if finished:
            print(finished)
            sys.exit(0)
        saved = ((checkpoint or {}).get("hyper_parameters") or {}).get("seeds") or []
        if len(saved) > 1 and self.config[subcommand].get("seeds") != saved:
            # Some members of a population's checkpoint (e.g. a member's own config.yaml): their
            # settings are in this config, while the checkpoint's hyperparameters hold every
            # member's; the module takes their weights (ContinualModule.on_load_checkpoint).
            return
        super()._parse_ckpt_path()

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        logger_follows_default_root_dir(config.trainer)

    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Trainer:
        # `--trainer.enable_checkpointing false` / `enable_progress_bar false` switch the
        # always-on checkpoint / progress bar off rather than making Lightning refuse a callback
        # it was told not to use.
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        if config.get("enable_progress_bar") is False:
            callbacks = [c for c in callbacks if not isinstance(c, TaskProgressBar)]
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # checkpoints written atomically
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        check_run_inputs(self.datamodule, config, callbacks, self.config[self.subcommand].get("ckpt_path"),
                         fitting=self.subcommand == "fit")
        return super()._instantiate_trainer(config, callbacks)


def cli_main(args: ArgsType = None) -> ContinualCLI:
    """Build and run the CLI; ``args`` (a list or dict) lets tests and scripts call it in-process."""
    return ContinualCLI(
        ContinualModule,
        ContinualDataModule,
        args=args,
        save_config_callback=LoggerSaveConfigCallback,
        # The module's own per-task SGD (`ContinualModule.configure_optimizers`) is the paper's:
        # no --optimizer/--lr_scheduler groups that would replace it and list every torch class.
        auto_configure_optimizers=False,
        parser_kwargs={"usage": usage(), "description": DESCRIPTION, **{
            name: {"usage": usage, "description": f"{summary[0].upper()}{summary[1:]}. {advice}"}
            for name, (usage, summary, advice) in TRAINER_COMMANDS.items()
        }},
        trainer_defaults={
            **sequence_trainer_defaults(),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": DEFAULT_SAVE_DIR, "default_hp_metric": False},
            },
        },
    )


#: Commands beside LightningCLI's: name -> (module with ``main(argv)``, what it does).
EXTRA_COMMANDS = {
    "grid": ("cl_lightning.grid", "run methods x benchmarks x seeds into <root>/<benchmark>/<method>/seed_<n>/"),
    "report": ("cl_lightning.analysis.report", "the paper's table (mean ± std, 95 % interval) over seeds, methods against MC-SGD, plots"),
    "path": ("cl_lightning.analysis.linear_path", "loss and accuracy along the line between two solutions"),
    "sweep": ("cl_lightning.sweep.run", "a grid of settings x seeds on Ray Tune, selected on validation, best config on test seeds"),
}


def main(args: ArgsType = None) -> None:
    """Console entry point of ``cl-lightning``: the extra commands go to their modules, the rest
    to LightningCLI. Problems with the user's input (data, settings, checkpoint, a diverged run, a
    failed write, for every command) end with the message that names the fix, not a traceback
    (:mod:`cl_lightning.errors`); argument errors are reported by the commands' parsers. A stop by
    SIGTERM exits 143 whatever the command (``fit`` stops with a checkpoint, ``signals.py``)."""
    argv = sys.argv[1:] if args is None else list(args)
    command = argv[0] if argv else ""
    try:
        if command in EXTRA_COMMANDS:
            importlib.import_module(EXTRA_COMMANDS[command][0]).main(argv[1:])
            return
        if command in ("-h", "--help"):
            print(overview())
            sys.exit(0)  # as every parser's --help
        cli_main(args)
    except SIGTERMException as stop:
        # Lightning's own SIGTERM handling (test, validate) raises it with exit status 0: a batch
        # scheduler would count a preempted job as a success.
        raise SystemExit(stop.code or 128 + signal.SIGTERM) from stop
    except torch.cuda.OutOfMemoryError as err:
        sys.exit(f"error: {out_of_memory(err)}")
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        sys.exit(f"error: {cause}")


def usage() -> str:
    """The top-level usage line, with every command: LightningCLI's own (shown when no command is
    given) would name only its trainer commands."""
    return f"cl-lightning <command> [options]   (commands: {', '.join([*TRAINER_COMMANDS, *EXTRA_COMMANDS])})"


def overview() -> str:
    """``cl-lightning --help``: what the tool is and its commands, one line each. LightningCLI's
    own top-level help knows only its trainer commands, with the Trainer's docstrings."""
    summaries = {name: summary for name, (_, summary, _) in TRAINER_COMMANDS.items()}
    summaries |= {name: summary for name, (_, summary) in EXTRA_COMMANDS.items()}
    lines = [f"  {name:<10}{summary}" for name, summary in summaries.items()]
    return "\n".join([f"usage: {usage()}", "", *textwrap.wrap(DESCRIPTION, 100), "",
                      "commands:", *lines])


def out_of_memory(err: BaseException) -> DeviceMemoryError:
    """The message of an accelerator running out of memory: what a population costs and the fix."""
    first = (str(err).strip().splitlines() or [""])[0]
    return DeviceMemoryError(
        f"{OUT_OF_MEMORY} ({first}). A population of N members needs about N times one run's memory for weights, "
        "gradients, activations and the method's state (the data are shared): train fewer seeds at once (--seeds), "
        "or let `cl-lightning grid` / `sweep` train them, which split a population that does not fit into smaller ones. "
        "The checkpoints and accuracy matrices written so far are kept."
    )


def user_error(err: BaseException) -> UserError | None:
    """``err`` or the :class:`UserError` it was raised from. jsonargparse wraps what a class's
    constructor raises (a callback refusing its settings) into its own ``ValueError``."""
    while err is not None and not isinstance(err, UserError):
        err = err.__cause__
    return err


if __name__ == "__main__":
    main()
