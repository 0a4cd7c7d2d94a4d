"""Accuracy of a model on chosen tasks, outside Lightning's evaluation loop.

For models that are not the one being trained (MC-SGD's w_hat chain, points on a linear path):
the whole evaluation set of each task is run on every process, so no synchronisation is needed.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.models.module import eval_mode


@torch.inference_mode()
def task_accuracies(module: LightningModule, dm: ContinualDataModule, tasks: list[int], split: str) -> Tensor:
    """Accuracy (%) of ``module`` on each of ``tasks`` (evaluated in eval mode)."""
    accuracies = []
    with eval_mode(module):
        for task in tasks:
            dataset = dm.task_dataset(task, split)
            correct = torch.zeros((), dtype=torch.long, device=module.device)
            for start in range(0, len(dataset), dm.eval_batch_size):
                batch = dataset.__getitems__(torch.arange(start, min(start + dm.eval_batch_size, len(dataset))))
                x, y, t = (v.to(module.device) for v in batch)
                correct += (module(x, t).argmax(dim=1) == y).sum()
            accuracies.append(100.0 * correct.item() / len(dataset))
    return torch.tensor(accuracies, dtype=torch.float64)
