#!/usr/bin/env bash
# Issue 16's GPU measurements in one run (prepared for a session that is lent a GPU; ~10 minutes on an H200):
# the CUDA tests of the population code, the bare vmapped floor at N = 1..512, and populations end to
# end (MC-SGD, 20-task Rotated Fashion-MNIST) against solo runs and the floor.
#   bash benchmarks/gpu_population.sh [data root, default: data]
set -euo pipefail
root=${1:-data}
python -m pytest -q -p no:cacheprovider tests/models/test_population.py tests/models/test_member_sgd.py \
  tests/data/test_members.py -k "cuda or accelerator or device"
python benchmarks/population.py --sizes 1 8 64 512 --batches 64 --device cuda --out benchmarks/results/population_gpu.json
python benchmarks/population_runs.py --configs configs/mcsgd/rotated_fashion_mnist.yaml --sizes 1 64 --solo_runs 2 --device cuda \
  --out benchmarks/results/population_runs_gpu.json -- --data.root "$root" --trainer.accelerator gpu
python benchmarks/end_to_end.py --config configs/mcsgd/rotated_fashion_mnist.yaml --out benchmarks/results/end_to_end_gpu.json \
  -- --data.root "$root" --trainer.accelerator gpu
