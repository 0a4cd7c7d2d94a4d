"""A whole MC-SGD run through ``cl-lightning fit``, with the time broken down by phase.

Default: the 20-task Rotated Fashion-MNIST config (``configs/mcsgd/rotated_fashion_mnist.yaml``),
full data. Lightning's ``SimpleProfiler`` records every hook; the phases are read from it:

- data preparation: the pre-flight check before the Trainer starts (``check_run_inputs``: it calls the
  datamodule's ``setup``, which reads the files and draws each member's tasks; outside the profiler, so
  timed here around that call) and any ``setup`` / ``train_dataloader`` time the profiler records;
- training: the training batches (forward, backward, step, per-step hooks);
- evaluation: the validation loops after each task;
- consolidation: MC-SGD's task-end work (the line-gradient epoch and w_hat's evaluation), i.e.
  its ``on_train_batch_end`` hook.

    python benchmarks/end_to_end.py [--config configs/mcsgd/rotated_fashion_mnist.yaml] [-- fit overrides]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from cl_lightning.cli import lightning_cli as cli_module
from cl_lightning.cli.lightning_cli import cli_main
from cl_lightning.evaluation.accuracy_matrix import AccuracyMatrix
from cl_lightning.metrics.continual import summary


def phase_seconds(durations: dict[str, list[float]]) -> dict[str, float]:
    """Sum the profiler's recorded actions into the phases above."""
    def total(predicate) -> float:
        return sum(sum(times) for action, times in durations.items() if predicate(action))

    return {
        "data_preparation": total(lambda a: a.endswith("DataModule.setup") or a.endswith("train_dataloader")),
        "training": total(lambda a: a == "run_training_batch"),
        "evaluation": total(lambda a: a.startswith("[_EvaluationLoop]") and a.endswith("val_next")
                            or a.startswith("[Strategy]") and a.endswith("validation_step")),
        "consolidation": total(lambda a: a == "[Callback]MCSGD.on_train_batch_end"),
    }


def time_calls(owner: object, name: str) -> list[float]:
    """Wrap ``owner.name`` so that each call's seconds are appended to the returned list."""
    seconds: list[float] = []
    function = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(owner, name, timed)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mcsgd/rotated_fashion_mnist.yaml")
    parser.add_argument("--out", default="benchmarks/results/end_to_end.json")
    opts, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    preflight = time_calls(cli_module, "check_run_inputs")
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        cli = cli_main(["fit", "--config", opts.config, "--trainer.profiler", "simple",
                        "--trainer.default_root_dir", workdir, "--trainer.logger.init_args.save_dir", workdir, *overrides])
        wall = time.perf_counter() - start
    durations = cli.trainer.profiler.recorded_durations
    phases = phase_seconds(durations)
    phases["data_preparation"] += sum(preflight)
    phases["other"] = wall - sum(phases.values())
    accuracy = next(c for c in cli.trainer.callbacks if isinstance(c, AccuracyMatrix)).matrix[0]  # member 0
    scores = summary(accuracy, accuracy.shape[0] - 1)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{opts.config} {' '.join(overrides)}: {wall:.1f} s in fit (process start-up excluded), peak RSS {peak_mb:.0f} MB")
    for name, seconds in phases.items():
        print(f"  {name:17s} {seconds:7.1f} s  {100 * seconds / wall:5.1f} %")
    # where "other" goes: the profiler's largest actions (they nest, e.g. run_training_batch holds training_step)
    largest = dict(sorted(((action, sum(times)) for action, times in durations.items()), key=lambda x: -x[1])[:20])
    print("  largest profiled actions (nested ones overlap):")
    for action, seconds in largest.items():
        print(f"    {seconds:7.1f} s  {action}")
    report = {"config": opts.config, "overrides": overrides, "fit_seconds": wall, "phases": phases,
              "largest_actions": largest, "summary": scores, "peak_rss_mb": peak_mb, "threads": torch.get_num_threads()}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(report, indent=2, default=float))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    sys.exit(main())
