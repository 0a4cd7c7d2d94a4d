"""The runs of a grid below a folder, each with its accuracy matrix and its state.

A run folder is ``<root>/<benchmark>/<method>/seed_<n>/``: the layout of
:mod:`cl_lightning.rundir`, which ``cl-lightning grid`` and ``sweep`` write. Method, benchmark and
seed are read from that layout, so a run is identified without parsing its config, and folders
outside the layout (``version_0``) are reported as ignored rather than guessed at.

A run is

- ``finished``: its ``accuracy_matrix.json`` has all T rows;
- ``incomplete``: it has fewer rows (still running, or interrupted: resume it or rerun it);
- ``failed``: ``cl-lightning grid`` left a ``FAILED`` marker, or there is no readable matrix;
- ``missing``: its (benchmark, method, seed) belongs to the grid that the runs found span
  (the union of their methods x benchmarks x seeds) but has no folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from torch import Tensor

from cl_lightning.errors import UserError
from cl_lightning.rundir import (
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

    @property
    def name(self) -> str:
        return f"{self.benchmark}/{self.method}/seed_{self.seed}"

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


def inspect_run(folder: Path, benchmark: str, method: str, seed: int) -> Run:
    """The state of the run in ``folder``, with its matrix when one is readable."""
    run = Run(benchmark, method, seed, "failed", folder)
    marker = folder / FAILED_MARKER
    if marker.exists():
        first_line = (marker.read_text().splitlines() or ["(empty marker)"])[0]
        run.problem = f"{first_line} (log: {folder / LOG_FILE}); fix the cause and rerun `cl-lightning grid`"
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
        run.problem = f"{done} of {total} tasks done: still running, or interrupted (rerun `cl-lightning grid` to resume it)"
    else:
        run.status = "finished"
    return run


def find_runs(root: Path) -> tuple[list[Run], list[Path]]:
    """All runs of the grid spanned by the run folders below ``root``, missing ones included, in a
    stable order; plus the folders holding an accuracy matrix outside the layout (ignored)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise NoRunsError(f"{root} is not a folder: pass the folder holding <benchmark>/<method>/seed_<n>/ run folders")
    seed_folders = [root] if SEED_FOLDER.fullmatch(root.name) else []
    seed_folders += [p for p in root.rglob("seed_*") if p.is_dir() and SEED_FOLDER.fullmatch(p.name) and not is_hidden(p, root)]
    found = {}
    for folder in seed_folders:
        key = (folder.parent.parent.name, folder.parent.name, int(SEED_FOLDER.fullmatch(folder.name).group(1)))
        found[key] = inspect_run(folder, *key)
    ignored = sorted(
        p.parent for p in root.rglob(MATRIX_FILE)
        if not is_hidden(p.parent, root) and p.parent not in seed_folders and not SEED_FOLDER.fullmatch(p.parent.name)
    )
    benchmarks = {k[0] for k in found}
    methods = {k[1] for k in found}
    seeds = {k[2] for k in found}
    runs = []
    for benchmark in sorted(benchmarks, key=benchmark_order):
        for method in sorted(methods, key=method_order):
            for seed in sorted(seeds):
                key = (benchmark, method, seed)
                if key not in found:
                    folder = run_folder(root, *key)
                    found[key] = Run(*key, "missing", folder, problem="no run folder")
                runs.append(found[key])
    return runs, ignored


#: The paper's Table 1 order of rows and columns; other names follow alphabetically.
METHOD_ORDER = ("naive", "ewc", "agem", "er", "stable_sgd", "mcsgd", "multitask")
BENCHMARK_ORDER = ("permuted_mnist", "rotated_mnist", "split_cifar100", "permuted_fashion_mnist", "rotated_fashion_mnist",
                   "permuted_digits")


def method_order(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def benchmark_order(benchmark: str) -> tuple[int, str]:
    return (BENCHMARK_ORDER.index(benchmark) if benchmark in BENCHMARK_ORDER else len(BENCHMARK_ORDER), benchmark)
