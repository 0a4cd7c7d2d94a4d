"""Episodic memory: a few training examples kept from every task seen so far.

Shared by every rehearsal method (MC-SGD's consolidation, A-GEM, ER). The memory stores
*indices* into each task's training examples, not images: it is small in a checkpoint, and the
batch it yields goes through the same task transform as training data. A population's memory
holds one row of indices per member, drawn from the member's own seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.data.members import Batch, MemberSet
from cl_lightning.errors import ConfigError
from cl_lightning.seeding import generator


class DrawOptions(NamedTuple):
    """The user-facing names of a draw's settings, which its errors cite."""

    what: str
    why: str
    per_task: str
    per_class: str
    replacement: str


MEMORY_OPTIONS = DrawOptions("the episodic memory", "a method that rehearses cannot run without a memory",
                             "memory_per_task", "memory_per_class", "memory_replacement")


class ExampleDraw:
    """A rule for drawing a fixed set of examples from one task's training data.

    Either ``per_task`` examples uniformly (with or without replacement), or exactly
    ``per_class`` examples of every class present in the task, without replacement. Shared by
    the episodic memory and MC-SGD's subset of the current task, which differ only in their
    sizes and generator streams.

    Args:
        per_task: Examples per task, drawn uniformly from the task's training data.
        per_class: Examples per class of each task instead (exactly that many of every class
            present in the task; without replacement).
        replacement: Draw ``per_task`` examples with replacement (duplicates possible), as the
            research code did for MNIST.
        options: The names of these settings as the user sets them, for error messages.
    """

    def __init__(self, per_task: int | None = None, per_class: int | None = None, replacement: bool = False,
                 options: DrawOptions = MEMORY_OPTIONS) -> None:
        if (per_task is None) == (per_class is None):
            raise ConfigError(f"{options.what} needs a size: set exactly one of `{options.per_task}` or "
                              f"`{options.per_class}` (got {per_task!r} and {per_class!r}); {options.why}")
        size = per_task if per_task is not None else per_class
        if size < 1:
            raise ConfigError(f"{options.what} needs at least 1 example, got {size}; raise "
                              f"`{options.per_task if per_task is not None else options.per_class}`")
        self.per_task = per_task
        self.per_class = per_class
        self.replacement = replacement
        self.options = options

    def draw(self, dataset: MemberSet, seeds: Sequence[int], stream: tuple, task: int) -> Tensor:
        """``[N, m]``: row k holds positions in member k's examples of ``dataset`` (task ``task``'s
        training data), drawn with ``generator(seeds[k], *stream)``: what the solo run with seed
        ``seeds[k]`` draws. Per class, the positions come grouped by class, in the order of the labels."""
        rows = []
        for k, seed in enumerate(seeds):
            g = generator(seed, *stream)
            if self.per_task is not None:
                rows.append(self._draw_uniform(len(dataset), g, task))
            else:
                rows.append(self._draw_per_class(dataset.base.targets[dataset.base_index[k]].cpu(), g, task))
        return torch.stack(rows)

    def _draw_per_class(self, targets: Tensor, g: torch.Generator, task: int) -> Tensor:
        chosen_per_class = []
        for cls in targets.unique():
            members = (targets == cls).nonzero().flatten()
            if self.per_class > len(members):
                raise ConfigError(f"{self.options.what} takes {self.per_class} examples per class, but class "
                                  f"{cls.item()} of task {task + 1} has {len(members)}; lower `{self.options.per_class}`")
            chosen_per_class.append(members[torch.randperm(len(members), generator=g)[: self.per_class]])
        return torch.cat(chosen_per_class)

    def check(self, dm: ContinualDataModule) -> None:
        """Fail now, before any training, if some task cannot supply the examples to draw."""
        for task in range(dm.num_tasks):
            self.draw(dm.task_set(task, "train"), dm.seeds, ("check",), task)

    def _draw_uniform(self, n: int, g: torch.Generator, task: int) -> Tensor:
        if self.replacement:
            return torch.randint(n, (self.per_task,), generator=g)
        if self.per_task > n:
            raise ConfigError(f"{self.options.what} takes {self.per_task} examples per task, but task {task + 1} has "
                              f"{n}; lower `{self.options.per_task}` or set `{self.options.replacement}: true`")
        return torch.randperm(n, generator=g)[: self.per_task]


class EpisodicMemory(ExampleDraw):
    """Examples of past tasks, drawn once per task from that task's whole training set.

    The draw depends only on the run's seed and the task, never on the order in which batches
    arrived or on which process draws it, so every process of a multi-process run holds the
    same memory and a resumed run re-creates it. The sizes are those of :class:`ExampleDraw`.
    """

    def __init__(self, per_task: int | None = None, per_class: int | None = None, replacement: bool = False) -> None:
        super().__init__(per_task, per_class, replacement, MEMORY_OPTIONS)
        self.indices: dict[int, Tensor] = {}

    @property
    def tasks(self) -> list[int]:
        return sorted(self.indices)

    def add_task(self, dm: ContinualDataModule, task: int) -> None:
        """Draw ``task``'s examples from each member's seed (a no-op if the task is already in memory)."""
        if task not in self.indices:
            self.indices[task] = self.draw(dm.task_set(task, "train"), dm.seeds, ("episodic_memory", task), task)

    def batch(self, dm: ContinualDataModule, tasks: int | list[int]) -> Batch:
        """The stored examples of one task (or several, concatenated per member) as one ``(x, y, task)``
        batch ``[N, m * len(tasks), ...]``."""
        tasks = [tasks] if isinstance(tasks, int) else tasks
        parts = []
        for t in tasks:
            dataset = dm.task_set(t, "train")
            parts.append(dataset.select(self.indices[t].to(dataset.base_index.device)).batch(0, self.indices[t].shape[1]))
        x, y, task_ids = zip(*parts)
        return torch.cat(x, dim=1), torch.cat(y, dim=1), torch.cat(task_ids, dim=1)

    def state_dict(self) -> dict[str, Any]:
        return {"indices": {t: idx.clone() for t, idx in self.indices.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.indices = {int(t): idx for t, idx in state["indices"].items()}
