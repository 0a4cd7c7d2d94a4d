"""Training-step time of ``cl-lightning fit`` against a bare PyTorch loop doing identical work.

Both sides train the same network (same class, same initial weights), with the same SGD
(lr, momentum), batch size, number of steps and examples. The bare loop is what a careful
PyTorch user writes: the task's images transformed once into one tensor, a random order per
epoch, ``x[idx]`` per step, forward, cross-entropy, ``zero_grad``, ``backward``, ``step``.
Ours is the real command line (``cli_main``) with a method-free naive config, the progress bar,
TensorBoard logger and checkpointing all on, as users run it; a timing callback measures the
second task's training epoch (from its start to its last batch), so start-up, validation and
checkpoint writing are outside both measurements. A third timing, the "Lightning floor", runs our
module and data in a bare ``Trainer`` (nothing else on) to separate Lightning's own per-step cost.

Runs alternate (ours, bare, ours, bare, ...) and the minimum per side is kept, so background
noise hits both. Prints the ratio per setting and writes JSON (``--out``).

    python benchmarks/step_time.py                     # MLP 10/16/64 + ResNet 10/64
    python benchmarks/step_time.py --settings mlp:10   # one setting
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from common import image_source  # noqa: E402

from cl_lightning.cli.lightning_cli import cli_main  # noqa: E402
from cl_lightning.data.datamodule import ContinualDataModule  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "naive"


class EpochTimer(Callback):
    """Wall time of the training part of epoch ``epoch``: epoch start to its last batch's end."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch, self.start, self.seconds, self.steps = epoch, 0.0, 0.0, 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx + 1 == trainer.num_training_batches:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds, self.steps = time.perf_counter() - self.start, batch_idx + 1


def setting_args(net: str, batch: int, steps: int, root: str) -> list[str]:
    """The real naive config of the net's benchmark, shortened to 2 tasks of ``steps`` steps
    (fewer if a task has fewer examples).

    The ResNet runs the split protocol (task-masked logits); without CIFAR-100 on disk it takes
    5-class tasks of Fashion-MNIST (1 channel, 28x28: fewer FLOPs than CIFAR, same work on both sides).
    """
    source, channels, pixels = image_source(root, color=net == "resnet")
    task = ContinualDataModule(source=source, root=root, benchmark="split" if net == "resnet" else "permuted",
                               num_tasks=2, classes_per_task=5).task_set(1, "train")
    config = CONFIGS / ("split_cifar100.yaml" if net == "resnet" else "permuted_fashion_mnist.yaml")
    args = ["fit", "--config", str(config), "--data.source", source, "--data.root", root, "--data.num_tasks", "2",
            "--data.batch_size", str(batch), "--data.train_examples_per_task", str(min(steps * batch, len(task))),
            "--data.test_examples_per_task", "100", "--trainer.callbacks+=step_time.EpochTimer"]
    if net == "resnet":
        args += ["--model.net.init_args.in_channels", str(channels)]
        if source != "cifar100":
            args += ["--model.net.init_args.num_classes", "10"]
    else:
        args += ["--model.net.init_args.input_size", str(pixels)]
    return args


def time_ours(args: list[str]) -> tuple[float, int, ContinualDataModule, torch.nn.Module]:
    """Run the CLI; return (seconds, steps) of task 2's training epoch, the datamodule and model."""
    cli = cli_main(args)
    timer = next(c for c in cli.trainer.callbacks if type(c).__name__ == "EpochTimer")
    return timer.seconds, timer.steps, cli.datamodule, cli.model


def time_lightning_floor(dm: ContinualDataModule, module: torch.nn.Module, steps: int) -> float:
    """Ours without anything around the step: a plain ``Trainer`` with our module and data, no
    logger, checkpoint, progress bar, model summary, guard or accuracy matrix. What remains over
    the bare loop is Lightning's own per-step machinery."""
    timer = EpochTimer(epoch=1)
    settings = {k: v for k, v in dm.hparams.items() if not k.startswith("_")}
    floor = ContinualDataModule(**settings)
    trainer = Trainer(**floor.trainer_settings(), callbacks=[timer], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(type(module)(module.member_net(0), lr=module.hparams.lr, momentum=module.hparams.momentum,
                             seeds=list(module.seeds)), floor)
    return timer.seconds / timer.steps


def time_bare(dm: ContinualDataModule, net: torch.nn.Module, lr: float, momentum: float, steps: int) -> float:
    """The same work written as a plain PyTorch loop on one network: task 2's data materialised once."""
    device = next(net.parameters()).device
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    data = dm.task_set(1, "train")
    x, y, _ = data.batch(0, len(data))
    x, y = x[0].to(device), y[0].to(device)  # the run's one member
    mask = dm.class_mask[0, 1].to(device) if dm.class_mask is not None else None
    batch = dm.batch_size
    order = torch.randperm(len(y), device=device)
    net.train()
    start = time.perf_counter()
    for i in range(steps):
        idx = order[i * batch:(i + 1) * batch]
        logits = net(x[idx])
        if mask is not None:
            logits = logits.masked_fill(~mask, -1e11)
        loss = F.cross_entropy(logits, y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["mlp:10", "mlp:16", "mlp:64", "resnet:10", "resnet:64"],
                        help="net:batch pairs (net: mlp or resnet)")
    parser.add_argument("--steps", type=int, default=1000, help="timed training steps per run (ResNet: a tenth)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats; the minimum is kept")
    parser.add_argument("--root", default="data", help="dataset folder (CIFAR-100 / Fashion-MNIST; else the embedded digits)")
    parser.add_argument("--out", default="benchmarks/results/step_time.json")
    opts = parser.parse_args()
    torch.set_num_threads(1)

    results = []
    for setting in opts.settings:
        net_name, batch = setting.split(":")
        batch, steps = int(batch), opts.steps // (10 if net_name == "resnet" else 1)
        args = setting_args(net_name, batch, steps, opts.root)  # reads the dataset once per setting
        ours, bare, floor = [], [], []
        for _ in range(opts.repeats):
            with tempfile.TemporaryDirectory() as workdir:
                seconds, n, dm, module = time_ours([*args, "--trainer.default_root_dir", workdir,
                                                    "--trainer.logger.init_args.save_dir", workdir])
            ours.append(seconds / n)
            bare.append(time_bare(dm, module.member_net(0), module.hparams.lr, module.hparams.momentum, n) / n)
            floor.append(time_lightning_floor(dm, module, n))
        row = {"net": net_name, "batch_size": batch, "steps": n, "source": dm.source,
               "ours_ms": 1e3 * min(ours), "bare_ms": 1e3 * min(bare), "ratio": min(ours) / min(bare),
               "lightning_floor_ms": 1e3 * min(floor), "floor_ratio": min(floor) / min(bare)}
        results.append(row)
        print(f"{net_name:6s} batch {batch:3d}: ours {row['ours_ms']:7.3f} ms/step, bare {row['bare_ms']:7.3f} ms/step, "
              f"ratio {row['ratio']:.2f}x; Lightning floor {row['lightning_floor_ms']:7.3f} ms/step ({row['floor_ratio']:.2f}x)  "
              f"({n} steps, min of {opts.repeats})", flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {"results": results, "peak_rss_mb": peak_mb, "torch": torch.__version__, "machine": platform.machine(),
              "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(report, indent=2))
    print(f"peak RSS {peak_mb:.0f} MB; wrote {opts.out}")


if __name__ == "__main__":
    main()
