"""Loss and accuracy of a population on chosen tasks, outside Lightning's evaluation loop.

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
    """``[N, len(tasks)]`` mean cross-entropy and accuracy (%) of each member of ``module`` on each of
    ``tasks`` (evaluated in eval mode, in batches of ``dm.eval_batch_size``, as the accuracy matrix:
    it matters for batch-statistics BatchNorm). One read from the device at the end."""
    losses, correct, sizes = [], [], []
    with eval_mode(module):
        for task in tasks:
            dataset = dm.task_set(task, split)
            loss = torch.zeros(dm.size, dtype=torch.float64, device=module.device)
            hits = torch.zeros(dm.size, dtype=torch.long, device=module.device)
            for start in range(0, len(dataset), dm.eval_batch_size):
                x, y, t = (v.to(module.device) for v in dataset.batch(start, start + dm.eval_batch_size))
                logits = module(x, t)
                loss += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y).sum(dim=1)
                hits += (logits.argmax(dim=2) == y).sum(dim=1)
            losses.append(loss)
            correct.append(hits)
            sizes.append(len(dataset))
    n = torch.tensor(sizes, dtype=torch.float64)
    return (torch.stack(losses, dim=1).cpu() / n), (100.0 * torch.stack(correct, dim=1).cpu().double() / n)


def task_accuracies(module: LightningModule, dm: ContinualDataModule, tasks: list[int], split: str) -> Tensor:
    """``[N, len(tasks)]`` accuracy (%) of each member of ``module`` on each of ``tasks`` (eval mode)."""
    return task_metrics(module, dm, tasks, split)[1]
