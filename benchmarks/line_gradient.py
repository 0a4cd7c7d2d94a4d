"""MC-SGD's consolidation: batched line gradient (vmap, affine) against the loop of K+1 gradients.

Times (a) one line-gradient call on a batch of 64 for K = 5, 10, 20 and (b) one whole
consolidation epoch at the last task of a 20-task sequence (20 episodic-memory batches of 10
plus 7 subset batches of 64, as the Rotated/Permuted MNIST configs), with each backend, on the
paper's MLP 784-256-256-10 in eval mode, as a population of one. Prints the speed-up over the loop
and writes JSON.

    python benchmarks/line_gradient.py
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import image_source  # noqa: E402

from cl_lightning.data.datamodule import ContinualDataModule  # noqa: E402
from cl_lightning.methods.line_gradient import LineGradient  # noqa: E402
from cl_lightning.methods.mcsgd import MCSGD  # noqa: E402
from cl_lightning.models.module import ContinualModule  # noqa: E402
from cl_lightning.models.nets import MLP  # noqa: E402
from cl_lightning.models.population import Population  # noqa: E402

BACKENDS = ("loop", "vmap", "affine")


def best_of(repeats: int, fn) -> float:
    """Minimum wall time of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/line_gradient.json")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(opts.device)
    source, _, pixels = image_source(opts.root)
    population = Population.from_seeds(lambda: MLP(pixels, [256, 256], 10), [0]).to(device).eval()
    start = population.flat()
    end = start + 0.01 * torch.randn_like(start)
    x, y = torch.rand(1, 64, 1, pixels, device=device), torch.randint(10, (1, 64), device=device)

    calls = []
    for k in (5, 10, 20):
        times = {b: best_of(opts.repeats, lambda b=b: LineGradient(population, k, backend=b)(start, end, x, y)) for b in BACKENDS}
        calls.append({"K": k, **{f"{b}_ms": 1e3 * t for b, t in times.items()},
                      **{f"{b}_speedup": times["loop"] / times[b] for b in BACKENDS[1:]}})
        print(f"line gradient K={k:2d}, batch 64: " + ", ".join(f"{b} {1e3 * t:6.2f} ms" for b, t in times.items())
              + f"  -> vmap {times['loop'] / times['vmap']:.2f}x, affine {times['loop'] / times['affine']:.2f}x", flush=True)

    # One consolidation epoch at task 20 through MCSGD.consolidate itself.
    dm = ContinualDataModule(source=source, root=opts.root, benchmark="permuted", num_tasks=20, seeds=[0])
    dm.setup()
    module = ContinualModule(MLP(pixels, [256, 256], 10), seeds=[0]).to(device)
    module.class_mask = dm.class_mask
    mcsgd = MCSGD()
    for task in range(20):
        mcsgd.memory.add_task(dm, task)
    w_hat = module.population.flat()
    w_bar = w_hat + 0.01 * torch.randn_like(w_hat)
    epochs = {}
    for backend in BACKENDS:
        mcsgd.line = LineGradient(module.population, mcsgd.num_segments, mcsgd.weighting, backend)
        epochs[backend] = best_of(max(opts.repeats // 4, 3), lambda: mcsgd.consolidate(dm, module, 19, w_bar, w_hat))
        print(f"consolidation epoch at task 20 ({backend}): {1e3 * epochs[backend]:.1f} ms", flush=True)
    print(f"  -> vmap {epochs['loop'] / epochs['vmap']:.2f}x, affine {epochs['loop'] / epochs['affine']:.2f}x faster than the loop")

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {"device": str(device), "source": source, "line_gradient_batch64": calls,
              "consolidation_epoch_task20_ms": {b: 1e3 * t for b, t in epochs.items()},
              "consolidation_speedup": {b: epochs["loop"] / epochs[b] for b in BACKENDS[1:]}, "peak_rss_mb": peak_mb}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(report, indent=2))
    print(f"peak RSS {peak_mb:.0f} MB; wrote {opts.out}")


if __name__ == "__main__":
    main()
