"""A whole ``cl-lightning fit`` run against its bare floor (``benchmarks/floor.py``), back to back, by phase.

Why: the ratio of our whole run to a plain PyTorch script doing the same work (same config, data, batches,
consolidation or replay, evaluations) is what this library costs its users; the per-phase gap says where.

One command runs, for each thread count, ours and then the floor on the same config, seed and overrides. Each
run is a child process of this one (one process tree; a fresh interpreter each, so neither inherits the other's
memory, caches or thread pool) with ``torch.set_num_threads(t)`` (ours through its ``--num_threads``); a run's
time starts after its imports. Ours is the real command line (``cli_main``, in-process in its child: TensorBoard,
checkpoints, progress bar, accuracy matrix files all on). Further seeds (``--seeds``) run both once more at the
first thread count, for the accuracy comparison: the floor draws its random choices from torch's generators, not
our keyed streams, so its matrix should agree with ours within the spread over seeds, not bit for bit.

Phases, the same on both sides:

- data preparation: reading the files, drawing the tasks, and making the training batches' images (ours: the
  pre-flight ``setup``, ``train_dataloader`` and each batch's fetch; the floor: each task's images mapped once);
- training: the training steps (forward, loss, backward, optimizer); for ER, replay included (the floor replays
  inside its one joined batch, ours in ER's hooks, counted here);
- evaluation: the kept model (w_bar) on every seen task after each task, and MC-SGD's w_hat (ours: Lightning's
  validation loop without the accuracy matrix's files, plus ``task_accuracies``);
- consolidation: MC-SGD's task-end work besides w_hat's evaluation (memory, subset, line-gradient steps);
- other: the rest of the wall time (ours: Lightning's loop and hooks, logging, checkpoints, result files, the
  divergence guard).

Ours' phases come from a Lightning profiler that records only the few actions they are read from (Lightning's
``SimpleProfiler`` records every hook call, dozens per step, which would add its own time to ours).

    python benchmarks/end_to_end.py --config configs/mcsgd/rotated_fashion_mnist.yaml --threads 1 2 --seeds 0 1 2 \\
        [--out benchmarks/results/end_to_end_floor_<config>.json] [--commit <sha>] -- --data.root /work/data

Overrides after ``--`` go to both runs; the floor takes those listed in ``floor.OVERRIDES`` and refuses others.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PHASES = ("data_preparation", "training", "evaluation", "consolidation", "other")
#: The profiler actions ours' phases are read from (see :func:`run_ours`).
ACTIONS = frozenset({
    "[LightningDataModule]ContinualDataModule.setup", "[LightningDataModule]ContinualDataModule.train_dataloader",
    "[_TrainingEpochLoop].train_dataloader_next", "run_training_batch", "[Callback]ER.on_train_batch_start",
    "[Callback]ER.on_train_batch_end", "[Callback]MCSGD.on_train_batch_end", "[Callback]AccuracyMatrix.on_validation_end",
    "save_checkpoint",
})


@functools.cache
def phase_profiler() -> type:
    """A Lightning profiler that sums the seconds of the actions in :data:`ACTIONS`; any other action costs it a
    set lookup."""
    from lightning.pytorch.profilers import Profiler

    class PhaseProfiler(Profiler):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: dict[str, float] = defaultdict(float)
            self._started: dict[str, float] = {}

        def start(self, action_name: str) -> None:
            if action_name in ACTIONS:
                self._started[action_name] = time.perf_counter()

        def stop(self, action_name: str) -> None:
            started = self._started.pop(action_name, None)
            if started is not None:
                self.seconds[action_name] += time.perf_counter() - started

        def summary(self) -> str:
            return ""

    return PhaseProfiler


def __getattr__(name: str) -> type:
    """``end_to_end.PhaseProfiler``, which ours' run names on its command line, made on first use (PEP 562): so
    that only that run imports Lightning, not this parent process nor the floor's run."""
    if name == "PhaseProfiler":
        return phase_profiler()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def time_calls(owner: object, name: str) -> list[float]:
    """Wrap ``owner.name`` (a module's function or a class's method) so that each call's seconds are appended
    to the returned list."""
    seconds: list[float] = []
    function: Callable[..., Any] = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(owner, name, timed)
    return seconds


def run_ours(config: str, threads: int, overrides: list[str]) -> dict[str, Any]:
    """``cl-lightning fit`` on ``config``, timed by phase (module docstring)."""
    from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop

    from cl_lightning.cli import lightning_cli as cli_module
    from cl_lightning.evaluation.accuracy_matrix import AccuracyMatrix
    from cl_lightning.methods import mcsgd as mcsgd_module

    preflight = time_calls(cli_module, "check_run_inputs")
    validation = time_calls(_EvaluationLoop, "run")
    w_hat_evaluation = time_calls(mcsgd_module, "task_accuracies")
    publishing = time_calls(mcsgd_module.MCSGD, "_publish")  # its logging and w_hat matrix files: "other"
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        cli = cli_module.cli_main(["fit", "--config", config, "--num_threads", str(threads),
                                   "--trainer.profiler.class_path", "end_to_end.PhaseProfiler",
                                   "--trainer.default_root_dir", workdir, "--trainer.logger.init_args.save_dir", workdir,
                                   *overrides])
        seconds = time.perf_counter() - start
    action = cli.trainer.profiler.seconds
    matrices = next(c for c in cli.trainer.callbacks if isinstance(c, AccuracyMatrix)).matrix
    phases = {
        "data_preparation": sum(preflight) + action["[LightningDataModule]ContinualDataModule.setup"]
        + action["[LightningDataModule]ContinualDataModule.train_dataloader"] + action["[_TrainingEpochLoop].train_dataloader_next"],
        "training": action["run_training_batch"] + action["[Callback]ER.on_train_batch_start"] + action["[Callback]ER.on_train_batch_end"],
        "evaluation": sum(validation) - action["[Callback]AccuracyMatrix.on_validation_end"] + sum(w_hat_evaluation),
        "consolidation": action["[Callback]MCSGD.on_train_batch_end"] - sum(w_hat_evaluation) - sum(publishing),
    }
    phases["other"] = seconds - sum(phases.values())
    result: dict[str, Any] = {"seconds": seconds, "phases": phases, "matrix": matrices[0].tolist(),
                              "other_includes": {"accuracy_matrix_files": action["[Callback]AccuracyMatrix.on_validation_end"],
                                                 "checkpoints": action["save_checkpoint"]}}
    w_hat = [c.w_hat_matrix[0].tolist() for c in cli.trainer.callbacks if isinstance(c, mcsgd_module.MCSGD)]
    if w_hat:
        result["w_hat_matrix"] = w_hat[0]
    return result


def run_floor(config: str, threads: int, overrides: list[str]) -> dict[str, Any]:
    """``benchmarks/floor.py`` on ``config``."""
    import floor

    return floor.run(floor.read_settings(config, overrides))


def child(kind: str, config: str, threads: int, overrides: list[str], out: str) -> None:
    """One run in this (child) process; its result as JSON into ``out``."""
    import torch

    torch.set_num_threads(threads)
    result = (run_ours if kind == "ours" else run_floor)(config, threads, overrides)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps(result))


def spawn(kind: str, config: str, threads: int, seed: int, overrides: list[str]) -> dict[str, Any]:
    """Run ``kind`` (ours or floor) in a child process and return its result, with the load averages around it."""
    with tempfile.TemporaryDirectory() as folder:
        out, log = Path(folder, "result.json"), Path(folder, "output.txt")
        command = [sys.executable, __file__, "--child", kind, "--config", config, "--threads", str(threads),
                   "--result", str(out), "--", *overrides, "--seed_everything", str(seed)]
        load_before = os.getloadavg()[0]
        with log.open("w") as output:
            done = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            sys.exit(f"{kind} failed ({' '.join(command)}):\n{log.read_text()[-4000:]}")
        result = json.loads(out.read_text())
    result |= {"kind": kind, "threads": threads, "seed": seed, "load_before": load_before, "load_after": os.getloadavg()[0]}
    print(f"  {kind:5s} {threads} thread(s), seed {seed}: {result['seconds']:7.1f} s "
          f"(1-min load {load_before:.2f} -> {result['load_after']:.2f})", flush=True)
    return result


def scores(run: dict[str, Any]) -> dict[str, float]:
    """Average accuracy (%) and forgetting after the last task (``cl_lightning.metrics.continual``), and MC-SGD's
    w_hat average accuracy."""
    import torch

    from cl_lightning.metrics.continual import average_accuracy, forgetting

    matrix = torch.tensor(run["matrix"], dtype=torch.float64)
    last = matrix.shape[0] - 1
    values = {"average_accuracy": average_accuracy(matrix, last), "forgetting": forgetting(matrix, last)}
    if "w_hat_matrix" in run:
        values["w_hat_average_accuracy"] = average_accuracy(torch.tensor(run["w_hat_matrix"], dtype=torch.float64), last)
    return values


def timing(ours: dict[str, Any], bare: dict[str, Any]) -> dict[str, Any]:
    """Totals, ratio and per-phase gap of one pair of runs."""
    return {"threads": ours["threads"], "seed": ours["seed"], "ours_seconds": ours["seconds"], "floor_seconds": bare["seconds"],
            "ratio": ours["seconds"] / bare["seconds"], "ours_phases": ours["phases"], "floor_phases": bare["phases"],
            "gap": {p: ours["phases"][p] - bare["phases"][p] for p in PHASES}}


def agreement(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Ours' and the floor's final scores per seed, their means and spreads over seeds, and the differences."""
    per_seed = [{"seed": o["seed"], "ours": scores(o), "floor": scores(f)} for o, f in pairs]
    report: dict[str, Any] = {"per_seed": per_seed}
    for metric in per_seed[0]["ours"]:
        values = {side: [s[side][metric] for s in per_seed] for side in ("ours", "floor")}
        report[metric] = {f"{side}_{stat}": fn(v) if len(v) > 1 or stat == "mean" else None
                          for side, v in values.items() for stat, fn in (("mean", statistics.mean), ("sd", statistics.stdev))}
        report[metric]["difference_of_means"] = report[metric]["ours_mean"] - report[metric]["floor_mean"]
    return report


def head_commit() -> str | None:
    """The checkout's HEAD commit, read from the ``.git`` files (a worktree's ``gitdir`` followed), or None."""
    git = REPO / ".git"
    if git.is_file():
        git = (REPO / git.read_text().split(":", 1)[1].strip()).resolve()
    head = (git / "HEAD").read_text().strip()
    if not head.startswith("ref: "):
        return head
    ref = head[5:]
    common = (git / (git / "commondir").read_text().strip()).resolve() if (git / "commondir").is_file() else git
    for folder in dict.fromkeys((git, common)):
        if (folder / ref).is_file():
            return (folder / ref).read_text().strip()
        packed = folder / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return {"platform": platform.platform(), "cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def print_report(config: str, timings: list[dict[str, Any]], accuracy: dict[str, Any]) -> None:
    for t in timings:
        print(f"\n{config}, seed {t['seed']}, {t['threads']} thread(s): ours {t['ours_seconds']:.1f} s, "
              f"floor {t['floor_seconds']:.1f} s, ours/floor {t['ratio']:.2f}x")
        print(f"  {'phase':17s} {'ours':>8s} {'floor':>8s} {'gap':>8s}")
        for p in PHASES:
            print(f"  {p:17s} {t['ours_phases'][p]:8.1f} {t['floor_phases'][p]:8.1f} {t['gap'][p]:+8.1f}")
    print("\naccuracy after the last task (seed: ours / floor):")
    for s in accuracy["per_seed"]:
        print(f"  seed {s['seed']}: average accuracy {s['ours']['average_accuracy']:.2f} / {s['floor']['average_accuracy']:.2f} %, "
              f"forgetting {s['ours']['forgetting']:.3f} / {s['floor']['forgetting']:.3f}")
    for metric in accuracy["per_seed"][0]["ours"]:
        m = accuracy[metric]
        spread = f", sd over seeds {m['ours_sd']:.3f} / {m['floor_sd']:.3f}" if m["ours_sd"] is not None else ""
        print(f"  {metric}: mean {m['ours_mean']:.3f} / {m['floor_mean']:.3f}, difference {m['difference_of_means']:+.3f}{spread}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mcsgd/rotated_fashion_mnist.yaml")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts to time, each at the first seed")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the config's); the later ones run at the first "
                        "thread count only, for the accuracy comparison")
    parser.add_argument("--out", help="JSON result (default: benchmarks/results/end_to_end_floor_<method>_<config>.json)")
    parser.add_argument("--commit", help="the code's commit for the result (default: HEAD read from .git)")
    parser.add_argument("--child", choices=("ours", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    opts, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    if opts.child:
        return child(opts.child, opts.config, opts.threads[0], overrides, opts.result)
    commit = opts.commit or head_commit()  # now: others may commit in this checkout while the runs go on
    seeds = opts.seeds or [int(yaml.safe_load(Path(opts.config).read_text()).get("seed_everything", 0))]
    config = Path(opts.config)
    out = Path(opts.out or REPO / "benchmarks" / "results" / f"end_to_end_floor_{config.parent.name}_{config.stem}.json")
    print(f"{opts.config} {' '.join(overrides)}: ours then the floor, threads {opts.threads}, seeds {seeds}", flush=True)
    runs = []
    for threads in opts.threads:
        runs += [spawn(kind, opts.config, threads, seeds[0], overrides) for kind in ("ours", "floor")]
    for seed in seeds[1:]:
        runs += [spawn(kind, opts.config, opts.threads[0], seed, overrides) for kind in ("ours", "floor")]
    pairs = list(zip(runs[::2], runs[1::2]))
    timings = [timing(o, f) for o, f in pairs[: len(opts.threads)]]
    accuracy = agreement(pairs[:1] + pairs[len(opts.threads):])
    print_report(opts.config, timings, accuracy)
    import torch

    report = {"config": opts.config, "overrides": overrides, "commit": commit, "machine": machine(),
              "torch": torch.__version__, "threads": opts.threads, "seeds": seeds, "timings": timings, "accuracy": accuracy,
              "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
