"""Continual-learning summaries of an accuracy matrix (DESIGN.md §5).

``matrix[t, i]`` is the accuracy (%) on task i of the model kept after training task t
(0-based here; the paper's a[t+1][i+1]). Entries not evaluated are NaN. Every function takes
the matrix and the 0-based index ``t`` of the last completed task.
"""

from __future__ import annotations

import torch
from torch import Tensor


def average_accuracy(matrix: Tensor, t: int) -> float:
    """A_t: mean accuracy over tasks 1..t of the model kept after task t."""
    return matrix[t, : t + 1].mean().item()


def forgetting(matrix: Tensor, t: int) -> float:
    """F_t = mean over i < t of (max_{i <= l < t} a[l][i] - a[t][i]) / 100, a fraction.

    The best accuracy a task ever had before the last task, minus its final accuracy
    (Chaudhry et al.'s definition used by the paper's tables). 0 after the first task.
    """
    if t == 0:
        return 0.0
    drops = [matrix[i:t, i].max() - matrix[t, i] for i in range(t)]
    return (torch.stack(drops).mean() / 100).item()


def learning_accuracy(matrix: Tensor, t: int) -> float:
    """Mean of a[i][i], i <= t: how well each task was learnt just after training on it."""
    return matrix.diagonal()[: t + 1].mean().item()


def backward_transfer(matrix: Tensor, t: int) -> float:
    """BWT_t = mean over i < t of (a[t][i] - a[i][i]) in percentage points (negative: forgetting)."""
    if t == 0:
        return 0.0
    return (matrix[t, :t] - matrix.diagonal()[:t]).mean().item()


def summary(matrix: Tensor, t: int) -> dict[str, float]:
    """All summaries after task t, keyed as they are logged and written."""
    return {
        "average_accuracy": average_accuracy(matrix, t),
        "forgetting": forgetting(matrix, t),
        "learning_accuracy": learning_accuracy(matrix, t),
        "backward_transfer": backward_transfer(matrix, t),
    }
