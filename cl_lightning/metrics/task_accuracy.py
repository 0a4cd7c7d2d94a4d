"""Accuracy of every task in one torchmetrics ``Metric``."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override


def accuracy_key(stage: str, task: int) -> str:
    """Logged name of task ``task``'s (0-based) accuracy, 1-based and zero-padded for sorting."""
    return f"{stage}/acc/task_{task + 1:02d}"


class TaskAccuracy(Metric):
    """Accuracy (%) per task from ``(preds, target, task)`` triples.

    One metric with ``correct[T]`` / ``total[T]`` states instead of T metric objects: the whole
    row of the accuracy matrix is synchronised across processes in one reduction, and a batch
    may mix tasks. Tasks without examples compute to NaN.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_tasks: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_tasks = num_tasks
        self.add_state("correct", torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")

    @override
    def update(self, preds: Tensor, target: Tensor, task: Tensor) -> None:
        self.correct.index_add_(0, task, (preds == target).long())
        self.total.index_add_(0, task, torch.ones_like(task))

    @override
    def compute(self) -> Tensor:
        return 100.0 * self.correct.double() / self.total.double()
