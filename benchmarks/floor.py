"""The bare floor of a whole continual-learning run: the work of one ``cl-lightning fit`` config in plain PyTorch.

Why it exists: ``benchmarks/end_to_end.py`` times our run against this script to say what Lightning, the
population machinery and our callbacks cost on top of the arithmetic the experiment needs, phase by phase. It
reads the same YAML config and does the same work, written the plainest fast way: one ``nn.Module`` MLP,
``torch.optim.SGD``, tensors on the device, no Lightning, no logger, checkpoint, progress bar or result files.

The work, as ``cl-lightning fit`` does it (``cl_lightning/data``, ``models/module.py``, ``methods/``):

- data: the IDX files read into uint8 tensors on the device; each task a pixel map (task 1 the identity, then a
  random permutation, or a nearest-neighbour rotation by ``(t-1) * degrees_per_task`` with 0 outside), images
  scaled to [0, 1]; a task's training images are mapped and scaled once, in the epoch's order (shuffled per task,
  or in file order with ``shuffle: false``), each task's test images mapped once;
- training: one epoch per task of cross-entropy SGD in batches of ``batch_size``, dropout on, a fresh optimizer
  per task (momentum cleared) with lr ``max(lr_floor, lr * lr_decay^(t-1))``;
- evaluation: after each task, the kept model on the test set of every task seen so far, in batches of
  ``eval_batch_size``: row t of the accuracy matrix;
- MC-SGD (``steps: full_batch`` or ``minibatch``): at each task end w_hat is the trained weights; its episodic
  memory (``memory_per_task`` examples, with replacement) is added; from task 2 on, w_bar is consolidated from
  ``w_bar_prev + alpha0 (w_hat - w_bar_prev)`` by SGD on the line gradients (K+1 points, the research code's
  ``reference`` weighting ``(K+1-j) * share / batch``) of line A (w_bar_prev to w, the memory of every task, one
  task per batch in a random order) and line B (w_hat to w, ``subset_size`` examples of the task, with
  replacement, in batches of the method's ``batch_size``); w_hat is evaluated on the tasks seen, w_bar is kept
  and evaluated, and the next task starts from w_hat;
- ER: a reservoir of ``memory_size`` examples (algorithm R over the stream of training examples); every step
  from the second on trains on one mean cross-entropy over the current batch joined with
  ``min(memory_batch_size, held)`` examples drawn from it without replacement, then offers the batch to it.

The line gradient uses the first layer's affinity in alpha (``x W^T + b`` at ``w_s + alpha (w - w_s)`` is
``base + alpha direction``), as our ``affine`` backend does: the plain per-point loop costs about three times as
much on a CPU, and a floor slower than what it measures would say nothing.

What differs, on purpose: every random draw (initial weights, permutations, batch order, dropout masks, memories,
subsets, reservoir slots) comes from torch's generators seeded with the run's seed, not from our keyed streams, so
the floor is another sample of the same experiment: its accuracy matrix agrees with ours within the spread over
seeds, not bit for bit. The floor accepts the configs whose work it mirrors (MC-SGD with an MLP, ER; permuted or
rotated MNIST-format data) and refuses any setting it would not honour.

    python benchmarks/floor.py --config configs/mcsgd/rotated_fashion_mnist.yaml [--threads 1] [--out floor.json] \\
        [-- --data.root /work/data --data.num_tasks 3 --seed_everything 1 --trainer.accelerator cpu]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torchvision.transforms.functional import InterpolationMode, rotate

from cl_lightning.metrics.continual import summary  # the paper's metrics (plain torch, no Lightning)

#: Overrides (``--key value`` after ``--``) the floor applies as ``cl-lightning fit`` does; any other is refused.
OVERRIDES = ("data.root", "data.num_tasks", "seed_everything", "trainer.accelerator")
#: The settings each config section may hold, with the defaults of ``ContinualDataModule``, ``ContinualModule``,
#: ``MCSGD`` and ``ER`` for those a config leaves out.
DATA_DEFAULTS = {"source": "digits", "benchmark": "permuted", "num_tasks": 20, "root": "data", "degrees_per_task": 9.0,
                 "batch_size": 64, "eval_batch_size": 1024, "shuffle": True}
MODEL_DEFAULTS = {"lr": 0.1, "momentum": 0.8, "lr_decay": 1.0, "lr_floor": 0.0005}
MCSGD_DEFAULTS = {"alpha0": 0.1, "num_segments": 5, "lr": 0.01, "momentum": 0.8, "batch_size": 64, "epochs": 1,
                  "steps": "minibatch", "memory_per_task": 10, "subset_size": 400, "evaluate_w_hat": True}
#: MC-SGD settings the floor implements in one way only: the value it needs (the configs' values).
MCSGD_FIXED = {"memory_replacement": True, "subset_replacement": True, "weighting": "reference", "next_task_start": "w_hat",
               "memory_per_class": None, "subset_per_class": None, "save_solutions": False}
ER_DEFAULTS = {"memory_size": 200, "memory_batch_size": 64}
#: Folder of each MNIST-format source under ``data.root``, torchvision's layout (``cl_lightning/data/sources.py``).
IDX_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


@dataclass(frozen=True)
class Settings:
    """Everything the run needs, read from a ``cl-lightning fit`` config and its overrides."""

    seed: int
    device: torch.device
    source: str
    root: str
    benchmark: str
    num_tasks: int
    degrees_per_task: float
    batch_size: int
    eval_batch_size: int
    shuffle: bool
    hidden_sizes: list[int]
    dropout: float
    lr: float
    momentum: float
    lr_decay: float
    lr_floor: float
    method: str  # "mcsgd" or "er"
    method_settings: dict[str, Any] = field(default_factory=dict)

    def task_lr(self, task: int) -> float:
        """The lr of ``task`` (0-based), as ``MemberTaskLR`` computes it."""
        return max(self.lr_floor, self.lr * self.lr_decay**task)


def read_settings(config: str | Path, overrides: list[str]) -> Settings:
    """The settings of ``config`` with ``overrides`` (``--key value`` pairs of :data:`OVERRIDES`) applied.

    Raises:
        ValueError: an override or a setting the floor does not mirror.
    """
    tree = yaml.safe_load(Path(config).read_text())
    for key, value in parse_overrides(overrides).items():
        *sections, name = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    data = _section(tree.get("data", {}), DATA_DEFAULTS, "data")
    model = dict(tree.get("model", {}))
    net = model.pop("net", {})
    if not str(net.get("class_path", "")).endswith("nets.MLP"):
        raise ValueError(f"the floor trains the MLP only, not {net.get('class_path')!r}")
    net_args = {"input_size": 784, "hidden_sizes": [256, 256], "num_classes": 10, "dropout": 0.0} | net.get("init_args", {})
    if (net_args["input_size"], net_args["num_classes"]) != (784, 10):
        raise ValueError(f"the floor's data are 28x28 images of 10 classes, not the MLP's {net_args}")
    model = _section(model, MODEL_DEFAULTS, "model")
    if data["source"] not in IDX_FOLDERS or data["benchmark"] not in ("permuted", "rotated"):
        raise ValueError(f"the floor runs permuted or rotated {'/'.join(IDX_FOLDERS)}, not {data['benchmark']} {data['source']}")
    method, method_settings = _method(tree.get("trainer", {}).get("callbacks", []))
    accelerator = str(tree.get("trainer", {}).get("accelerator", "auto"))
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ValueError(f"the floor runs on the CPU or a CUDA GPU, not trainer.accelerator {accelerator!r}")
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return Settings(seed=int(tree.get("seed_everything", 0)), device=torch.device("cuda" if cuda else "cpu"),
                    source=data["source"], root=str(data["root"]), benchmark=data["benchmark"],
                    num_tasks=int(data["num_tasks"]), degrees_per_task=float(data["degrees_per_task"]),
                    batch_size=int(data["batch_size"]), eval_batch_size=int(data["eval_batch_size"]),
                    shuffle=bool(data["shuffle"]), hidden_sizes=[int(h) for h in net_args["hidden_sizes"]],
                    dropout=float(net_args["dropout"]), lr=float(model["lr"]), momentum=float(model["momentum"]),
                    lr_decay=float(model["lr_decay"]), lr_floor=float(model["lr_floor"]), method=method,
                    method_settings=method_settings)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["--data.root", "x", "--data.num_tasks=3"]`` as ``{"data.root": "x", "data.num_tasks": 3}`` (YAML values)."""
    pairs: dict[str, Any] = {}
    items = iter(overrides)
    for item in items:
        if not item.startswith("--"):
            raise ValueError(f"expected an option --key value, got {item!r}")
        key, _, value = item[2:].partition("=")
        if not _:
            value = next(items, None)
            if value is None:
                raise ValueError(f"option --{key} has no value")
        if key not in OVERRIDES:
            raise ValueError(f"the floor cannot mirror --{key}: it takes {', '.join('--' + o for o in OVERRIDES)}")
        pairs[key] = yaml.safe_load(value)
    return pairs


def _section(values: dict[str, Any], defaults: dict[str, Any], name: str, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """``values`` over ``defaults``; refuses a key outside both, and a ``fixed`` key set to another value."""
    fixed = fixed or {}
    unknown = set(values) - set(defaults) - set(fixed)
    if unknown:
        raise ValueError(f"the floor does not mirror {name} setting(s) {sorted(unknown)}")
    for key, needed in fixed.items():
        if values.get(key, needed) != needed:
            raise ValueError(f"the floor runs {name} with {key}: {needed}, not {values[key]!r}")
    return defaults | {key: value for key, value in values.items() if key not in fixed}


def _method(callbacks: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The config's one method, ``("mcsgd" | "er", its settings)``."""
    methods = [c for c in callbacks if str(c.get("class_path", "")).rsplit(".", 1)[-1] in ("MCSGD", "ER")]
    if len(methods) != 1 or len(callbacks) != 1:
        raise ValueError(f"the floor runs a config with one method, MCSGD or ER, among its callbacks, not {callbacks}")
    name = methods[0]["class_path"].rsplit(".", 1)[-1]
    values = dict(methods[0].get("init_args", {}))
    if name == "ER":
        return "er", _section(values, ER_DEFAULTS, "ER")
    values.pop("backend", None)  # how ours computes the line gradient, not what it computes
    settings = _section(values, MCSGD_DEFAULTS, "MCSGD", MCSGD_FIXED)
    if settings["steps"] not in ("full_batch", "minibatch"):
        raise ValueError(f"MCSGD steps must be full_batch or minibatch, not {settings['steps']!r}")
    return "mcsgd", settings


# --------------------------------------------------------------------------- timing


class Clock:
    """Wall seconds per phase; on a GPU each phase ends with a synchronisation so its kernels count in it."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = device.type == "cuda"

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start


# --------------------------------------------------------------------------- data


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (or its ``.gz``, as Debian's ``dataset-fashion-mnist`` ships it) as a numpy array."""
    packed = path.with_name(path.name + ".gz")
    raw = path.read_bytes() if path.is_file() else gzip.decompress(packed.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@dataclass
class Data:
    """The base images (uint8 ``[N, 784]``) and labels on the device, and each task's pixel map (-1: background)."""

    train_x: Tensor
    train_y: Tensor
    test_y: Tensor
    maps: Tensor
    test_x: list[Tensor]  # each task's test images, mapped (uint8)

    def task_images(self, images: Tensor, task: int) -> Tensor:
        """``images`` (uint8 ``[n, 784]``) through task ``task``'s pixel map."""
        pixel_map = self.maps[task]
        mapped = images.gather(1, pixel_map.clamp(min=0).expand(len(images), -1))
        return mapped if bool((pixel_map >= 0).all()) else mapped * (pixel_map >= 0)

    def training_set(self, task: int, shuffle: bool, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Task ``task``'s training images in [0, 1] (float ``[n, 784]``) and labels, in the epoch's order."""
        x, y = self.train_x, self.train_y
        if shuffle:
            order = torch.randperm(len(y), generator=generator).to(y.device)
            x, y = x[order], y[order]
        return self.task_images(x, task).float().div_(255), y


def prepare_data(s: Settings, generator: torch.Generator) -> Data:
    """Read the files onto the device, draw the tasks' pixel maps and map every task's test images."""
    raw = Path(s.root).expanduser() / IDX_FOLDERS[s.source] / "raw"
    arrays = {f"{split}_{part}": read_idx(raw / f"{prefix}-{kind}-idx{dim}-ubyte")
              for split, prefix in (("train", "train"), ("test", "t10k"))
              for part, kind, dim in (("x", "images", 3), ("y", "labels", 1))}
    train_x, test_x = (torch.tensor(arrays[k].reshape(len(arrays[k]), -1), device=s.device) for k in ("train_x", "test_x"))
    train_y, test_y = (torch.tensor(arrays[k], dtype=torch.int64, device=s.device) for k in ("train_y", "test_y"))
    if s.benchmark == "permuted":
        maps = [torch.arange(784)] + [torch.randperm(784, generator=generator) for _ in range(s.num_tasks - 1)]
    else:
        index = torch.arange(1, 785, dtype=torch.float32).view(1, 28, 28)  # each pixel's own index, 0 the background
        maps = [rotate(index, t * s.degrees_per_task, InterpolationMode.NEAREST, fill=[0.0]).flatten().round().long() - 1
                for t in range(s.num_tasks)]
    data = Data(train_x, train_y, test_y, torch.stack(maps).to(s.device), [])
    data.test_x = [data.task_images(test_x, t) for t in range(s.num_tasks)]
    return data


# --------------------------------------------------------------------------- model, training, evaluation


def mlp(s: Settings) -> nn.Sequential:
    """The MLP of ``cl_lightning.models.nets.MLP``: (Linear, ReLU, Dropout) per hidden layer, then a Linear."""
    layers: list[nn.Module] = []
    width = 784
    for size in s.hidden_sizes:
        layers += [nn.Linear(width, size), nn.ReLU()] + ([nn.Dropout(s.dropout)] if s.dropout > 0 else [])
        width = size
    return nn.Sequential(*layers, nn.Linear(width, 10))


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, batch_size: int) -> None:
    """One epoch of cross-entropy SGD over ``x``, ``y`` in order."""
    model.train()
    for start in range(0, len(y), batch_size):
        loss = F.cross_entropy(model(x[start:start + batch_size]), y[start:start + batch_size])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.inference_mode()
def accuracies(model: nn.Module, data: Data, tasks: int, batch_size: int) -> Tensor:
    """Accuracy (%) of ``model`` on the test set of tasks ``0..tasks-1``, float64 ``[tasks]``; one read at the end."""
    model.eval()
    hits = []
    for task in range(tasks):
        correct = torch.zeros((), dtype=torch.int64, device=data.test_y.device)
        for start in range(0, len(data.test_y), batch_size):
            x = data.test_x[task][start:start + batch_size].float().div_(255)
            correct += (model(x).argmax(dim=1) == data.test_y[start:start + batch_size]).sum()
        hits.append(correct)
    return 100.0 * torch.stack(hits).cpu().double() / len(data.test_y)


# --------------------------------------------------------------------------- MC-SGD


def line_gradient(start: Tensor, end: Tensor, x: Tensor, y: Tensor, weights: Tensor, hidden: list[int]) -> Tensor:
    """``sum_j weights[j] * grad CE(theta_j)`` at ``theta_j = start + j/K (end - start)``, j = 0..K, for the MLP
    with ``hidden`` widths whose flat parameters (``parameters_to_vector``) are ``start`` and ``end``.

    The first layer's pre-activation is affine in alpha, so it costs two matmuls, and its weight gradient
    one (``(sum_j delta_j)^T x``); the other layers run for the K+1 points at once (batched matmuls)."""
    points = len(weights)
    alphas = torch.arange(points, device=start.device, dtype=start.dtype) / (points - 1)
    first = hidden[0] * 785
    w_start, b_start = start[:first - hidden[0]].view(hidden[0], 784), start[first - hidden[0]:first]
    w_end, b_end = end[:first - hidden[0]].view(hidden[0], 784), end[first - hidden[0]:first]
    with torch.no_grad():
        base, direction = F.linear(x, w_start, b_start), F.linear(x, w_end - w_start, b_end - b_start)
    pre = (base + alphas[:, None, None] * direction).requires_grad_()  # [K+1, B, hidden]
    rest = torch.lerp(start[first:], end[first:], alphas[:, None]).requires_grad_()  # [K+1, P_rest]
    widths = [*hidden, 10]
    sizes = [n for fan_in, fan_out in zip(widths, widths[1:]) for n in (fan_out * fan_in, fan_out)]
    chunks = rest.split(sizes, dim=1)
    h = pre
    for (fan_in, fan_out), weight, bias in zip(zip(widths, widths[1:]), chunks[::2], chunks[1::2]):
        h = torch.baddbmm(bias.unsqueeze(1), F.relu(h), weight.view(points, fan_out, fan_in).transpose(1, 2))
    losses = F.cross_entropy(h.flatten(0, 1), y.repeat(points), reduction="none").view(points, -1).mean(dim=1)
    pre_grad, rest_grad = torch.autograd.grad(weights @ losses, (pre, rest))
    delta = pre_grad.sum(dim=0)
    return torch.cat([(delta.T @ x).flatten(), delta.sum(dim=0), rest_grad.sum(dim=0)])


class MCSGD:
    """MC-SGD's task-end work (module docstring) with a plain episodic memory of images."""

    def __init__(self, s: Settings, generator: torch.Generator) -> None:
        self.s, self.m, self.generator = s, s.method_settings, generator
        self.memory: list[tuple[Tensor, Tensor]] = []
        self.w_hat: Tensor | None = None
        self.w_bar: Tensor | None = None
        self.w_hat_matrix = torch.full((s.num_tasks, s.num_tasks), math.nan, dtype=torch.float64)

    def start_task(self, model: nn.Module, task: int) -> None:
        if task > 0:
            vector_to_parameters(self.w_hat, model.parameters())

    def train(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
        train_epoch(model, optimizer, x, y, self.s.batch_size)

    def end_task(self, model: nn.Module, task: int, x: Tensor, y: Tensor, data: Data, clock: Clock) -> None:
        with clock("consolidation"):
            w_hat = parameters_to_vector(model.parameters()).detach().clone()
            drawn = self._draw(len(y), self.m["memory_per_task"])
            self.memory.append((x[drawn], y[drawn]))
            w_bar = w_hat.clone() if task == 0 else self.consolidate(task, w_hat, x, y)
            self.w_hat, self.w_bar = w_hat, w_bar
        if self.m["evaluate_w_hat"]:
            with clock("evaluation"):
                self.w_hat_matrix[task, : task + 1] = accuracies(model, data, task + 1, self.s.eval_batch_size)
        with clock("consolidation"):
            vector_to_parameters(w_bar, model.parameters())

    def _draw(self, n: int, count: int) -> Tensor:
        """``count`` positions in ``[0, n)`` drawn uniformly with replacement, on the device."""
        return torch.randint(n, (count,), generator=self.generator).to(self.s.device)

    def consolidate(self, task: int, w_hat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """w_bar of ``task`` from the previous w_bar and ``w_hat``, by SGD on the two lines' gradients."""
        m = self.m
        order = torch.randperm(task + 1, generator=self.generator).tolist()
        subset = self._draw(len(y), m["subset_size"])
        lines = [(self.w_bar, [self.memory[i] for i in order]),
                 (w_hat, list(zip(x[subset].split(m["batch_size"]), y[subset].split(m["batch_size"]))))]
        if m["steps"] == "full_batch":  # one step over every batch, each at its share of its line's examples
            steps = [[(start, bx, by, len(by) / sum(len(b[1]) for b in batches)) for start, batches in lines
                      for bx, by in batches]]
        else:  # step i: batch i of each line that has one
            steps = [[(start, *batches[i], 1.0) for start, batches in lines if i < len(batches)]
                     for i in range(max(len(batches) for _, batches in lines))]
        points = torch.arange(m["num_segments"] + 1, 0, -1, dtype=torch.float64)
        w = self.w_bar + m["alpha0"] * (w_hat - self.w_bar)
        buffer = None
        for _ in range(m["epochs"]):
            for step in steps:
                grad = sum(line_gradient(start, w, bx, by, (points * share / len(by)).to(w), self.s.hidden_sizes)
                           for start, bx, by, share in step)
                buffer = grad if buffer is None else buffer.mul_(m["momentum"]).add_(grad)
                w = w - m["lr"] * buffer
        return w


# --------------------------------------------------------------------------- ER


class ER:
    """ER-Reservoir (module docstring): the reservoir holds the images themselves, on the device."""

    def __init__(self, s: Settings, generator: torch.Generator) -> None:
        self.s, self.generator = s, generator
        self.capacity, self.replayed = s.method_settings["memory_size"], s.method_settings["memory_batch_size"]
        self.memory_x = torch.zeros(self.capacity, 784, device=s.device)
        self.memory_y = torch.zeros(self.capacity, dtype=torch.int64, device=s.device)
        self.seen = 0

    def start_task(self, model: nn.Module, task: int) -> None:
        """Nothing: the reservoir knows no task boundaries."""

    def train(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
        model.train()
        for start in range(0, len(y), self.s.batch_size):
            bx, by = x[start:start + self.s.batch_size], y[start:start + self.s.batch_size]
            held = min(self.seen, self.capacity)
            if held:
                drawn = torch.randperm(held, generator=self.generator)[: self.replayed].to(self.s.device)
                loss = F.cross_entropy(model(torch.cat([bx, self.memory_x[drawn]])), torch.cat([by, self.memory_y[drawn]]))
            else:
                loss = F.cross_entropy(model(bx), by)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            self.offer(bx, by)

    def offer(self, x: Tensor, y: Tensor) -> None:
        """Algorithm R: the n-th example fills slot n-1 while there is room, else replaces a slot drawn in
        ``[0, n)`` when that is below the capacity (of two examples of a batch that draw one slot, the later stays)."""
        n = torch.arange(self.seen + 1, self.seen + len(y) + 1, dtype=torch.float64)
        drawn = (torch.rand(len(y), generator=self.generator, dtype=torch.float64) * n).long()
        slots = torch.where(n <= self.capacity, n.long() - 1, drawn).tolist()
        self.seen += len(y)
        kept = {slot: i for i, slot in enumerate(slots) if slot < self.capacity}
        if kept:
            into = torch.tensor(list(kept), device=self.s.device)
            source = torch.tensor(list(kept.values()), device=self.s.device)
            self.memory_x[into], self.memory_y[into] = x[source], y[source]

    def end_task(self, model: nn.Module, task: int, x: Tensor, y: Tensor, data: Data, clock: Clock) -> None:
        """Nothing at a task end."""


# --------------------------------------------------------------------------- the run


def run(s: Settings) -> dict[str, Any]:
    """The whole task sequence; returns the accuracy matrix (and MC-SGD's w_hat matrix), the wall seconds and
    their phases: data preparation, training (for ER, replay included: it is one joined batch), evaluation,
    consolidation (MC-SGD) and the rest ("other")."""
    clock = Clock(s.device)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(s.seed)
    with clock("data_preparation"):
        data = prepare_data(s, generator)
    torch.manual_seed(s.seed)  # initial weights and dropout masks
    model = mlp(s).to(s.device)
    method = (MCSGD if s.method == "mcsgd" else ER)(s, generator)
    matrix = torch.full((s.num_tasks, s.num_tasks), math.nan, dtype=torch.float64)
    for task in range(s.num_tasks):
        with clock("data_preparation"):
            x, y = data.training_set(task, s.shuffle, generator)
        method.start_task(model, task)
        optimizer = torch.optim.SGD(model.parameters(), lr=s.task_lr(task), momentum=s.momentum)
        with clock("training"):
            method.train(model, optimizer, x, y)
        method.end_task(model, task, x, y, data, clock)
        with clock("evaluation"):
            matrix[task, : task + 1] = accuracies(model, data, task + 1, s.eval_batch_size)
    seconds = time.perf_counter() - start
    phases = {name: clock.seconds.get(name, 0.0) for name in ("data_preparation", "training", "evaluation", "consolidation")}
    phases["other"] = seconds - sum(phases.values())
    result: dict[str, Any] = {"seconds": seconds, "phases": phases, "matrix": matrix.tolist()}
    if isinstance(method, MCSGD):
        result["w_hat_matrix"] = method.w_hat_matrix.tolist()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mcsgd/rotated_fashion_mnist.yaml")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (ours' --num_threads default is 1)")
    parser.add_argument("--out", help="write the result as JSON here")
    opts, overrides = parser.parse_known_args()
    torch.set_num_threads(opts.threads)
    settings = read_settings(opts.config, [o for o in overrides if o != "--"])
    result = run(settings)
    scores = summary(torch.tensor(result["matrix"]), settings.num_tasks - 1)
    print(f"{opts.config} (floor, seed {settings.seed}, {settings.device}, {opts.threads} thread(s)): {result['seconds']:.1f} s")
    for name, seconds in result["phases"].items():
        print(f"  {name:17s} {seconds:7.1f} s")
    print(f"  average accuracy {scores['average_accuracy']:.2f} %, forgetting {scores['forgetting']:.3f}")
    if opts.out:
        Path(opts.out).write_text(json.dumps(result | {"seed": settings.seed, "threads": opts.threads}, indent=1))


if __name__ == "__main__":
    main()
