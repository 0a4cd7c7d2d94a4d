"""Continual-learning summaries of an accuracy matrix: the paper's Table 1 metrics and two more.

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
    (Chaudhry et al.'s definition used by the paper's tables: facebookresearch/agem@4542149
    utils/utils.py ``compute_fgt``, lines 381-392, whose max also takes rows before task i was trained; here
    only rows l >= i, and divided by 100). 0 after the first task.
    """
    if t == 0:
        return 0.0
    # One masked max over the earlier rows instead of a loop over tasks: a run's files rewrite
    # every t's summary after each task, which must stay cheap for long sequences. Entries
    # above the diagonal (tasks not trained yet, when future tasks are evaluated) do not count.
    seen = torch.ones(t, t, dtype=torch.bool, device=matrix.device).tril()
    best = matrix[:t, :t].masked_fill(~seen, float("-inf")).max(dim=0).values
    return ((best - matrix[t, :t]).mean() / 100).item()


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


def summaries(matrix: Tensor, t: int) -> list[dict[str, float]]:
    """:func:`summary` after each task 0..t, computed at once.

    A run rewrites every task's summaries after each task; one pass of masked sums and a
    running max keeps that cheap for long sequences (1000 tasks: milliseconds, not a loop of
    per-task reductions). Equal to ``[summary(matrix, k) for k in range(t + 1)]``.
    """
    a = matrix[: t + 1, : t + 1]
    lower = torch.ones_like(a, dtype=torch.bool).tril()  # a[k][i] with i <= k: tasks trained by then
    earlier = lower.tril(-1)  # i < k
    seen = torch.arange(1, t + 2, dtype=a.dtype, device=a.device)
    diagonal = a.diagonal()
    best = a.masked_fill(~lower, float("-inf")).cummax(dim=0).values  # best[k][i] = max_{i <= l <= k} a[l][i]
    best_before = torch.cat([torch.zeros_like(best[:1]), best[:-1]])  # row k: the best up to task k - 1
    previous = (seen - 1).clamp(min=1)
    columns = {
        "average_accuracy": a.where(lower, 0).sum(1) / seen,
        "forgetting": (best_before - a).where(earlier, 0).sum(1) / previous / 100,
        "learning_accuracy": diagonal.cumsum(0) / seen,
        "backward_transfer": (a - diagonal).where(earlier, 0).sum(1) / previous,
    }
    values = {name: column.tolist() for name, column in columns.items()}
    return [{name: values[name][k] for name in columns} for k in range(t + 1)]
