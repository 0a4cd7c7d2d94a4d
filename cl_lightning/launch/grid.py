"""``cl-lightning grid``: run methods x benchmarks x seeds with the shipped configs, one cell after another
(``--jobs J``: up to J at once).

The seeds of a (benchmark, method) cell train together as one population in one process:
``cl-lightning fit --config <configs>/<method>/<benchmark>.yaml --seeds [s1,...]`` with the
TensorBoard logger pointed at ``<root>/<benchmark>/<method>/seeds_<s1>-...`` (checkpoints and
``run.log``), each member writing its results into ``<root>/<benchmark>/<method>/seed_<n>/``, the
folder a plain run with that seed gets (plain LightningCLI overrides, printed by ``--dry_run`` to
reuse in a job script). ``--solo`` runs each seed in its own process instead (``--seed_everything
<n>``, everything in ``seed_<n>/``), so a crash or an out-of-memory kill ends that run only. The
console output goes to ``run.log`` (:mod:`cl_lightning.rundir` owns the layout, :mod:`cl_lightning.launch`
the launch, both shared with ``sweep``).

Rerunning the same command resumes the grid: finished runs (all T rows of the accuracy matrix)
are skipped, and only the unfinished seeds of a cell form its population; an interrupted run
resumes from its ``checkpoints/last.ckpt``; a failed run, or one stopped before its first
checkpoint, is run again from scratch after its folder (and, for a population, its members'
folders) is moved aside to ``.<name>.attempt<k>`` (hidden, so ``cl-lightning report`` ignores it).
A failed run, or a member that did not finish (e.g. stopped by the divergence guard), leaves a
``FAILED`` marker and the grid goes on; the exit status is 1 when any run failed.

The run folders' module (:mod:`cl_lightning.rundir`, which :mod:`cl_lightning.launch` imports) loads torch,
seconds on a busy machine: it is imported inside the functions that use it, so that ``grid --help`` and a
refused argument answer at once.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

from cl_lightning.errors import UserError

if TYPE_CHECKING:  # loads torch (see above)
    from cl_lightning.launch.process import Outcome


class GridError(UserError):
    """A grid that cannot start (a config missing) or whose runs failed."""


def fit_command(config: Path, root: Path, benchmark: str, method: str, seeds: Sequence[int],
                overrides: Sequence[str]) -> list[str]:
    """The ``cl-lightning fit`` arguments of one run of ``seeds`` (one seed: a plain run in its
    ``seed_<n>/`` folder; several: a population), the user's overrides last: they win."""
    from cl_lightning.rundir import placement, population_placement

    where = (placement(root, benchmark, method, seeds[0]) if len(seeds) == 1
             else population_placement(root, benchmark, method, seeds))
    return ["fit", "--config", str(config), *where, *overrides]


def summary(folder: Path, members: list[Path], outcome: Outcome) -> tuple[bool, str]:
    """Whether the fit into ``folder`` finished, and the line that says how it ended. A stop by a signal
    is not ok but leaves no ``FAILED`` marker: the next grid command resumes it. A population is ok when
    all its ``members`` finished (:func:`~cl_lightning.launch.jobs.run_job` marked the others)."""
    from cl_lightning.rundir import LOG_FILE, is_finished, members_of, read_result

    if members_of(folder) is not None and not outcome.stopped:
        finished = [is_finished(member) for member in members]
        results = [f"{m.name} {read_result(m)['average_accuracy']:.2f} %" if done else f"{m.name} FAILED"
                   for m, done in zip(members, finished)]
        ok = all(finished)
        return ok, f"{'done' if ok else 'FAILED'} in {outcome.seconds:.0f} s, average accuracy " + ", ".join(results) + (
            "" if ok else f"; see {folder / LOG_FILE}")
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
        description="Run every method x benchmark x seed, one `cl-lightning fit` process at a time (--jobs: several), with the configs "
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
    parser.add_argument("--solo", action="store_true", help="one process per seed instead of one population per "
                        "(benchmark, method) cell: slower, but a crash ends one seed's run only")
    parser.add_argument("--jobs", type=int, default=1, metavar="J",
                        help="run up to J fit processes at once (default: %(default)s, one after another). Each fit uses "
                        "one CPU thread unless --num_threads says otherwise, so on CPU J up to the number of cores; on "
                        "one GPU the J processes share it")
    parser.add_argument("--dry_run", action="store_true", help="print the commands and what would be skipped; run nothing")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    from cl_lightning.launch.process import Terminated, interrupted_exit, signal_of, sigterm_raises_terminated
    from cl_lightning.rundir import check_writable
    from cl_lightning.seeding import MAX_SEED

    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if any(seed < 0 or seed > MAX_SEED for seed in args.seeds):
        parser.error(f"--seeds must be integers from 0 to {MAX_SEED}, got {' '.join(map(str, args.seeds))}")
    if not args.dry_run:
        check_writable(args.root, "root")  # one line now, not a traceback in every run's log

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
    """Run (or with ``--dry_run`` print) the grid's runs that are not finished, in order: per cell, one
    population of its unfinished seeds (``--solo``: one run per seed); ``--jobs`` of them at once."""
    from cl_lightning.rundir import is_finished, run_folder

    cells: dict[tuple[str, str], list[int]] = {}
    for benchmark, method, seed in grid:
        cells.setdefault((benchmark, method), []).append(seed)
    groups = []
    for i, ((benchmark, method), seeds) in enumerate(cells.items(), 1):
        prefix = f"[{i}/{len(cells)}] {benchmark}/{method}"
        pending = []
        for seed in seeds:
            if is_finished(run_folder(args.root, benchmark, method, seed)):
                print(f"{prefix}/seed_{seed}: finished already, skipped", flush=True)
            else:
                pending.append(seed)
        groups += [(benchmark, method, group, prefix)
                   for group in ([[seed] for seed in pending] if args.solo else [pending] if pending else [])]
    stopping = threading.Event()

    def run(benchmark: str, method: str, group: list[int], prefix: str) -> bool:
        return run_group(args, benchmark, method, group, configs[benchmark, method], overrides, prefix, stopping)

    jobs = 1 if args.dry_run else args.jobs
    outcomes = [run(*g) for g in groups] if jobs == 1 else run_concurrently(run, groups, jobs, stopping)
    unfinished = [f"{benchmark}/{method} seeds {group}" for (benchmark, method, group, _), ok in zip(groups, outcomes) if not ok]
    if unfinished:
        raise GridError(f"{len(unfinished)} run(s) did not finish: {'; '.join(unfinished)}. Fix the cause "
                        "(see their run.log) and run the same command again: finished runs are kept, stopped ones resume")
    if not args.dry_run:
        print(f"grid complete: cl-lightning report {args.root}")


def run_concurrently(run: Callable[..., bool], groups: list[tuple], jobs: int, stopping: threading.Event) -> list[bool]:
    """``run(*group)`` for every group, ``jobs`` at a time, each in a thread of its own. Ctrl-C and
    SIGTERM reach this (the main) thread: it passes each on to every running fit (once per signal,
    also to a fit a job was starting just then), starts no more, waits for the fits to stop (each with
    its checkpoint) and re-raises, as the one-at-a-time grid does."""
    from cl_lightning.launch.process import POLL_SECONDS, Terminated, pass_on, signal_of

    stop: KeyboardInterrupt | Terminated | None = None
    signalled: set = set()
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="grid-job") as pool:
        futures: list[Future] = [pool.submit(run, *group) for group in groups]
        pending = set(futures)
        while pending:
            try:
                _, pending = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            except (KeyboardInterrupt, Terminated) as caught:
                stop, signalled = caught, set()  # a new signal goes to every fit again
                stopping.set()
                for future in futures:
                    future.cancel()
            if stop is not None:
                signalled |= pass_on(signal_of(stop), skip=signalled)
    if stop is not None:
        raise stop
    return [future.result() for future in futures]


def run_group(args: argparse.Namespace, benchmark: str, method: str, seeds: list[int], config: Path,
              overrides: list[str], prefix: str, stopping: threading.Event | None = None) -> bool:
    """Run one fit of ``seeds`` (a plain run, or a population of several); False if it did not finish
    (or was not started: ``stopping`` is set once the grid was told to stop)."""
    from cl_lightning.launch.jobs import run_job
    from cl_lightning.rundir import population_folder, run_folder, set_aside_existing

    if stopping is not None and stopping.is_set():
        return False
    population = len(seeds) > 1
    folder = (population_folder(args.root, benchmark, method, seeds) if population
              else run_folder(args.root, benchmark, method, seeds[0]))
    command = fit_command(config, args.root, benchmark, method, seeds, overrides)
    label = f"{prefix}/{folder.name}"
    if args.dry_run:
        print(f"{label}: cl-lightning {' '.join(command)}")
        return True
    members = [run_folder(args.root, benchmark, method, seed) for seed in seeds]

    def starting(checkpoint: Path | None) -> None:
        print(f"{label}: {f'resuming from {checkpoint}' if checkpoint else 'running'} ...", flush=True)

    job = run_job(folder, command, members, on_start=starting)
    ok, line = summary(folder, members, job.fit)
    print(f"{label}: {line}", flush=True)
    if job.halve:
        # too large for the device: two populations of half the seeds, each split again if need be
        halves = [seeds[: len(seeds) // 2], seeds[len(seeds) // 2:]]
        print(f"{label}: out of the device's memory; training seeds {halves[0]} and {halves[1]} separately", flush=True)
        set_aside_existing([folder, *members])
        return all([run_group(args, benchmark, method, half, config, overrides, prefix, stopping) for half in halves])
    return ok
