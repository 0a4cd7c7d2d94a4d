"""Counter-based random numbers of a population: every draw a hash of (member key, counter).

A population's members must draw exactly what their solo runs draw, whatever N, the device or a
resume in between, and a step's draws for all members should be one tensor operation. Stateful
generators give none of that (under ``vmap`` one generator serves all members; its state would
have to be checkpointed). Here each member has a key, a function of its seed and the purpose alone
(:func:`member_keys`), and a draw is splitmix64 (Steele, Lea, Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014) of the key and a counter (step, stream position, element index):
int64 tensor operations only, so the same bits on every device.

Used by the dropout masks of :class:`~cl_lightning.models.population.Population`, the reservoir
of ER and DER++, and A-GEM's memory batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cl_lightning.seeding import generator

__all__ = ["UNIFORM_BITS", "drop_threshold", "dropout_keys", "keep_mask", "keyed_subsets", "member_keys", "mix64",
           "stream_bits"]


def _signed(value: int) -> int:
    """The int64 with the bits of the unsigned 64-bit ``value``: torch has no uint64 arithmetic."""
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64's constants (Steele, Lea, Flood, "Fast splittable pseudorandom number generators",
# OOPSLA 2014): the golden-ratio increment and the finaliser's two multipliers.
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
#: Keep-decisions compare the top 53 bits of a hash with ``round(p * 2**53)``.
UNIFORM_BITS = 53


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical (unsigned) right shift of int64 bits: ``>>`` on int64 is arithmetic."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: Tensor) -> Tensor:
    """splitmix64's finaliser, elementwise on the bits of an int64 tensor.

    torch's int64 multiplication wraps modulo 2**64 (on CPU and CUDA) and the shifts are logical,
    so the result is the bits of the unsigned 64-bit splitmix64 (a test checks it against a
    pure-Python reference).
    """
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def member_keys(seeds: Sequence[int], *stream: object) -> Tensor:
    """int64 ``[N]``: each member's key for a purpose, a function of its seed and ``stream`` alone
    (through the keyed stream ``seeding.generator(seed, *stream)``)."""
    roots = torch.tensor([generator(seed, *stream).initial_seed() for seed in seeds], dtype=torch.int64)
    return mix64(roots)


def stream_bits(roots: Tensor, index: Tensor) -> Tensor:
    """int64 ``[N, L]`` in [0, 2**63): output ``index + 1`` (``index`` ``[L]``, 0-based) of the
    splitmix64 generator seeded with each member's ``roots`` ``[N]``, less its lowest bit.

    Uniform 63-bit integers, independent across indices and members as far as splitmix64 goes;
    only int64 operations, so the same bits on every device.
    """
    return _shift_right(mix64(roots.unsqueeze(1) + (index + 1) * _GOLDEN), 1)


def keyed_subsets(roots: Tensor, size: int, count: int) -> Tensor:
    """``[N, min(count, size)]``: for each member, the first ``count`` of a random order of
    ``range(size)`` drawn from its ``roots`` ``[N]`` (the ranks of :func:`stream_bits`): a uniform
    draw without replacement. Ties (probability about size**2 / 2**64) keep index order."""
    order = stream_bits(roots, torch.arange(size, device=roots.device)).argsort(dim=1, stable=True)
    return order[:, :count]


def dropout_keys(seeds: Sequence[int], site: int) -> Tensor:
    """int64 ``[N]``: the key of each member's ``site``-th dropout module, a function of its seed
    (through the keyed stream ``seeding.generator(seed, "dropout")``) and the site alone."""
    return mix64(member_keys(seeds, "dropout") ^ site)


def drop_threshold(p: float) -> int:
    """The integer form of a drop probability ``p`` that :func:`keep_mask` compares with:
    ``round(p * 2**53)``. The actual drop probability is ``drop_threshold(p) / 2**53``."""
    return round(p * 2**UNIFORM_BITS)


def _kept(streams: Tensor, count: int, thresholds: Tensor) -> Tensor:
    """bool ``[*streams.shape, count]``: element i (0-based) of each stream is kept iff the top 53 bits of
    output i + 1 of the splitmix64 generator seeded with the stream are at least its ``thresholds`` (same
    shape as ``streams``). The one formula of :func:`keep_mask` and :func:`keep_masks`."""
    index = torch.arange(1, count + 1, device=streams.device, dtype=torch.int64)
    bits = mix64(streams.unsqueeze(-1) + index * _GOLDEN)
    return _shift_right(bits, 64 - UNIFORM_BITS) >= thresholds.unsqueeze(-1)


def keep_mask(key: Tensor, step: int, shape: Sequence[int], threshold: Tensor) -> Tensor:
    """Dropout keep-mask of one member and site at ``step``: True where the element is kept.

    Element ``i`` (row-major index into ``shape``) is kept iff the top 53 bits of
    ``mix64(mix64(key ^ step) + (i + 1) * golden)``, the (i+1)-th output of a splitmix64 generator
    seeded with ``mix64(key ^ step)``, are at least ``threshold``: keep probability
    ``1 - threshold / 2**53``, independently per element as far as splitmix64 goes. Only int64
    tensor operations on ``key``'s device, no floating point: the same mask on CPU and GPU.

    Why not torch's RNG: under ``vmap(..., randomness="different")`` the population draws one
    ``[N, ...]`` random tensor, so member k's mask would depend on N and on its position; with
    ``"same"`` all members would share one mask. Either way a member's run would differ from its
    solo run. Counter-based masks also need no generator state in checkpoints: a resumed run
    recomputes them from the step.

    Args:
        key: The member's key for this site (see :func:`dropout_keys`), an int64 scalar tensor
            (batched under ``vmap``).
        step: The stream counter, e.g. the global training step; two forwards with the same step
            get the same masks.
        shape: Shape of the activation the mask is for.
        threshold: :func:`drop_threshold` of the drop probability, an int64 scalar tensor
            (batched under ``vmap``).
    """
    return _kept(mix64(key ^ step), torch.Size(shape).numel(), threshold).view(shape)


def keep_masks(keys: Tensor, step: int, shapes: Sequence[Sequence[int]], thresholds: Tensor) -> list[Tensor]:
    """The :func:`keep_mask` of every member at several dropout sites of one step, in one pass.

    Bitwise what ``keep_mask(keys[s, k], step, shapes[s], thresholds[s, k])`` gives for site s and member k,
    but the hash runs once, on ``[S, N, L]`` with L the largest site's size (element i's bits depend on its
    stream and i alone, so a smaller site takes its first elements): about 30 tensor operations for all
    sites, not 30 per site. At a small MLP's batch sizes their per-call overhead is the masks' cost on a CPU.

    Args:
        keys: int64 ``[S, N]``: each site's key of each member (:func:`dropout_keys`).
        step: The stream counter, as in :func:`keep_mask`.
        shapes: The shape of one member's activation at each of the S sites.
        thresholds: int64 ``[S, N]``: :func:`drop_threshold` of each site's rate for each member.

    Returns:
        One bool ``[N, *shapes[s]]`` mask per site: True where the element is kept.
    """
    sizes = [torch.Size(shape).numel() for shape in shapes]
    keep = _kept(mix64(keys ^ step), max(sizes), thresholds)  # [S, N, L]
    return [keep[s, :, :size].view(-1, *shape) for s, (size, shape) in enumerate(zip(sizes, shapes))]
