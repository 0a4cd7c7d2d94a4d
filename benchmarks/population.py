"""The bare vmapped floor of a population (issue 16): N MLPs trained together in plain PyTorch.

Each member is the paper's MLP 784-256-256-10 (no dropout) with its own initialisation (its seed)
and its own batch order over one shared copy of the data (random tensors shaped like
Fashion-MNIST's 60,000 training images), trained with SGD (momentum 0.8) on the sum of the
members' mean cross-entropies, so each member takes exactly its solo step. A step is one index
``order[:, i*B:(i+1)*B]``, one gather ``x[idx]`` of shape ``[N, B, 1, 28, 28]``, forward, backward
and ``optimizer.step()``, with no Lightning and no per-member Python loop.

Implementations, timed side by side (alternating, minimum of ``--repeats`` runs each):

- ``vmap``: ``torch.func.vmap`` of ``torch.func.functional_call`` over
  ``torch.func.stack_module_state`` parameters;
- ``bmm``: the same network hand-batched, ``torch.baddbmm`` per layer on ``[N, out, in]`` weights;
- ``population``: :class:`cl_lightning.models.population.Population` (vmap, plus what our class
  adds), to see its overhead over the floor.

Before timing, the first step's per-member losses of every implementation are checked to agree.
Prints ms per step and the cost relative to the first N listed (1 by default) of the same
implementation and batch size (on a GPU also the peak memory), and writes JSON (``--out``).

    python benchmarks/population.py                                  # N = 1 4 5 8 64, B = 10 64
    python benchmarks/population.py --sizes 1 8 64 512 --batches 64  # e.g. on a GPU
    python benchmarks/population.py --steps 20 --repeats 1           # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from cl_lightning.models.nets import MLP
from cl_lightning.models.population import Population

IMPLEMENTATIONS = ("vmap", "bmm", "population")
#: A population's forward: a batch ``[N, B, 1, 28, 28]`` to logits ``[N, B, 10]``.
Forward = Callable[[Tensor], Tensor]


def members(n: int) -> list[nn.Module]:
    """N paper MLPs, member k initialised from seed k."""
    nets = []
    for seed in range(n):
        torch.manual_seed(seed)
        nets.append(MLP(784, [256, 256], 10))
    return nets


def vmap_population(nets: list[nn.Module], device: torch.device) -> tuple[Forward, list[Tensor]]:
    params, _ = stack_module_state(nets)
    params = {name: p.detach().to(device).requires_grad_() for name, p in params.items()}
    base = copy.deepcopy(nets[0]).to("meta")
    forward = vmap(lambda p, x: functional_call(base, p, (x,)))
    return (lambda x: forward(params, x)), list(params.values())


def bmm_population(nets: list[nn.Module], device: torch.device) -> tuple[Forward, list[Tensor]]:
    """Weights ``[N, in, out]`` (the transpose of ``nn.Linear``'s, stored once) and biases ``[N, out]``
    per layer. In this layout ``baddbmm``'s backward returns each weight gradient in the weight's own
    layout; with ``[N, out, in]`` weights and a transposed operand, autograd copies every gradient
    into the parameter's layout, which on a CPU costs more than the matmul (``Population`` avoids it
    with its own backward instead, to keep the solo layout)."""
    linears = [[m for m in net.modules() if isinstance(m, nn.Linear)] for net in nets]
    layers = []
    for depth in range(len(linears[0])):
        weight = torch.stack([net[depth].weight.detach().t() for net in linears]).to(device).requires_grad_()
        bias = torch.stack([net[depth].bias.detach() for net in linears]).to(device).requires_grad_()
        layers.append((weight, bias))

    def forward(x: Tensor) -> Tensor:
        h = x.flatten(2)
        for depth, (weight, bias) in enumerate(layers):
            h = torch.baddbmm(bias.unsqueeze(1), h, weight)
            if depth + 1 < len(layers):
                h = F.relu(h)
        return h

    return forward, [t for layer in layers for t in layer]


def our_population(nets: list[nn.Module], device: torch.device) -> tuple[Forward, list[Tensor]]:
    pop = Population(nets, list(range(len(nets)))).to(device).train()
    return pop, list(pop.parameters())


BUILDERS = {"vmap": vmap_population, "bmm": bmm_population, "population": our_population}


def summed_loss(forward: Forward, x: Tensor, y: Tensor) -> Tensor:
    """Sum over members of each member's mean cross-entropy on its own batch."""
    logits = forward(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]


def batch_orders(n: int, length: int, examples: int, device: torch.device) -> Tensor:
    """``[N, length]``: member k's example order, reshuffled every epoch from its seed."""
    orders = []
    for seed in range(n):
        g = torch.Generator().manual_seed(10_000 + seed)
        epochs = math.ceil(length / examples)
        orders.append(torch.cat([torch.randperm(examples, generator=g) for _ in range(epochs)])[:length])
    return torch.stack(orders).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(impl: str, nets: list[nn.Module], x: Tensor, y: Tensor, order: Tensor, batch: int, steps: int,
                  warmup: int, lr: float, momentum: float) -> tuple[float, float | None]:
    """(seconds per step, peak accelerator memory in MB or None on CPU) over ``steps`` steps after
    ``warmup`` untimed ones."""
    device = x.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    forward, params = BUILDERS[impl](nets, device)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)

    def step(i: int) -> None:
        idx = order[:, i * batch:(i + 1) * batch]
        optimizer.zero_grad()
        summed_loss(forward, x[idx], y[idx]).backward()
        optimizer.step()

    for i in range(warmup):
        step(i)
    synchronize(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return seconds, peak


def check_agreement(impls: list[str], nets: list[nn.Module], x: Tensor, y: Tensor, order: Tensor, batch: int) -> float:
    """Largest difference between implementations of the first step's per-member losses; raises
    if they disagree beyond float32 rounding."""
    idx = order[:, :batch]
    losses = {}
    for impl in impls:
        forward, _ = BUILDERS[impl](nets, x.device)
        with torch.no_grad():
            logits = forward(x[idx])
        losses[impl] = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), reduction="none").view(idx.shape).mean(1)
    reference = losses[impls[0]]
    worst = max((loss - reference).abs().max().item() for loss in losses.values())
    if worst > 1e-4:
        raise RuntimeError(f"implementations disagree on the first step's losses by {worst:.2e}: {losses}")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 5, 8, 64], help="population sizes N")
    parser.add_argument("--batches", nargs="+", type=int, default=[10, 64], help="batch sizes B (per member)")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--steps", type=int, default=200, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats; the minimum is kept")
    parser.add_argument("--examples", type=int, default=60_000, help="training examples (Fashion-MNIST: 60,000)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CLI's default: 1)")
    parser.add_argument("--out", default="benchmarks/results/population.json")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), {opts.threads} CPU thread(s), {opts.steps} steps after {opts.warmup}, "
          f"min of {opts.repeats}; MLP 784-256-256-10, SGD momentum {opts.momentum}", flush=True)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(opts.examples, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (opts.examples,), generator=g).to(device)
    base = f"xN={opts.sizes[0]}"
    peak = "    peak" if device.type == "cuda" else ""
    header = " | ".join(f"{impl:>10s} ms {base:>6s}{peak}" for impl in opts.impls)
    print(f"{'B':>4s} {'N':>5s} | {header}")
    results = []
    for batch in opts.batches:
        single: dict[str, float] = {}
        for n in opts.sizes:
            nets = members(n)
            order = batch_orders(n, (opts.warmup + opts.steps) * batch, opts.examples, device)
            agreement = check_agreement(opts.impls, nets, x, y, order, batch)
            times: dict[str, list[float]] = {impl: [] for impl in opts.impls}
            peaks: dict[str, float | None] = {}
            for _ in range(opts.repeats):
                for impl in opts.impls:
                    seconds, peaks[impl] = time_training(impl, nets, x, y, order, batch, opts.steps, opts.warmup,
                                                         opts.lr, opts.momentum)
                    times[impl].append(seconds)
            row = {"batch_size": batch, "members": n, "agreement": agreement}
            cells = []
            for impl in opts.impls:
                ms = 1e3 * min(times[impl])
                relative = ms / single.setdefault(impl, ms)
                row[impl] = {"ms_per_step": ms, f"relative_to_{opts.sizes[0]}": relative, "peak_mb": peaks[impl]}
                peak = f" {peaks[impl]:7.0f} MB" if peaks[impl] is not None else ""
                cells.append(f"{ms:13.3f} {relative:5.2f}x{peak}")
            results.append(row)
            print(f"{batch:4d} {n:5d} | " + " | ".join(cells), flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {"results": results, "steps": opts.steps, "repeats": opts.repeats, "examples": opts.examples,
              "device": str(device), "device_name": name, "threads": opts.threads, "torch": torch.__version__,
              "peak_rss_mb": peak_mb}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(report, indent=2))
    peak_note = "; peak: accelerator memory of the run, shared data included" if device.type == "cuda" else ""
    print(f"{base}: cost relative to N = {opts.sizes[0]} (same implementation and B){peak_note}; "
          f"peak RSS {peak_mb:.0f} MB; wrote {opts.out}")


if __name__ == "__main__":
    main()
