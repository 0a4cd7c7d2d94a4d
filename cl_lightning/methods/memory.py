"""Episodic memory: a few training examples kept from every task seen so far.

Shared by every rehearsal method (MC-SGD's consolidation, A-GEM, ER). The memory stores
*indices* into each task's training examples, not images: it is small in a checkpoint, and the
batch it yields goes through the same task transform as training data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cl_lightning.data.datamodule import Batch, ContinualDataModule
from cl_lightning.errors import ConfigError
from cl_lightning.seeding import generator


class EpisodicMemory:
    """Examples of past tasks, drawn once per task from that task's whole training set.

    The draw depends only on the run's seed and the task, never on the order in which batches
    arrived or on which process draws it, so every process of a multi-process run holds the
    same memory and a resumed run re-creates it.

    Args:
        per_task: Examples per task, drawn uniformly from the task's training data.
        per_class: Examples per class of each task instead (exactly that many of every class
            present in the task; without replacement).
        replacement: Draw ``per_task`` examples with replacement (duplicates possible), as the
            research code did for MNIST.
    """

    def __init__(self, per_task: int | None = None, per_class: int | None = None, replacement: bool = False) -> None:
        if (per_task is None) == (per_class is None):
            raise ConfigError("the episodic memory needs a size: set exactly one of `memory_per_task` or `memory_per_class` "
                              f"(got {per_task!r} and {per_class!r}); a method that rehearses cannot run without a memory")
        size = per_task if per_task is not None else per_class
        if size < 1:
            raise ConfigError(f"episodic memory size must be at least 1, got {size}; a method that "
                              f"rehearses needs a memory")
        self.per_task = per_task
        self.per_class = per_class
        self.replacement = replacement
        self.indices: dict[int, Tensor] = {}

    @property
    def tasks(self) -> list[int]:
        return sorted(self.indices)

    def add_task(self, dm: ContinualDataModule, task: int, seed: int) -> None:
        """Draw ``task``'s examples (a no-op if the task is already in memory)."""
        if task in self.indices:
            return
        dataset = dm.task_dataset(task, "train")
        g = generator(seed, "episodic_memory", task)
        if self.per_task is not None:
            n = len(dataset)
            if self.replacement:
                chosen = torch.randint(n, (self.per_task,), generator=g)
            else:
                if self.per_task > n:
                    raise ConfigError(f"memory of {self.per_task} examples per task, but task {task + 1} has {n}; lower "
                                      "`memory_per_task` or set `memory_replacement: true`")
                chosen = torch.randperm(n, generator=g)[: self.per_task]
        else:
            targets = dataset.base.targets[dataset.base_index]
            chosen_per_class = []
            for cls in targets.unique():
                members = (targets == cls).nonzero().flatten()
                if self.per_class > len(members):
                    raise ConfigError(f"memory of {self.per_class} per class, but class {cls.item()} of "
                                      f"task {task + 1} has {len(members)} examples")
                chosen_per_class.append(members[torch.randperm(len(members), generator=g)[: self.per_class]])
            chosen = torch.cat(chosen_per_class)
        self.indices[task] = chosen

    def batch(self, dm: ContinualDataModule, tasks: int | list[int]) -> Batch:
        """The stored examples of one task (or several, concatenated) as one ``(x, y, task)`` batch."""
        tasks = [tasks] if isinstance(tasks, int) else tasks
        parts = [dm.task_dataset(t, "train").__getitems__(self.indices[t]) for t in tasks]
        x, y, task_ids = zip(*parts)
        return torch.cat(x), torch.cat(y), torch.cat(task_ids)

    def state_dict(self) -> dict[str, Any]:
        return {"indices": {t: idx.clone() for t, idx in self.indices.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.indices = {int(t): idx for t, idx in state["indices"].items()}
