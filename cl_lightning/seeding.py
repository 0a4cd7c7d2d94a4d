"""Every random choice of a run (permutations, class order, subsets, shuffling, memories) comes
from the run's seed through :func:`generator`, one independent stream per purpose.

Streams are keyed, not drawn one after another from a shared generator, so adding a random
choice somewhere never changes the others, every process of a multi-process run derives the
same values without communication, and a resumed run re-derives them without checkpointing
generator states.
"""

from __future__ import annotations

import hashlib
import os

import torch
from lightning.pytorch.utilities import rank_zero_warn


def generator(seed: int, *stream: object) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a stream key such as ``("shuffle", epoch)``."""
    digest = hashlib.sha256(repr((seed, *stream)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def run_seed(seed: int | None) -> int:
    """``seed`` if given, else the seed of ``seed_everything`` (the CLI's ``seed_everything:``)."""
    if seed is not None:
        return seed
    if "PL_GLOBAL_SEED" in os.environ:
        return int(os.environ["PL_GLOBAL_SEED"])
    rank_zero_warn("No seed set (neither `seed` nor `seed_everything`): using seed 0.")
    return 0
