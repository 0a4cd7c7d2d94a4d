"""``cl-lightning grid``: run methods x benchmarks x seeds with the shipped configs, one after another.

Each run is ``cl-lightning fit --config <configs>/<method>/<benchmark>.yaml --seed_everything <n>``
with the TensorBoard logger pointed at ``<root>/<benchmark>/<method>/seed_<n>/`` (plain
LightningCLI overrides, printed by ``--dry_run`` to reuse in a job script), in its own process,
so a crash or an out-of-memory kill ends that run only. Its console output goes to ``run.log``
in its folder (:mod:`cl_lightning.rundir` owns the layout and the launch, shared with ``sweep``).

Rerunning the same command resumes the grid: finished runs (all T rows of the accuracy matrix)
are skipped; an interrupted run resumes from its ``checkpoints/last.ckpt``; a failed run, or one
stopped before its first checkpoint, is run again from scratch after its folder is moved aside to
``.seed_<n>.attempt<k>`` (hidden, so ``cl-lightning report`` ignores it). A failed run leaves a
``FAILED`` marker and the grid goes on; the exit status is 1 when any run failed.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from cl_lightning.errors import UserError
from cl_lightning.rundir import (
    LOG_FILE,
    Terminated,
    interrupted_exit,
    is_finished,
    launch,
    placement,
    prepare,
    read_result,
    run_folder,
    signal_of,
    sigterm_raises_terminated,
)


class GridError(UserError):
    """A grid that cannot start (a config missing) or whose runs failed."""


def fit_command(config: Path, root: Path, benchmark: str, method: str, seed: int, overrides: Sequence[str]) -> list[str]:
    """The ``cl-lightning fit`` arguments of one run (the user's overrides last: they win)."""
    return ["fit", "--config", str(config), *placement(root, benchmark, method, seed), *overrides]


def run_one(folder: Path, fit_args: list[str], resume: list[str]) -> tuple[bool, str]:
    """Run one fit into ``folder`` (resumed with ``resume``, see :func:`~cl_lightning.rundir.prepare`).
    Returns (ok, summary); a stop by a signal is not ok but leaves no ``FAILED`` marker: the next grid
    command resumes it."""
    outcome = launch(folder, fit_args, resume)
    if outcome.failure is None and not outcome.stopped:
        result = read_result(folder)
        return True, f"done in {outcome.seconds:.0f} s, average accuracy {result['average_accuracy']:.2f} %"
    state = "stopped" if outcome.stopped else "FAILED"
    return False, f"{state} ({outcome.failure or f'exit code {outcome.code}'}) after {outcome.seconds:.0f} s, see {folder / LOG_FILE}"


def main(argv: Sequence[str] | None = None) -> None:
    """``cl-lightning grid``; ``argv`` are the arguments after ``grid`` (default: ``sys.argv[2:]``)."""
    argv = list(sys.argv[2:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(
        prog="cl-lightning grid",
        allow_abbrev=False,  # a typo must not silently set another option
        usage="cl-lightning grid --methods M [M ...] --benchmarks B [B ...] --seeds N [N ...] [options] [-- fit overrides]",
        description="Run every method x benchmark x seed, one `cl-lightning fit` process at a time, with the configs "
        "<configs>/<method>/<benchmark>.yaml, into <root>/<benchmark>/<method>/seed_<n>/ (console output in run.log). "
        "Finished runs are skipped and interrupted ones resume from their last checkpoint, so rerunning the command "
        "completes a grid; failed runs are moved aside to .seed_<n>.attempt<k> and run again. Anything after `--` is "
        "passed to every run, e.g. `-- --trainer.accelerator gpu --data.root /data`. Then: cl-lightning report <root>.",
    )
    parser.add_argument("--methods", nargs="+", required=True, help="config folders, e.g. naive mcsgd")
    parser.add_argument("--benchmarks", nargs="+", required=True, help="config names, e.g. permuted_mnist rotated_mnist")
    parser.add_argument("--seeds", nargs="+", type=int, required=True, help="values of seed_everything, e.g. 0 1 2 3 4")
    parser.add_argument("--root", type=Path, default=Path("lightning_logs"), help="where the run folders go (default: %(default)s)")
    parser.add_argument("--configs", type=Path, default=Path("configs"), help="folder of <method>/<benchmark>.yaml (default: %(default)s)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands and what would be skipped; run nothing")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    grid = [(b, m, s) for b in args.benchmarks for m in args.methods for s in args.seeds]
    configs = {(b, m): args.configs / m / f"{b}.yaml" for b, m, _ in grid}
    absent = sorted(str(path) for path in set(configs.values()) if not path.is_file())
    if absent:
        available = sorted(str(p.relative_to(args.configs)) for p in args.configs.glob("*/*.yaml"))
        raise GridError(f"no config {', '.join(absent)}; --configs {args.configs} holds: {', '.join(available) or 'nothing'} "
                        "(run from the repository root, or point --configs at the configs folder)")

    try:
        with sigterm_raises_terminated():
            run_grid(args, grid, configs, overrides)
    except (KeyboardInterrupt, Terminated) as stop:
        interrupted_exit(f"cl-lightning grid {shlex.join(argv)}", signal_of(stop))


def run_grid(args: argparse.Namespace, grid: list[tuple[str, str, int]], configs: dict[tuple[str, str], Path],
             overrides: list[str]) -> None:
    """Run (or with ``--dry_run`` print) the grid's runs that are not finished, in order."""
    unfinished = []
    for i, (benchmark, method, seed) in enumerate(grid, 1):
        folder = run_folder(args.root, benchmark, method, seed)
        command = fit_command(configs[benchmark, method], args.root, benchmark, method, seed, overrides)
        prefix = f"[{i}/{len(grid)}] {benchmark}/{method}/seed_{seed}:"
        if is_finished(folder):
            print(f"{prefix} finished already, skipped", flush=True)
            continue
        if args.dry_run:
            print(f"{prefix} cl-lightning {' '.join(command)}")
            continue
        resume = prepare(folder)
        print(f"{prefix} {f'resuming from {resume[-1]}' if resume else 'running'} ...", flush=True)
        ok, summary = run_one(folder, command, resume)
        print(f"{prefix} {summary}", flush=True)
        if not ok:
            unfinished.append(folder)
    if unfinished:
        raise GridError(f"{len(unfinished)} run(s) did not finish: {', '.join(map(str, unfinished))}. Fix the cause "
                        "(see their run.log) and run the same command again: finished runs are kept, stopped ones resume")
    if not args.dry_run:
        print(f"grid complete: cl-lightning report {args.root}")

