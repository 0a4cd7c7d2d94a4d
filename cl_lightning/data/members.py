"""The data of a population: every member's task sequence over one shared copy of the base images.

Member k of a population sees exactly the data of the solo run with seed k: the same pixel
permutations, validation split, per-task subsets, class order and epoch order, derived from its
seed with the solo run's generator keys (``generator(seed_k, "permutations")``,
``(seed_k, "val_split")``, ``(seed_k, "subset", split, task)``, ``(seed_k, "class_order")``,
``(seed_k, "shuffle", epoch)``). Only these choices are kept per member, as index tensors: a
member's pool of a task is ``[n_t]`` indices into the base set, its permutations ``[T, P]``
pixel maps. The base images are stored once, as uint8, on the device that trains; no task is
materialised per member (a 60k-image task would cost 47 MB per member and task).

A batch of the population is ``[N, B, ...]`` (member k's batch in row k, as
:class:`~cl_lightning.models.population.Population` takes it), fetched with one index into the
shared base images and, for permuted tasks, one ``gather`` through each member's map: the batch
path has no loop over members, so its cost does not grow with N in Python or kernel launches.

That is only possible when every member's task has the same number of examples; the units here
refuse (:class:`~cl_lightning.errors.ConfigError`) the settings where it does not.

The units: :func:`member_tasks` (every member's maps, classes and pools, on the CPU, once),
:class:`MemberData` (the base images once on a device, and :class:`MemberSet` s of one task or
several), :class:`MemberBatches` (an epoch of training batches, DDP shares and mid-epoch resume)
and :class:`MemberEvalBatches`; :class:`~cl_lightning.data.datamodule.ContinualDataModule` serves them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cl_lightning.data.sources import ImageSet
from cl_lightning.data.tasks import apply_pixel_map, apply_pixel_maps, permutation_maps, rotation_maps, split_classes
from cl_lightning.errors import ConfigError
from cl_lightning.seeding import generator

__all__ = ["MemberBatches", "MemberData", "MemberEvalBatches", "MemberSet", "MemberTasks", "epoch_orders", "member_tasks"]

#: ``(x, y, task)`` of a population: ``[N, B, C, H, W]`` float in [0, 1], ``[N, B]``, ``[N, B]``.
Batch = tuple[Tensor, Tensor, Tensor]
Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class MemberTasks:
    """Every member's task sequence, kept as index tensors (on the CPU).

    Attributes:
        seeds: The members' seeds; member k is the solo run with ``seeds[k]``.
        num_classes: Classes of the dataset (the width of the class masks).
        pixel_maps: Permuted: ``[N, T, P]``, member k's permutations in row k. Rotated: the
            ``[T, P]`` rotation maps, which no seed changes, shared by every member rather than
            repeated N times. Split: None.
        task_classes: Split: ``[N, T, C]``, member k's classes of each task; else None.
        pools: Per split (``train``, ``val``, ``test``), per task, ``[N, n_t]``: row k holds the
            base indices of member k's examples of that task (``val`` and ``train`` index the
            base training set). Tasks whose pool is the member's whole split (permuted and rotated
            without subsets) share one tensor instead of holding T copies.
    """

    seeds: tuple[int, ...]
    num_classes: int
    pixel_maps: Tensor | None
    task_classes: Tensor | None
    pools: dict[Split, list[Tensor]]

    @property
    def size(self) -> int:
        """N, the number of members."""
        return len(self.seeds)

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks of every member."""
        return len(self.pools["train"])

    @property
    def class_mask(self) -> Tensor | None:
        """``[N, T, num_classes]`` bool mask of each member's task classes (split), else None."""
        if self.task_classes is None:
            return None
        mask = torch.zeros(self.size, self.num_tasks, self.num_classes, dtype=torch.bool)
        return mask.scatter_(2, self.task_classes, True)

    def member_pixel_maps(self, member: int) -> Tensor | None:
        """Member ``member``'s ``[T, P]`` pixel maps (a view), as a solo run holds them."""
        if self.pixel_maps is None or self.pixel_maps.dim() == 2:
            return self.pixel_maps
        return self.pixel_maps[member]


def member_tasks(
    train: ImageSet,
    test: ImageSet,
    seeds: Sequence[int],
    *,
    benchmark: Literal["permuted", "rotated", "split"],
    num_tasks: int,
    degrees_per_task: float = 9.0,
    classes_per_task: int = 5,
    class_order: Literal["label", "shuffled"] = "label",
    train_examples_per_task: int | None = None,
    test_examples_per_task: int | None = None,
    val_fraction: float = 0.0,
) -> MemberTasks:
    """Every member's task sequence, each drawn from its own seed as
    :meth:`~cl_lightning.data.datamodule.ContinualDataModule.setup` draws a solo run's.

    The settings mean what the datamodule's arguments of the same names mean.

    Raises:
        ConfigError: settings a solo run refuses (a validation split that leaves a side empty, a
            subset larger than a task, a task without training examples), or a task whose size
            differs between members, which a population cannot batch together.
    """
    if not seeds:
        raise ConfigError("a population needs at least one seed")
    seeds = tuple(int(seed) for seed in seeds)
    _, height, width = train.images.shape[1:]
    pixel_maps = task_classes = None
    if benchmark == "permuted":
        pixel_maps = torch.stack([permutation_maps(num_tasks, height * width, generator(seed, "permutations")) for seed in seeds])
    elif benchmark == "rotated":
        pixel_maps = rotation_maps(num_tasks, height, width, degrees_per_task)
    else:
        shuffled = class_order == "shuffled"
        task_classes = torch.stack([
            split_classes(num_tasks, classes_per_task, train.num_classes, generator(seed, "class_order") if shuffled else None)
            for seed in seeds
        ])

    n_train = len(train)
    n_val = int(round(val_fraction * n_train))
    if val_fraction > 0 and not 0 < n_val < n_train:
        raise ConfigError(f"val_fraction {val_fraction} of {n_train} training examples leaves "
                          f"{n_val} for validation and {n_train - n_val} for training; both need some")
    targets = {"train": train.targets, "val": train.targets, "test": test.targets}
    limits = {"train": train_examples_per_task, "val": test_examples_per_task, "test": test_examples_per_task}
    # Each member's splits of the base sets, as its solo run draws them: one split of the base
    # training set into train/val, shared by all of the member's tasks.
    bases: list[dict[Split, Tensor]] = []
    for seed in seeds:
        order = torch.randperm(n_train, generator=generator(seed, "val_split"))
        bases.append({"train": order[n_val:].sort().values, "val": order[:n_val].sort().values, "test": torch.arange(len(test))})

    pools: dict[Split, list[Tensor]] = {}
    for split in SPLITS:
        limit = limits[split] if split != "val" or val_fraction > 0 else None  # no validation split: empty pools
        per_task = []
        for t in range(num_tasks):
            per_task.append([
                _task_pool(targets[split], base[split], task_classes[k, t] if task_classes is not None else None, limit,
                           seed, split, t, benchmark)
                for k, (seed, base) in enumerate(zip(seeds, bases))
            ])
            if split == "train" and min(len(pool) for pool in per_task[t]) == 0:
                raise ConfigError(f"task {t + 1} has no training examples; check the data settings")
        _check_equal_sizes(per_task, seeds, split, benchmark)
        whole = [all(pool is base[split] for pool, base in zip(members, bases)) for members in per_task]
        stacked_bases = torch.stack([base[split] for base in bases]) if any(whole) else None
        pools[split] = [stacked_bases if is_whole else torch.stack(members) for is_whole, members in zip(whole, per_task)]
    return MemberTasks(seeds, train.num_classes, pixel_maps, task_classes, pools)


_SPLIT_LABEL = {"train": "training", "val": "validation", "test": "test"}
_SPLIT_OPTION = {"train": "train_examples_per_task", "val": "test_examples_per_task", "test": "test_examples_per_task"}


def _task_pool(targets: Tensor, candidates: Tensor, classes: Tensor | None, limit: int | None,
               seed: int, split: Split, task: int, benchmark: str) -> Tensor:
    """Base indices of one member's examples of ``task`` in ``split``: its classes, then a seeded
    subset of ``limit`` of them; ``candidates`` itself when neither applies (so tasks can share it).

    A ``limit`` larger than the task is refused, as a solo run refuses it: the run would be reported
    with more examples per task than it used.
    """
    if classes is not None:
        candidates = candidates[torch.isin(targets[candidates], classes)]
    if limit is not None and limit > len(candidates):
        raise ConfigError(
            f"data.{_SPLIT_OPTION[split]} is {limit} but task {task + 1} has only {len(candidates)} {_SPLIT_LABEL[split]} "
            f"examples for seed {seed} ({benchmark}); set it to at most {len(candidates)}, or to null to use all of them."
        )
    if limit is not None and limit < len(candidates):
        pick = torch.randperm(len(candidates), generator=generator(seed, "subset", split, task))
        candidates = candidates[pick[:limit].sort().values]
    return candidates


def _check_equal_sizes(per_task: list[list[Tensor]], seeds: tuple[int, ...], split: Split, benchmark: str) -> None:
    """Refuse a split whose task sizes differ between members: a population batches its members
    together, so member k's task t must have as many examples as every other member's."""
    for t, members in enumerate(per_task):
        sizes = [len(pool) for pool in members]
        if len(set(sizes)) == 1:
            continue
        per_seed = ", ".join(f"seed {seed}: {size}" for seed, size in zip(seeds, sizes))
        smallest = min(len(pool) for members in per_task for pool in members)
        raise ConfigError(
            f"task {t + 1} has a different number of {_SPLIT_LABEL[split]} examples for each member of the population "
            f"({per_seed}): on the {benchmark} benchmark a task's size depends on the seed (its classes and its "
            f"validation split) when the dataset's classes differ in size, and a population batches its members "
            f"together, so each task needs the same size for every member. Set data.{_SPLIT_OPTION[split]} to at most "
            f"{smallest} (the smallest {_SPLIT_LABEL[split]} task of any seed), or run these seeds separately."
        )


def epoch_orders(seeds: Sequence[int], length: int, epoch: int, shuffle: bool) -> Tensor:
    """``[N, length]``: member k's order of its training examples in ``epoch``, the solo run's.

    A function of (seed, epoch) only, never of a stateful sampler, because Lightning iterates the
    loader a different number of times in a resumed run.
    """
    if not shuffle:
        return torch.arange(length).expand(len(seeds), length)
    return torch.stack([torch.randperm(length, generator=generator(seed, "shuffle", epoch)) for seed in seeds])


class MemberSet:
    """Examples of one task, or the union of several, for every member of a population.

    Row k of ``base_index`` holds member k's base indices, so the examples of all members together
    are indices into ONE base set, never an ``[N, ...]`` copy of its images.

    Args:
        base: The shared base set (on the device batches are made on).
        base_index: ``[N, n]`` base indices; row k is member k's examples.
        task: ``[N, n]`` task of each example (an expanded view when the rows agree).
        pixel_maps: ``[N, T, P]`` per member (permuted), ``[T, P]`` shared (rotated) or None,
            on ``base``'s device.
        only_task: The task every example belongs to, if one: its map is then applied to the
            whole batch without an index per example and pixel.
    """

    def __init__(self, base: ImageSet, base_index: Tensor, task: Tensor, pixel_maps: Tensor | None,
                 only_task: int | None = None) -> None:
        self.base, self.base_index, self.task, self.pixel_maps, self.only_task = base, base_index, task, pixel_maps, only_task

    def __len__(self) -> int:
        """n, the number of examples of each member."""
        return int(self.base_index.shape[1])

    def select(self, positions: Tensor) -> MemberSet:
        """The examples at ``positions`` (``[N, m]``, row k: positions in member k's examples)."""
        return MemberSet(self.base, self.base_index.gather(1, positions), self.task.gather(1, positions),
                         self.pixel_maps, self.only_task)

    def batch(self, start: int, stop: int) -> Batch:
        """Examples ``[start, stop)`` of every member: ``x [N, B, C, H, W]`` in [0, 1], ``y``, ``task`` ``[N, B]``.

        One index into the shared base images, then, for pixel-map tasks, one gather: member k's rows
        are bitwise those of the population of one with its seed.
        """
        index, task = self.base_index[:, start:stop], self.task[:, start:stop]
        images = self.base.images[index]
        if self.pixel_maps is not None:
            images = self._through_maps(images, task)
        return images.float().div_(self.base.max_value), self.base.targets[index], task

    def _through_maps(self, images: Tensor, task: Tensor) -> Tensor:
        """``images`` ``[N, B, C, H, W]`` through the maps of their ``task`` ``[N, B]``, with as small an
        index as the case allows (one map, N maps, or one per example only for multitask batches)."""
        n, b = task.shape
        if self.pixel_maps.dim() == 2:  # rotated: one map per task, shared by the members
            flat = images.flatten(0, 1)
            if self.only_task is not None:
                return apply_pixel_map(flat, self.pixel_maps[self.only_task]).unflatten(0, (n, b))
            return apply_pixel_maps(flat, self.pixel_maps[task.flatten()]).unflatten(0, (n, b))
        if self.only_task is not None:  # permuted, one task: each member's map, broadcast over its batch
            maps = self.pixel_maps[:, self.only_task].unsqueeze(1)
        else:  # permuted, several tasks (multitask): each example's own map
            maps = self.pixel_maps[torch.arange(n, device=task.device).unsqueeze(1), task]
        return _permute_pixels(images, maps)


def _permute_pixels(images: Tensor, maps: Tensor) -> Tensor:
    """Gather the pixels of ``images`` ``[N, B, C, H, W]`` through ``maps`` ``[N, 1 or B, H*W]`` in one
    call. The maps are permutations (no FILL entries: :func:`permutation_maps` draws them), and the
    index is an expanded view, so nothing ``[N, B, C, H*W]``-sized is built besides the output."""
    n, b, c, h, w = images.shape
    index = maps.unsqueeze(2).expand(n, b, c, h * w)
    return images.reshape(n, b, c, h * w).gather(3, index).view(n, b, c, h, w)


class MemberData:
    """A population's data on one device: the base images once, every member's task sequence.

    ``train`` serves both the ``train`` and ``val`` splits (the validation split is a part of the
    base training set), so the device holds each base image exactly once whatever N is.
    """

    def __init__(self, tasks: MemberTasks, train: ImageSet, test: ImageSet, device: torch.device | None = None) -> None:
        self.tasks = tasks
        self.device = device if device is not None else torch.device("cpu")
        train, test = (ImageSet(s.images.to(self.device), s.targets.to(self.device), s.max_value, s.num_classes)
                       for s in (train, test))
        self.sets: dict[Split, ImageSet] = {"train": train, "val": train, "test": test}
        self.pixel_maps = tasks.pixel_maps.to(self.device) if tasks.pixel_maps is not None else None

    def task_set(self, task: int | Sequence[int], split: Split = "train") -> MemberSet:
        """Every member's examples of one task (or the union of several, task by task) from ``split``."""
        tasks = [task] if isinstance(task, int) else list(task)
        pools = [self.tasks.pools[split][t] for t in tasks]
        base_index = torch.cat(pools, dim=1).to(self.device)
        task_ids = torch.cat([torch.full((pool.shape[1],), t) for t, pool in zip(tasks, pools)]).to(self.device)
        return MemberSet(self.sets[split], base_index, task_ids.expand_as(base_index), self.pixel_maps,
                         tasks[0] if len(tasks) == 1 else None)


class MemberBatches:
    """One epoch of a population's training batches, ``[N, B, ...]``: a sized iterable Lightning takes
    as a train loader (leaner than a ``DataLoader``: no sampler, fetcher or collate).

    Batch i is columns ``[i*B, (i+1)*B)`` of the members' epoch orders. Under DDP each process
    takes its interleaved share of every member's order, padded by wrap-around to equal shares as
    ``DistributedSampler`` pads, so every process steps the same number of equal-sized batches.

    Resumable mid-epoch through Lightning's stateful-loader protocol: the checkpoint records how
    many batches the loop has processed, and a loader restored with that state starts after them.

    Args:
        dataset: Every member's training examples of the current task(s).
        order: ``[N, n]`` each member's order of its examples this epoch (:func:`epoch_orders`).
        batch_size: B, examples per member and batch.
        epoch: The epoch the order belongs to (a stale restored state is ignored).
        progress: How many batches of this epoch the loop has processed (saved for resume).
        rank, world_size: This process's place among the DDP processes.
    """

    def __init__(self, dataset: MemberSet, order: Tensor, batch_size: int, epoch: int,
                 progress: Callable[[], int], rank: int = 0, world_size: int = 1) -> None:
        if world_size > 1:
            padded = torch.cat([order, order[:, : (-order.shape[1]) % world_size]], dim=1)
            order = padded[:, rank::world_size]
        # The epoch's examples in order, composed once: a batch is then a slice and one index.
        self.dataset = dataset.select(order.to(dataset.base_index.device))
        self.batch_size, self.epoch, self.progress = batch_size, epoch, progress
        self._skip = 0

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        skip, self._skip = self._skip, 0  # a restored position applies to the first pass only
        for start in range(skip * self.batch_size, len(self.dataset), self.batch_size):
            yield self.dataset.batch(start, start + self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.progress()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["epoch"] == self.epoch:  # the stale loader Lightning builds on resume ignores it
            self._skip = state["batches"]


class MemberEvalBatches:
    """A population's evaluation batches of one task and split, ``[N, E, ...]``, in pool order.

    Member k's batches are those of its solo run's evaluation loader. Under DDP each process takes
    the positions ``rank::world_size`` with none repeated, as Lightning's
    ``UnrepeatedDistributedSampler`` does for a solo run, so a reduced accuracy counts every
    example once.
    """

    def __init__(self, dataset: MemberSet, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size > 1:
            positions = torch.arange(rank, len(dataset), world_size, device=dataset.base_index.device)
            dataset = dataset.select(positions.expand(dataset.base_index.shape[0], -1))
        self.dataset, self.batch_size = dataset, batch_size

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self.dataset), self.batch_size):
            yield self.dataset.batch(start, start + self.batch_size)
