"""The runs below a folder, each with its accuracy matrix and its state.

Two kinds of folders are runs:

- the layout of :mod:`cl_lightning.rundir`, ``<root>/<benchmark>/<method>/seed_<n>/``, which
  ``cl-lightning grid`` and ``sweep`` write: method, benchmark and seed are read from the path, so a
  grid's names (``stable_sgd``, a sweep's ``mcsgd[lr=0.1]``) are kept and a run that failed before
  writing anything is still found;
- anywhere else, a folder holding an ``accuracy_matrix.json`` beside its run's ``config.yaml`` (a
  ``fit`` run folder ``version_N``, a population's member folder ``version_N/seed_<n>``): method,
  benchmark and seed are read from that config (:func:`config_key`), since its path names none of
  them. Runs of one method and benchmark trained with different settings (two populations with
  different lrs) are told apart by the settings that differ, ``mcsgd[model.lr=0.05]``, so a cell
  never averages different settings.

Folders below a hidden one (``.seed_<n>.attempt<k>``, a previous attempt set aside) are not runs.

A run is

- ``finished``: its ``accuracy_matrix.json`` has all T rows;
- ``incomplete``: it has fewer rows (still running, or interrupted: resume it or rerun it);
- ``failed``: ``cl-lightning grid`` left a ``FAILED`` marker, or there is no readable matrix;
- ``missing``: its (benchmark, method, seed) belongs to the grid that the runs found span
  (the union of their methods x benchmarks x seeds) but has no folder.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from torch import Tensor

from cl_lightning.analysis.expected import ExpectedResult
from cl_lightning.cli.hparams import differing, method_columns, science
from cl_lightning.errors import UserError
from cl_lightning.rundir import (
    CONFIG_FILE,
    FAILED_MARKER,
    LOG_FILE,
    MATRIX_FILE,
    SEED_FOLDER,
    MatrixFileError,
    WallTime,
    is_hidden,
    population_of,
    read_matrix,
    run_folder,
    wall_time,
)

Status = Literal["finished", "incomplete", "failed", "missing"]
#: Where a run's benchmark, method and seed were read: its path in the grid layout, or its config.yaml.
Naming = Literal["layout", "config"]
#: How each kind of run is taken up again after a stop or a failure.
RERUN = {"layout": "rerun `cl-lightning grid`",
         "config": "resume its fit (cl-lightning fit --config <run folder>/config.yaml --ckpt_path <run folder>/checkpoints/last.ckpt)"}


class NoRunsError(UserError, FileNotFoundError):
    """No folder, or no run folder in the layout, where runs were expected."""


@dataclass
class Run:
    """One cell of the grid: where it is, what state it is in, and its matrix when it has one."""

    benchmark: str
    method: str
    seed: int
    status: Status
    folder: Path
    matrix: Tensor | None = None
    problem: str = ""
    named_by: Naming = "layout"
    #: The expected result its config carries (``expected:``), if any.
    expected: ExpectedResult | None = None

    @property
    def name(self) -> str:
        return f"{self.benchmark}/{self.method}/seed_{self.seed}"

    @property
    def where(self) -> str:
        """The run's name, and its folder where the name is not its path (a run named by its config)."""
        return self.name if self.named_by == "layout" else f"{self.name} ({self.folder})"

    @cached_property
    def wall_time(self) -> WallTime | None:
        """The process wall time the run cost, summed over its attempts: its own ``run.log``'s, or for a
        member of a population its share, the population's divided by its members (they trained in one
        process); None without a log line, or with a damaged ``population.json``."""
        try:
            population = population_of(self.folder)
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return None
        if population is None:
            return wall_time(self.folder)
        folder, size = population
        total = wall_time(folder)
        return None if total is None else total.share(size)

    @property
    def tasks_completed(self) -> int:
        return 0 if self.matrix is None else int((~self.matrix.isnan()).any(dim=1).sum())


def inspect_run(folder: Path, benchmark: str, method: str, seed: int, named_by: Naming = "layout") -> Run:
    """The state of the run in ``folder``, with its matrix when one is readable."""
    run = Run(benchmark, method, seed, "failed", folder, named_by=named_by, expected=ExpectedResult.of(read_config(folder)))
    marker = folder / FAILED_MARKER
    if marker.exists():
        first_line = (marker.read_text().splitlines() or ["(empty marker)"])[0]
        run.problem = f"{first_line} (log: {folder / LOG_FILE}); fix the cause and {RERUN[named_by]}"
        return run
    if not (folder / MATRIX_FILE).exists():
        run.problem = f"no {MATRIX_FILE}: the run stopped (or is still) before the end of its first task"
        return run
    try:
        run.matrix = read_matrix(folder / MATRIX_FILE).matrix
    except MatrixFileError as err:
        run.problem = str(err)
        return run
    done, total = run.tasks_completed, run.matrix.shape[0]
    if done < total:
        run.status = "incomplete"
        run.problem = f"{done} of {total} tasks done: still running, or interrupted ({RERUN[named_by]} to go on)"
    else:
        run.status = "finished"
    return run


@dataclass(frozen=True)
class Ignored:
    """A folder the report does not count (an accuracy matrix nothing names, a second copy of a run), and why."""

    folder: Path
    reason: str


Key = tuple[str, str, int]


def find_runs(roots: Path | Sequence[Path]) -> tuple[list[Run], list[Ignored]]:
    """All runs of the grids spanned by the runs below each of ``roots`` (one folder or several: the
    ``final`` folders of several sweeps make one table), missing ones included, in a stable order; plus
    the folders holding an accuracy matrix that are not counted, with the reason. Each root spans its
    own grid, and a run found below two roots counts once."""
    found: dict[Key, Run] = {}
    ignored: list[Ignored] = []
    for root in [roots] if isinstance(roots, (str, Path)) else roots:
        runs, skipped = find_runs_below(Path(root).resolve())
        ignored += skipped
        for run in runs:
            add_run(found, ignored, run, Path(root))
    ordered = sorted(found, key=lambda k: (benchmark_order(k[0]), method_order(k[1]), k[2]))
    return [found[key] for key in ordered], sorted(ignored, key=lambda i: i.folder)


def find_runs_below(root: Path) -> tuple[list[Run], list[Ignored]]:
    """:func:`find_runs` of one folder."""
    if not root.is_dir():
        raise NoRunsError(f"{root} is not a folder: pass the folder holding the runs (<benchmark>/<method>/seed_<n>/ "
                          "run folders, or fit's run folders with their config.yaml)")
    found: dict[Key, Run] = {}
    ignored: list[Ignored] = []
    configs: dict[Path, dict[str, Any]] = {}
    for folder in candidate_folders(root):
        config = read_config(folder)
        key = layout_key(folder, root, config)
        if key is not None:
            add_run(found, ignored, inspect_run(folder, *key), root)
        elif config is not None and config_key(config) is not None:
            configs[folder] = config
        elif (folder / MATRIX_FILE).exists():
            ignored.append(Ignored(folder, "not a <benchmark>/<method>/seed_<n> run folder, and no config.yaml beside its "
                                           "accuracy matrix names its method, benchmark and seed"))
    for folder, key in settings_keys(configs).items():
        add_run(found, ignored, inspect_run(folder, *key, named_by="config"), root)
    return span(found, root), ignored


def candidate_folders(root: Path) -> list[Path]:
    """The folders that may hold a run, ``root`` included: the ``seed_<n>`` folders (a failed grid run may
    hold nothing else) and those holding an accuracy matrix; none below a hidden folder."""
    folders = {p for p in root.rglob("seed_*") if p.is_dir() and SEED_FOLDER.fullmatch(p.name)}
    folders |= {p.parent for p in root.rglob(MATRIX_FILE)}
    if SEED_FOLDER.fullmatch(root.name):
        folders.add(root)
    return sorted(folder for folder in folders if not is_hidden(folder, root))


def read_config(folder: Path) -> dict[str, Any] | None:
    """The run's ``config.yaml``, None where there is none or it cannot be read as a mapping."""
    try:
        config = yaml.safe_load((folder / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def layout_key(folder: Path, root: Path, config: dict[str, Any] | None) -> Key | None:
    """(benchmark, method, seed) of a ``<benchmark>/<method>/seed_<n>`` folder in the grid layout, None
    for a folder outside it.

    A ``seed_<n>`` folder is not in the layout when the folder above it is a run (``fit`` puts a
    population's members inside its run folder), nor when its benchmark folder is not below ``root``
    and its config names another benchmark: members that ``fit`` wrote beside their run folder
    (``lightning_logs/seed_<n>``) would be named after ``lightning_logs`` and its parent, while a grid's
    benchmark or method folder given to ``report`` keeps the layout's names (``stable_sgd`` among them,
    which no config names)."""
    match = SEED_FOLDER.fullmatch(folder.name)
    if match is None or (folder.parent / CONFIG_FILE).exists():
        return None
    key = (folder.parent.parent.name, folder.parent.name, int(match.group(1)))
    below_root = len(folder.relative_to(root).parts) >= 3
    named = None if config is None else config_key(config)
    return key if below_root or named is None or named[0] == key[0] else None


def config_key(config: dict[str, Any]) -> Key | None:
    """(benchmark, method, seed) of a run from its config: ``<data.benchmark>_<data.source>`` (``permuted_digits``),
    :func:`method_name` and :func:`trained_seed`, the names the grid layout gives them; None for a config
    that does not name them all."""
    data = config.get("data") or {}
    seed = trained_seed(config)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("benchmark", "source")) or seed is None:
        return None
    try:
        method = method_name(config)
    except (AttributeError, KeyError, TypeError):  # callbacks that are not class_path / init_args entries
        return None
    return f"{data['benchmark']}_{data['source']}", method, seed


def method_name(config: dict[str, Any]) -> str:
    """The method as ``configs/<method>/`` names it: the method callbacks' classes in snake case (``MCSGD``
    -> ``mcsgd``, ``AGEM`` -> ``agem``), joined by ``+``; ``naive`` or ``multitask`` without one. Stable
    SGD is SGD with its own settings and no callback: its config says ``naive`` (``grid`` names it)."""
    classes = str(method_columns(config)["method"]).split("+")
    return "+".join(re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower() for name in classes)


def trained_seed(config: dict[str, Any]) -> int | None:
    """The seed the run trained: its one member's (``seeds: [k]``), else ``data.seed``, else
    ``seed_everything`` (the datamodule's order); None without an integer seed."""
    seeds, data = config.get("seeds"), config.get("data")
    if isinstance(seeds, list) and len(seeds) == 1:
        seed = seeds[0]
    else:
        seed = data.get("seed") if isinstance(data, dict) else None
    if seed is None:
        seed = config.get("seed_everything")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def settings_keys(configs: dict[Path, dict[str, Any]]) -> dict[Path, Key]:
    """:func:`config_key` of each run, the method followed by the settings that differ between the runs of
    its benchmark and method (``mcsgd[model.lr=0.05]``, the HParams columns of :mod:`cl_lightning.cli.hparams`),
    where they differ: two populations of other settings in one folder are two rows, never one cell."""
    keys = {folder: config_key(config) for folder, config in configs.items()}
    groups: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for folder, key in keys.items():
        groups[key[:2]].append(folder)
    for folders in groups.values():
        rows = {folder: {k: v for k, v in science(configs[folder]).items() if k != "seed"} for folder in folders}
        columns = differing(list(rows.values()))
        if not columns:
            continue
        for folder in folders:
            benchmark, method, seed = keys[folder]
            settings = ",".join(f"{column.replace('/', '.')}={rows[folder].get(column)}" for column in columns)
            keys[folder] = (benchmark, f"{method}[{settings}]", seed)
    return keys


def add_run(found: dict[Key, Run], ignored: list[Ignored], run: Run, root: Path) -> None:
    """Count ``run``, unless a run of the same benchmark, method (and settings) and seed is counted already:
    one seed must not enter a cell twice."""
    key = (run.benchmark, run.method, run.seed)
    if key in found:
        ignored.append(Ignored(run.folder, f"{run.name} again ({found[key].folder} is counted): a seed enters a cell once, "
                                           f"so move one of them out of {root}"))
    else:
        found[key] = run


def span(found: dict[Key, Run], root: Path) -> list[Run]:
    """The runs found in the table's order, with a ``missing`` run for every (benchmark, method, seed)
    of the grid that the grid-layout runs span but that has no folder. Runs named by their config
    span no grid: ``fit`` runs of other seeds or settings are not missing runs of each other."""
    grid = {key for key, run in found.items() if run.named_by == "layout"}
    for benchmark in {k[0] for k in grid}:
        for method in {k[1] for k in grid}:
            for seed in {k[2] for k in grid}:
                key = (benchmark, method, seed)
                if key not in found:
                    found[key] = Run(*key, "missing", run_folder(root, *key), problem="no run folder")
    return [found[key] for key in sorted(found, key=lambda k: (benchmark_order(k[0]), method_order(k[1]), k[2]))]


#: The paper's Table 1 order of rows and columns; other names follow alphabetically.
METHOD_ORDER = ("naive", "ewc", "agem", "er", "stable_sgd", "mcsgd", "multitask")
BENCHMARK_ORDER = ("permuted_mnist", "rotated_mnist", "split_cifar100", "permuted_fashion_mnist", "rotated_fashion_mnist",
                   "permuted_digits")


def method_order(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def benchmark_order(benchmark: str) -> tuple[int, str]:
    return (BENCHMARK_ORDER.index(benchmark) if benchmark in BENCHMARK_ORDER else len(BENCHMARK_ORDER), benchmark)
