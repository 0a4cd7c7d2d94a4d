"""``cl-lightning grid``: run methods x benchmarks x seeds with the shipped configs, one after another.

Each run is ``cl-lightning fit --config <configs>/<method>/<benchmark>.yaml --seed_everything <n>``
with the TensorBoard logger pointed at ``<root>/<benchmark>/<method>/seed_<n>/`` (plain
LightningCLI overrides, printed by ``--dry_run`` to reuse in a job script), in its own process,
so a crash or an out-of-memory kill ends that run only. Its console output goes to ``run.log``
in its folder.

Rerunning the same command resumes the grid: finished runs (all T rows of the accuracy matrix)
are skipped; a failed or interrupted run is run again from scratch after its folder is moved
aside to ``.seed_<n>.attempt<k>`` (hidden, so ``cl-lightning report`` ignores it). A failed run
leaves a ``FAILED`` marker and the grid goes on; the exit status is 1 when any run failed.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cl_lightning.analysis.runs import FAILED_MARKER, LOG_FILE, MATRIX_FILE, inspect_run, run_folder, wall_time_line
from cl_lightning.metrics.continual import average_accuracy


def fit_command(config: Path, root: Path, benchmark: str, method: str, seed: int, overrides: Sequence[str]) -> list[str]:
    """The ``cl-lightning fit`` arguments of one run (after ``python -m cl_lightning``)."""
    return [
        "fit", "--config", str(config), "--seed_everything", str(seed),
        "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.logger.init_args.name", f"{benchmark}/{method}",
        "--trainer.logger.init_args.version", f"seed_{seed}",
        *overrides,
    ]


def set_aside(folder: Path) -> Path:
    """Move a failed or interrupted run's folder to ``.seed_<n>.attempt<k>`` next to it."""
    k = 1
    while (target := folder.with_name(f".{folder.name}.attempt{k}")).exists():
        k += 1
    folder.rename(target)
    return target


def wait_passing_on_ctrl_c(child: subprocess.Popen) -> int:
    """The child's exit status. Ctrl-C (SIGINT) reaches only the grid, the child running in a
    session of its own: it is passed on, once per Ctrl-C, so that the child stops as ``fit`` does
    (a checkpoint at its next consistent point; a second Ctrl-C stops it at once) rather than being
    killed mid-write, and re-raised once the child has ended."""
    interrupted = False
    while True:
        try:
            code = child.wait()
            break
        except KeyboardInterrupt:
            interrupted = True
            child.send_signal(signal.SIGINT)
    if interrupted:
        raise KeyboardInterrupt
    return code


def run_one(command: list[str], folder: Path) -> tuple[bool, str]:
    """Run one fit in a child process; on failure leave the ``FAILED`` marker. Returns (ok, summary).
    An interrupted run (Ctrl-C) gets no marker: it is unfinished, and the next grid command reruns it."""
    folder.mkdir(parents=True)
    start = time.monotonic()
    with open(folder / LOG_FILE, "w") as log:
        log.write("$ cl-lightning " + " ".join(command[3:]) + "\n\n")
        log.flush()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = wait_passing_on_ctrl_c(child)
        finally:
            seconds = time.monotonic() - start
            log.write(wall_time_line(seconds, child.returncode))
    run = inspect_run(folder, "", "", 0)
    if code == 0 and run.status == "finished":
        return True, f"done in {seconds:.0f} s, average accuracy {average_accuracy(run.matrix, run.matrix.shape[0] - 1):.2f} %"
    lines = (folder / LOG_FILE).read_text().splitlines()
    reason = f"exit code {code}" if code else f"exit code 0 but the run is {run.status}: {run.problem}"
    last_error = next((line for line in reversed(lines) if "Error" in line or "error:" in line), "")
    (folder / FAILED_MARKER).write_text(f"{reason}: {last_error}\n\nlast lines of {LOG_FILE}:\n" + "\n".join(lines[-30:]) + "\n")
    return False, f"FAILED ({reason}) after {seconds:.0f} s, see {folder / LOG_FILE}"


def is_finished(folder: Path) -> bool:
    """A run whose folder holds an accuracy matrix with all T rows and no failure marker."""
    return (folder / MATRIX_FILE).exists() and inspect_run(folder, "", "", 0).status == "finished"


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
        "Finished runs are skipped, so rerunning the command completes a grid; failed or interrupted runs are moved "
        "aside to .seed_<n>.attempt<k> and run again. Anything after `--` is passed to every run, e.g. "
        "`-- --trainer.accelerator gpu --data.root /data`. Then: cl-lightning report <root>.",
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
        sys.exit(f"error: no config {', '.join(absent)}; --configs {args.configs} holds: {', '.join(available) or 'nothing'} "
                 "(run from the repository root, or point --configs at the configs folder)")

    try:
        run_grid(args, grid, configs, overrides)
    except KeyboardInterrupt:
        print(f"interrupted (Ctrl-C); finished runs are kept and the interrupted one starts again when you rerun: "
              f"cl-lightning grid {shlex.join(argv)}", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)


def run_grid(args: argparse.Namespace, grid: list[tuple[str, str, int]], configs: dict[tuple[str, str], Path],
             overrides: list[str]) -> None:
    """Run (or with ``--dry_run`` print) the grid's runs that are not finished, in order."""
    failed = []
    for i, (benchmark, method, seed) in enumerate(grid, 1):
        folder = run_folder(args.root, benchmark, method, seed)
        command = [sys.executable, "-m", "cl_lightning",
                   *fit_command(configs[benchmark, method], args.root, benchmark, method, seed, overrides)]
        prefix = f"[{i}/{len(grid)}] {benchmark}/{method}/seed_{seed}:"
        if is_finished(folder):
            print(f"{prefix} finished already, skipped", flush=True)
            continue
        if args.dry_run:
            print(f"{prefix} cl-lightning {' '.join(command[3:])}")
            continue
        if folder.exists():
            print(f"{prefix} previous attempt moved to {set_aside(folder)}", flush=True)
        print(f"{prefix} running ...", flush=True)
        ok, summary = run_one(command, folder)
        print(f"{prefix} {summary}", flush=True)
        if not ok:
            failed.append(folder)
    if failed:
        sys.exit(f"{len(failed)} run(s) failed: {', '.join(map(str, failed))}. Fix the cause and run the same command again.")
    if not args.dry_run:
        print(f"grid complete: cl-lightning report {args.root}")

