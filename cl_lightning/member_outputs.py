"""What each member of a population leaves on disk: exactly what a plain run with its seed and
settings leaves, in its own folder (:func:`~cl_lightning.rundir.member_dirs`), so ``report`` and
the other analysis commands read members and plain runs alike.

- ``config.yaml``: the population's config with the member's seed and its own value of every
  per-member setting: the config of the plain run that trains this member alone.
- TensorBoard events (HParams row, ``cl/*`` summaries, the accuracy matrix, ``train/loss``) from a
  logger of its own.
- ``population.json``: which population trained it (its folder, seeds and place in it), because the
  checkpoint is the population's, in the population's run folder.

A population of one is a plain run: its folder is the run folder and it writes nothing extra.

A per-member setting is a constructor parameter annotated ``PerMember[...]``
(:mod:`cl_lightning.models.member_settings`): ``ContinualModule``'s learning-rate, momentum, weight
decay and dropout settings, and each method's own (EWC's ``lam``, ...). In a population's config such
a setting is one value for all members or a list with one value per member; member k's config holds
its value.
"""

from __future__ import annotations

import copy
import importlib
import json
from typing import Any

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from cl_lightning.models.member_settings import per_member_settings
from cl_lightning.rundir import (
    CONFIG_FILE,
    MEMBERS_FILE,
    POPULATION_FILE,
    local_run_dir,
    trainer_member_dirs,
    write_atomically,
)


def member_settings(class_path: str) -> tuple[str, ...]:
    """The per-member settings of the class at ``class_path`` (none if it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        return tuple(per_member_settings(getattr(importlib.import_module(module), name)))
    except (ImportError, AttributeError, TypeError):
        return ()


def _take(init_args: dict[str, Any], names: tuple[str, ...], k: int) -> None:
    for name in names:
        if isinstance(init_args.get(name), list):
            init_args[name] = init_args[name][k]


def member_config(config: dict[str, Any], k: int, seed: int) -> dict[str, Any]:
    """The config of the plain run that trains member ``k`` (seed ``seed``) alone.

    ``config`` is the population's config as a plain dict (LightningCLI's, dumped): the member gets
    ``seed_everything: seed``, ``seeds: null``, ``member_dirs: null`` and ``model.population_member: k``,
    and its own value of every per-member setting. Its logger names no version: ``fit`` with it trains the
    member alone into a new folder, while ``test`` / ``validate`` with it write into the member's folder,
    the folder of the ``config.yaml`` they are given (``cli.follow_run_folder``).
    """
    member = copy.deepcopy(config)
    member["seed_everything"] = seed
    member["seeds"] = None
    if "member_dirs" in member:
        member["member_dirs"] = None
    member.get("data", {})["seed"] = None
    model = member.get("model", {})
    _take(model, member_settings("cl_lightning.models.module.ContinualModule"), k)
    model["population_member"] = k  # which weights of the population's checkpoint are this member's
    trainer = member.get("trainer", {})
    for callback in trainer.get("callbacks") or []:
        if isinstance(callback, dict) and "class_path" in callback:
            _take(callback.setdefault("init_args", {}), member_settings(callback["class_path"]), k)
    logger = trainer.get("logger")
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
        logger["init_args"]["version"] = None
    return member


def write_member_files(trainer: Trainer, config: dict[str, Any], seeds: list[int]) -> list[dict[str, Any]]:
    """Write the population's ``members.json`` and each member's ``config.yaml`` and
    ``population.json`` (a population of two or more); return the members' configs. Rank 0 only."""
    population = local_run_dir(trainer).absolute()
    folders = trainer_member_dirs(trainer, population)
    record = {"population": str(population), "seeds": seeds, "folders": [str(f) for f in folders],
              "checkpoints": str(population / "checkpoints")}
    files = {population / MEMBERS_FILE: json.dumps(record, indent=1)}
    configs = []
    for k, (seed, folder) in enumerate(zip(seeds, folders)):
        configs.append(member_config(config, k, seed))
        folder.mkdir(parents=True, exist_ok=True)
        files[folder / CONFIG_FILE] = yaml.safe_dump(configs[-1], sort_keys=False)
        files[folder / POPULATION_FILE] = json.dumps({**record, "member": k, "seed": seed}, indent=1)
    write_atomically(files)
    return configs


def member_loggers(trainer: Trainer) -> list[Logger | None]:
    """The logger of each member: the run's own for a population of one; for a larger population, a
    TensorBoard logger writing into each member's folder (when the run logs to TensorBoard), made once
    per trainer. Call it on rank 0 only (it creates event files)."""
    loggers = getattr(trainer, "_member_loggers", None)
    if loggers is None:
        seeds = list(trainer.datamodule.seeds)
        if len(seeds) == 1 or not isinstance(trainer.logger, TensorBoardLogger):
            loggers = [trainer.logger] if len(seeds) == 1 else [None] * len(seeds)
        else:
            loggers = [TensorBoardLogger(save_dir=str(f.parent), name="", version=f.name, default_hp_metric=False)
                       for f in trainer_member_dirs(trainer, local_run_dir(trainer))]
        trainer._member_loggers = loggers
    return loggers


@rank_zero_only
def log_members(trainer: Trainer, rows: list[dict[str, float]], step: int) -> None:
    """Log ``rows[k]`` (name -> value) into member k's logger at ``step`` (members without a logger,
    or with an empty row, log nothing)."""
    for logger, row in zip(member_loggers(trainer), rows):
        if logger is not None and row:
            logger.log_metrics(row, step=step)
