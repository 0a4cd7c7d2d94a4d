import math

import pytest
import torch

from cl_lightning.metrics.continual import (
    average_accuracy,
    backward_transfer,
    forgetting,
    learning_accuracy,
    summaries,
    summary,
)
from cl_lightning.metrics.task_accuracy import TaskAccuracy

NAN = float("nan")
# a[t][i]: accuracy on task i after training task t (hand-made, 3 tasks).
MATRIX = torch.tensor([[90.0, NAN, NAN], [70.0, 80.0, NAN], [60.0, 75.0, 85.0]], dtype=torch.float64)


def test_formulas_against_hand_computed_values():
    assert average_accuracy(MATRIX, 2) == pytest.approx((60 + 75 + 85) / 3)
    # task 1: best before the last task max(90, 70) = 90, now 60 -> 30; task 2: 80 -> 75 -> 5.
    assert forgetting(MATRIX, 2) == pytest.approx((30 + 5) / 2 / 100)
    assert learning_accuracy(MATRIX, 2) == pytest.approx((90 + 80 + 85) / 3)
    assert backward_transfer(MATRIX, 2) == pytest.approx(((60 - 90) + (75 - 80)) / 2)


def test_formulas_after_intermediate_tasks():
    assert average_accuracy(MATRIX, 1) == pytest.approx(75.0)
    assert forgetting(MATRIX, 1) == pytest.approx(0.20)
    assert backward_transfer(MATRIX, 1) == pytest.approx(-20.0)
    assert summary(MATRIX, 0) == {
        "average_accuracy": 90.0, "forgetting": 0.0, "learning_accuracy": 90.0, "backward_transfer": 0.0,
    }


def test_forgetting_uses_best_earlier_accuracy_not_first():
    m = torch.tensor([[50.0, NAN, NAN], [80.0, 70.0, NAN], [40.0, 70.0, 90.0]], dtype=torch.float64)
    # task 1 peaked after task 2 (80), not when learnt (50)
    assert forgetting(m, 2) == pytest.approx(((80 - 40) + 0) / 2 / 100)


def test_forgetting_ignores_future_task_entries():
    # accuracy measured before a task was trained (upper triangle) is not "learnt" accuracy
    m = MATRIX.clone()
    m[0, 1] = 99.0
    assert forgetting(m, 2) == pytest.approx(forgetting(MATRIX, 2))


def test_task_accuracy_metric_per_task_and_nan_for_unseen():
    metric = TaskAccuracy(num_tasks=3)
    metric.update(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 0, 0]]), torch.tensor([[0, 0, 1, 1]]))
    metric.update(torch.tensor([[5]]), torch.tensor([[5]]), torch.tensor([[1]]))
    acc = metric.compute()
    assert acc.shape == (1, 3)
    assert acc[0, 0].item() == pytest.approx(100.0)
    assert acc[0, 1].item() == pytest.approx(100 / 3)
    assert math.isnan(acc[0, 2].item())


def test_task_accuracy_metric_counts_each_member_on_its_own():
    metric = TaskAccuracy(num_tasks=2, num_members=2)
    # member 0: task 0 right twice; member 1: task 1 right once, wrong once
    metric.update(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 2], [3, 0]]), torch.tensor([[0, 0], [1, 1]]))
    acc = metric.compute()
    assert acc[0, 0].item() == 100.0 and math.isnan(acc[0, 1].item())
    assert math.isnan(acc[1, 0].item()) and acc[1, 1].item() == 50.0


@pytest.mark.parametrize("future_tasks_evaluated", [False, True])
def test_all_summaries_at_once_equal_each_task_summary(future_tasks_evaluated):
    g = torch.Generator().manual_seed(0)
    matrix = torch.rand(12, 12, generator=g, dtype=torch.float64) * 100
    if not future_tasks_evaluated:
        matrix[torch.ones(12, 12, dtype=torch.bool).triu(1)] = float("nan")
    for t in range(12):
        expected = [summary(matrix, k) for k in range(t + 1)]
        for got, want in zip(summaries(matrix, t), expected, strict=True):
            assert got.keys() == want.keys()
            assert all(got[k] == pytest.approx(want[k], abs=1e-9) for k in want)
