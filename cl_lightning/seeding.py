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
from collections.abc import Sequence

import torch

from cl_lightning.errors import ConfigError

#: The seeds ``seed_everything`` accepts (numpy's): unsigned 32-bit integers.
MAX_SEED = 2**32 - 1


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
    from lightning.pytorch.utilities import rank_zero_warn  # here: `grid` uses this module without Lightning

    rank_zero_warn("No seed set (neither `seed` nor `seed_everything`): using seed 0.")
    return 0


def check_seeds(seeds: Sequence[int] | None, seed_everything: int | bool | None) -> None:
    """Refuse a seed ``seed_everything`` cannot take, the same rule for ``--seeds`` and
    ``--seed_everything`` (``True`` draws one, ``False`` / None seed nothing), before anything runs."""
    given = [("seeds", seed) for seed in seeds or []]
    if not isinstance(seed_everything, bool) and seed_everything is not None:
        given.append(("seed_everything", seed_everything))
    for option, seed in given:
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"--{option} has {seed}, which is not a seed: give integers from 0 to {MAX_SEED}")
