"""Throughput of populations end to end (issue 16): ``cl-lightning fit --seeds [...]`` against the same
seeds as solo runs one after another, and against the bare population floor, measured side by side.

For each config and population size N, in one process per run (start-up included, as a user pays it):

- ``population``: one ``cl-lightning fit --config C --seeds [0, ..., N-1]``;
- ``solo``: ``cl-lightning fit --config C --seed_everything k`` for k = 0 .. N-1, one after another;
- ``floor``: the bare population of ``benchmarks/population.py`` (plain PyTorch, same MLP, batch size
  and number of steps; no evaluation, no method), the faster of its ``vmap`` and batched-matmul forms,
  for configs with the paper's MLP.

Throughput is runs finished per hour; the ratios are what the issue's targets are stated in (a
population of N against ONE solo run's wall time). Wall times here are noisy: compare ratios
measured in one invocation, never absolute numbers across machines.

    python benchmarks/population_runs.py                                    # naive B10 and MC-SGD rotated, N = 1 5
    python benchmarks/population_runs.py --configs configs/naive/permuted_fashion_mnist.yaml --sizes 1 5 \\
        -- --data.num_tasks 3 --data.train_examples_per_task 10000        # a shorter sequence
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from population import batch_orders, members, time_training  # noqa: E402  (benchmarks/population.py)

DEFAULT_CONFIGS = ["configs/naive/permuted_fashion_mnist.yaml", "configs/mcsgd/rotated_fashion_mnist.yaml"]


def fit_seconds(config: str, placement: list[str], overrides: list[str], out: Path) -> tuple[float, float]:
    """Wall time and peak resident memory (MB) of one ``cl-lightning fit`` process (it must succeed)."""
    command = [sys.executable, "-m", "cl_lightning", "fit", "--config", config, *placement,
               "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false", "--checkpoint.every_n_epochs", "0", *overrides]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / "fit.log", "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{(out / 'fit.log').read_text()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def steps_of(config: str, overrides: list[str]) -> tuple[int, int]:
    """(training steps of the whole sequence, batch size) of the config with ``overrides``, from its data
    section (the floor trains as many steps)."""
    data = yaml.safe_load(Path(config).read_text())["data"]
    for option, value in zip(overrides[::2], overrides[1::2]):
        if option.startswith("--data."):
            data[option.removeprefix("--data.")] = yaml.safe_load(value)
    per_task = data.get("train_examples_per_task") or 60_000 * (1 - data.get("val_fraction", 0.0))
    batches = -(-int(per_task) // data.get("batch_size", 64))
    return batches * data.get("epochs_per_task", 1) * data.get("num_tasks", 20), data.get("batch_size", 64)


def floor_seconds(n: int, batch: int, steps: int, device: torch.device) -> float:
    """The bare population's training time for ``steps`` steps of N paper MLPs (timed on at most 2,000
    steps and scaled): the faster of ``vmap`` and batched matmuls."""
    timed = min(steps, 2_000)
    x = torch.rand(60_000, 1, 28, 28, device=device)
    y = torch.randint(10, (60_000,), device=device)
    order = batch_orders(n, (timed + 10) * batch, 60_000, device)
    per_step = min(time_training(impl, members(n), x, y, order, batch, timed, 10, lr=0.01, momentum=0.8)[0]
                   for impl in ("vmap", "bmm"))
    return per_step * steps


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 5], help="population sizes N")
    parser.add_argument("--solo_runs", type=int, default=None, help="run at most this many of the N solo runs and "
                        "count the others at their mean time (default: all N; e.g. 2 for N = 64 on a GPU)")
    parser.add_argument("--device", default="cpu", help="where the floor trains; pass the runs' device after `--` "
                        "(e.g. -- --trainer.accelerator gpu)")
    parser.add_argument("--out", default="benchmarks/results/population_runs.json")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)  # as the CLI's default --num_threads 1
    results = []
    for config in args.configs:
        steps, batch = steps_of(config, overrides)
        for n in args.sizes:
            with tempfile.TemporaryDirectory() as tmp:
                seeds = "[" + ",".join(map(str, range(n))) + "]"
                population, population_mb = fit_seconds(config, ["--seeds", seeds], overrides, Path(tmp) / "population")
                solos = [fit_seconds(config, ["--seed_everything", str(k)], overrides, Path(tmp) / f"solo_{k}")
                         for k in range(min(n, args.solo_runs or n))]
            measured = [seconds for seconds, _ in solos]
            solo = measured + [sum(measured) / len(measured)] * (n - len(measured))  # the rest at their mean
            floor = floor_seconds(n, batch, steps, device)
            row = {"config": config, "overrides": overrides, "n": n, "steps": steps, "batch": batch,
                   "population_s": population, "solo_s": solo, "solo_runs_measured": len(measured), "floor_s": floor,
                   "peak_rss_mb": {"population": population_mb, "solo": solos[0][1],
                                   "per_extra_member": (population_mb - solos[0][1]) / max(n - 1, 1)},
                   "population_vs_one_solo": population / solo[0], "n_solo_vs_population": sum(solo) / population,
                   "population_vs_floor": population / floor,
                   "runs_per_hour": {"population": 3600 * n / population, "solo": 3600 * n / sum(solo)}}
            results.append(row)
            print(f"{config} N={n}: population {population:.1f} s ({row['population_vs_one_solo']:.2f}x one solo run, "
                  f"{row['n_solo_vs_population']:.2f}x faster than {n} solo runs), floor {floor:.1f} s "
                  f"(population {row['population_vs_floor']:.2f}x the floor); runs/hour population "
                  f"{row['runs_per_hour']['population']:.0f} vs solo {row['runs_per_hour']['solo']:.0f}; peak RSS "
                  f"{population_mb:.0f} MB (solo {solos[0][1]:.0f} MB)", flush=True)
    Path(args.out).write_text(json.dumps({"machine": platform.platform(), "device": str(device), "torch": torch.__version__,
                                          "results": results}, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
