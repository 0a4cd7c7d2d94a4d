"""Loss and accuracy of a model on chosen tasks, outside Lightning's evaluation loop.

For models that are not the one being trained (MC-SGD's w_hat chain, points on a linear path):
the whole evaluation set of each task is run on every process, so no synchronisation is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.models.params import eval_mode


@torch.inference_mode()
def task_metrics(module: LightningModule, dm: ContinualDataModule, tasks: list[int], split: str) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and accuracy (%) of ``module`` on each of ``tasks`` (evaluated in eval mode,
    in batches of ``dm.eval_batch_size``, as the accuracy matrix: it matters for batch-statistics BatchNorm)."""
    losses, accuracies = [], []
    with eval_mode(module):
        for task in tasks:
            dataset = dm.task_dataset(task, split)
            loss = torch.zeros((), dtype=torch.float64, device=module.device)
            correct = torch.zeros((), dtype=torch.long, device=module.device)
            for start in range(0, len(dataset), dm.eval_batch_size):
                batch = dataset.__getitems__(torch.arange(start, min(start + dm.eval_batch_size, len(dataset))))
                x, y, t = (v.to(module.device) for v in batch)
                logits = module(x, t)
                loss += F.cross_entropy(logits, y, reduction="sum")
                correct += (logits.argmax(dim=1) == y).sum()
            losses.append(loss.item() / len(dataset))
            accuracies.append(100.0 * correct.item() / len(dataset))
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(accuracies, dtype=torch.float64)


def task_accuracies(module: LightningModule, dm: ContinualDataModule, tasks: list[int], split: str) -> Tensor:
    """Accuracy (%) of ``module`` on each of ``tasks`` (evaluated in eval mode)."""
    return task_metrics(module, dm, tasks, split)[1]
