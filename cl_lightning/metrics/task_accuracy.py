"""Accuracy of every task of every population member in one torchmetrics ``Metric``."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override


def accuracy_key(stage: str, task: int) -> str:
    """Logged name of task ``task``'s (0-based) accuracy, 1-based and zero-padded for sorting."""
    return f"{stage}/acc/task_{task + 1:02d}"


class TaskAccuracy(Metric):
    """Accuracy (%) per member and task from ``(preds, target, task)`` of shape ``[N, B]`` each.

    One metric with ``correct[N, T]`` / ``total[N, T]`` states instead of N x T metric objects: the
    rows of every member's accuracy matrix are synchronised across processes in one reduction, and
    a batch may mix tasks. Tasks without examples compute to NaN.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_tasks: int, num_members: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_tasks, self.num_members = num_tasks, num_members
        self.add_state("correct", torch.zeros(num_members, num_tasks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_members, num_tasks, dtype=torch.long), dist_reduce_fx="sum")

    @override
    def update(self, preds: Tensor, target: Tensor, task: Tensor) -> None:
        members = torch.arange(self.num_members, device=task.device).unsqueeze(1)
        cell = (members * self.num_tasks + task).flatten()  # (member, task) as one index into the flat states
        self.correct.view(-1).index_add_(0, cell, (preds == target).long().flatten())
        self.total.view(-1).index_add_(0, cell, torch.ones_like(cell))

    @override
    def compute(self) -> Tensor:
        """``[N, T]`` accuracies in %."""
        return 100.0 * self.correct.double() / self.total.double()
