"""``cl-lightning``: LightningCLI for task sequences.

``cl-lightning fit --config configs/<method>/<benchmark>.yaml`` runs a whole task sequence in
one ``fit``; ``cl-lightning test --config ... --ckpt_path ...`` evaluates a checkpoint on every
task. Everything else (overrides, ``--print_config``, each command's ``--help``) is LightningCLI's;
``cl-lightning --help`` lists them with the analysis commands (grid, report, path, sweep).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import warnings
from argparse import Action
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from jsonargparse import DefaultHelpFormatter, Namespace
from jsonargparse.typing import PositiveInt
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from cl_lightning.analysis.expected import ExpectedResult
from cl_lightning.callbacks.guards import FiniteGuard
from cl_lightning.callbacks.progress import TaskProgressBar
from cl_lightning.callbacks.saving import AtomicCheckpointIO, TaskCheckpoint
from cl_lightning.callbacks.signals import CheckpointOnSignal
from cl_lightning.cli.checkpoints import check_checkpoint, finished_run_message
from cl_lightning.cli.console import DESCRIPTION, EXTRA_COMMANDS, TRAINER_COMMANDS, main, run_extra_command, usage
from cl_lightning.cli.hparams import METRICS, log_population, science
from cl_lightning.cli.parse_errors import METHOD_NAMES, ContinualArgumentParser
from cl_lightning.cli.preflight import check_run_inputs
from cl_lightning.data.datamodule import ContinualDataModule, sequence_trainer_settings
from cl_lightning.errors import DeviceMemoryError, user_errors_in_one_line
from cl_lightning.evaluation.accuracy_matrix import AccuracyMatrix
from cl_lightning.member_outputs import member_loggers, write_member_files
from cl_lightning.models.module import ContinualModule
from cl_lightning.rundir import CONFIG_FILE, OUT_OF_MEMORY, checkpoint_run_folder, run_files
from cl_lightning.seeding import check_seeds

# Data are in-memory tensors served a whole batch at a time: worker processes would only add
# inter-process copies, so Lightning's advice to add workers does not apply.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# Lightning (2.6) still builds torch's deprecated pytree LeafSpec: a notice about Lightning's own code
# that the user cannot act on, printed at every resume and stop, where it buried the line that matters.
warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
# Lightning (2.6) advertises its cloud services at the start of every fit ("💡 Tip: For seamless cloud
# logging ... litlogger", and "... uploads ... litmodels" for its default checkpoint), with no switch
# until Trainer(suggest_integrations=False) of a later release: the run's console carries our lines.
# Only these tips are dropped; the logger's other notices (GPU available, seed set, ...) stay.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip: For seamless cloud"))


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the run folder and shows the run's science in TensorBoard's HParams
    tab, one column per method, model and data setting (:mod:`cl_lightning.cli.hparams`)."""

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.already_saved:
            # A run folder's config.yaml is the training's: a resume continues that run and `test` /
            # `validate` evaluate it in its folder (:func:`follow_run_folder`), so it is kept, not a reason
            # to fail; a new fit never reaches a folder that holds one (`preflight` refuses it first).
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
            log_population(member_loggers(trainer), write_member_files(trainer, config, seeds))
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


def follow_run_folder(config: Namespace, subcommand: str) -> None:
    """Point the logger at the run folder that the command continues or evaluates, so that its files
    (TensorBoard events, ``test_accuracy.json``, the resumed matrix) join that run's instead of a new
    ``version_N``: ``fit --ckpt_path <run>/checkpoints/<file>.ckpt`` resumes in ``<run>``; ``test`` and
    ``validate`` write into the folder of the run's own ``config.yaml`` given with ``--config`` (a
    population member's folder, say), else into the checkpoint's run folder. A checkpoint elsewhere
    (a copy), or a logger version the command names, starts a new folder as before."""
    ckpt_path = config.get("ckpt_path")
    folder = checkpoint_run_folder(ckpt_path) if ckpt_path else None
    if subcommand != "fit":
        given = [Path(p.absolute) for p in config.get("config") or []]
        runs = [p.parent for p in given if p.name == CONFIG_FILE and set(run_files(p.parent)) - {CONFIG_FILE}]
        folder = runs[-1] if runs else folder
    if folder is None:
        return
    logger = config.trainer.get("logger")
    init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
    if init_args is not None and "save_dir" in init_args:
        if init_args.get("version") is None:
            init_args.save_dir, init_args.name, init_args.version = str(folder.parent), "", folder.name
    elif logger is False:
        config.trainer.default_root_dir = str(folder)


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


#: What ``--help`` says of the linked trainer settings (Lightning's own text explains a free ``max_epochs``).
LINKED_TRAINER_HELP = {
    "max_epochs": "data.num_tasks * data.epochs_per_task: the whole task sequence is one fit.",
    "check_val_every_n_epoch": "data.epochs_per_task: the evaluation that fills the accuracy matrix's row runs "
    "once per task, after its last epoch.",
}

#: What ``--help`` says of trainer options that this CLI treats otherwise than Lightning's text says.
TRAINER_HELP = {
    "callbacks": "The method, e.g. [{class_path: MCSGD, init_args: {alpha0: 0.25}}], and any other callbacks. "
    "The accuracy matrix, checkpoint, progress bar, finite guard and stop on a signal are always added "
    "(their own sections below).",
    "enable_checkpointing": "false drops the checkpoint section's callback (and any ModelCheckpoint of "
    "trainer.callbacks).",
    "default_root_dir": "Folder of the run's outputs: the logger's save_dir follows it unless set itself. "
    "null: the current folder.",
}

#: Trainer options that the commands' ``--help`` leaves out, and why: the task sequence sets them, or they do
#: nothing (or harm) in it. They still parse and are written to the run's ``config.yaml``, so a config or an
#: old run's ``config.yaml`` that sets one keeps working; the trainer section of ``--help`` names them.
HIDDEN_TRAINER_OPTIONS = {
    "min_epochs": "the sequence's length is max_epochs, linked to data.num_tasks * data.epochs_per_task",
    "max_steps": "a step bound would end the sequence in the middle of a task (limit_train_batches shortens every task)",
    "min_steps": "as min_epochs",
    "val_check_interval": "the evaluation runs once per task, after its last epoch (check_val_every_n_epoch, linked): "
    "it is the accuracy matrix's row",
    "num_sanity_val_steps": "0 (sequence_trainer_settings): a sanity check would evaluate the untrained model",
    "reload_dataloaders_every_n_epochs": "must stay 1 (sequence_trainer_settings): the datamodule takes the task "
    "from the epoch when Lightning reloads its loaders",
    "overfit_batches": "it cannot fix the batches (the datamodule's loaders shuffle themselves), so it only limits "
    "them, as limit_train_batches and limit_val_batches do",
    "limit_predict_batches": "there is no predict command",
    "use_distributed_sampler": "no effect: the datamodule's loaders are not torch DataLoaders and give each process "
    "its share themselves",
    "barebones": "it refuses the logger, checkpoint and progress bar that every run has",
    "model_registry": "uploads to Lightning's cloud model registry",
}
HIDDEN_TRAINER_DESTS = frozenset(f"trainer.{name}" for name in HIDDEN_TRAINER_OPTIONS)
HIDDEN_TRAINER_NOTE = (
    "Lightning's Trainer. Not listed, since the task sequence sets them or has no use for them, but accepted: "
    + ", ".join(HIDDEN_TRAINER_OPTIONS) + " (why: HIDDEN_TRAINER_OPTIONS in cl_lightning/cli/lightning_cli.py)."
)


class ContinualHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter without the options of :data:`HIDDEN_TRAINER_OPTIONS` (nor their
    ``.help``). Only the help leaves them out: ``help=SUPPRESS`` would also drop them from ``--print_config``
    and the run's ``config.yaml``, and a ``skip`` would refuse the configs that set them."""

    @override
    def add_argument(self, action: Action) -> None:
        if action.dest.removesuffix(".help") not in HIDDEN_TRAINER_DESTS:
            super().add_argument(action)


def set_help(parser: LightningArgumentParser, dest: str, text: str) -> None:
    """Replace the help of the option ``dest`` (a Lightning docstring written for Python callers, say)."""
    action = next((a for a in parser._actions if a.dest == dest), None)
    if action is None:
        raise KeyError(f"the parser has no option {dest}")
    action.help = text


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
        # The help leaves out the trainer options a task sequence does not use (`HIDDEN_TRAINER_OPTIONS`).
        return super().init_parser(**{"allow_abbrev": False, "formatter_class": ContinualHelpFormatter, **kwargs})

    @override
    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("validate", "test"):
            # The accuracy matrix prints the per-task table; Lightning's (`verbose`) would repeat its numbers
            # once per task's dataloader, 40 lines for 10 tasks. `--verbose true` still asks for it.
            parser.set_defaults(verbose=False)
        # Lightning's texts of these explain the checkpoint registry and torch's serialization notes (33 lines).
        set_help(parser, "weights_only", "Passed to torch.load when Lightning restores --ckpt_path: true reads "
                 "tensors and primitive types only (safe for a file of unknown origin); null: torch.load's default.")
        if subcommand == "fit":
            set_help(parser, "ckpt_path", "Checkpoint file to resume from, e.g. <run>/checkpoints/last.ckpt; the "
                     "run then continues in <run>. Checked against the config before anything runs: the data "
                     "settings and the method must be the checkpoint's.")
        return parser

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.groups["trainer"].description = HIDDEN_TRAINER_NOTE
        for name, text in TRAINER_HELP.items():
            set_help(parser, f"trainer.{name}", text)
        for name in LINKED_TRAINER_SETTINGS:
            set_help(parser, f"trainer.{name}", LINKED_TRAINER_HELP[name])  # shown with the link
            parser.link_arguments(("data.num_tasks", "data.epochs_per_task"), f"trainer.{name}",
                                  compute_fn=linked_trainer_setting(name))
        parser.add_argument(
            "--seeds", type=Optional[list[int]], default=None,
            help="Train these seeds together as one population in one fit, e.g. --seeds [0,1,2,3,4]: member k is "
            "the run with seed_everything seeds[k] (its own initial weights, tasks, batch order, dropout and "
            "memories) and writes its results into its own folder seed_<seeds[k]> inside the run folder (or --member_dirs). Settings "
            "that change no shape may then be lists with one value per member (e.g. --model.lr [0.1,0.05]). "
            "Default (null): one member, seed_everything.",
        )
        # One list of members: the model's population and the datamodule's task sequences. The links show
        # their targets' help, written for Python callers: here the options above say it all.
        for target in ("data.seeds", "model.seeds"):
            set_help(parser, target, "Set by --seeds.")
            parser.link_arguments("seeds", target)
        parser.add_argument(
            "--member_dirs", type=Optional[list[str]], default=None,
            help="The folder each member of a population writes its results into, one per seed, e.g. "
            "--seeds [0,0] --model.lr [0.1,0.01] --member_dirs [runs/lr0.1/seed_0,runs/lr0.01/seed_0]. Default "
            "(null): seed_<seed> inside the run folder; needed when a seed repeats. A folder holding another run's results is refused.",
        )
        set_help(parser, "data.member_dirs", "Set by --member_dirs.")
        parser.link_arguments("member_dirs", "data.member_dirs")
        parser.add_argument(
            "--expected", type=Optional[ExpectedResult], default=None,
            help="What this config gave over many seeds (a paper-row config records its table's result): kept in "
            "the run's config.yaml; report flags a cell whose mean falls outside. Training ignores it.",
        )
        parser.add_lightning_class_args(AccuracyMatrix, "accuracy_matrix")
        parser.add_lightning_class_args(TaskCheckpoint, "checkpoint")
        parser.add_lightning_class_args(TaskProgressBar, "progress_bar")
        parser.add_lightning_class_args(FiniteGuard, "finite_guard")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "{epoch}-{step}"})
        parser.add_argument(
            "--num_threads", type=Optional[PositiveInt], default=1,
            # Measured: the same speed with 1 or 2 threads on an idle 2-core machine, and a training
            # step 26x slower with 2 threads when another process competed for the cores.
            help="CPU threads for torch's intra-op parallelism (torch.set_num_threads); null keeps torch's "
            "default. Default 1: batches of 10-64 examples gain nothing from more, and extra threads stall "
            "each other when other processes compete for the cores. Raise it for big models on idle cores.",
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
    def _set_seed(self) -> None:
        # A population's seed_everything is its first member's: a population of one (`--seeds [3]`)
        # records and prints the seed it trains, not the config's seed_everything.
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("seeds"):
            config["seed_everything"] = config["seeds"][0]
        check_seeds(config.get("seeds"), config.get("seed_everything"))
        super()._set_seed()

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        logger_follows_default_root_dir(config.trainer)
        follow_run_folder(config, self.subcommand)

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
        parser_class=ContinualArgumentParser,
        parser_kwargs={"prog": "cl-lightning", "usage": usage(), "description": DESCRIPTION, **{
            name: {"usage": TRAINER_COMMANDS[name][0], "description": command_description(name)} for name in TRAINER_COMMANDS
        }},
        trainer_defaults={
            **sequence_trainer_defaults(),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": DEFAULT_SAVE_DIR, "default_hp_metric": False},
            },
        },
    )


def command_description(name: str) -> str:
    """The text under a trainer command's usage line. ``fit``'s also says where a method's options are:
    a method is a class given in ``trainer.callbacks``, whose options jsonargparse lists only for a
    class named with ``--trainer.callbacks.help``."""
    _, summary, advice = TRAINER_COMMANDS[name]
    text = f"{summary[0].upper()}{summary[1:]}. {advice}"
    if name == "fit":
        text += f" A method's options (alpha0, lam, ...): --trainer.callbacks.help <method>, one of {', '.join(METHOD_NAMES)}."
    return text


def run(args: Sequence[str] | None = None) -> None:
    """Run the command of ``args`` (default: the command line's). :func:`cl_lightning.cli.console.main`, the
    entry point, answers ``--help``, ``--version`` and an unknown command and runs the extra commands
    itself, without torch; here they go to the same :func:`~cl_lightning.cli.console.run_extra_command`, the
    trainer commands to LightningCLI. Problems with the user's input (data, settings, checkpoint, a
    diverged run, a failed write, for every command) end with the message that names the fix, not a
    traceback (:func:`cl_lightning.errors.user_errors_in_one_line`); argument errors are reported by the
    commands' parsers in one line (:mod:`cl_lightning.cli.parse_errors`). A trainer command stopped by SIGTERM
    exits 143 (``fit`` stops with a checkpoint, ``signals.py``), one out of the device's memory says
    what a population costs."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] and argv[0] in EXTRA_COMMANDS:
        run_extra_command(argv[0], argv[1:])
        return
    try:
        with user_errors_in_one_line():
            cli_main(args)  # None: LightningCLI reads sys.argv itself (and warns if given both)
    except SIGTERMException as stop:
        # Lightning's own SIGTERM handling (test, validate) raises it with exit status 0: a batch
        # scheduler would count a preempted job as a success.
        raise SystemExit(stop.code or 128 + signal.SIGTERM) from stop
    except torch.cuda.OutOfMemoryError as err:
        sys.exit(f"error: {out_of_memory(err)}")


def out_of_memory(err: BaseException) -> DeviceMemoryError:
    """The message of an accelerator running out of memory: what a population costs and the fix."""
    first = (str(err).strip().splitlines() or [""])[0]
    return DeviceMemoryError(
        f"{OUT_OF_MEMORY} ({first}). A population of N members needs about N times one run's memory for weights, "
        "gradients, activations and the method's state (the data are shared): train fewer seeds at once (--seeds), "
        "or let `cl-lightning grid` / `sweep` train them, which split a population that does not fit into smaller ones. "
        "The checkpoints and accuracy matrices written so far are kept."
    )


if __name__ == "__main__":
    main()
