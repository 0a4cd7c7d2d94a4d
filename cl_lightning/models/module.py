"""The LightningModule shared by every method: a network, cross-entropy, per-task accuracy and
the paper's per-task SGD. Continual-learning methods are callbacks and never branch in here.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveFloat
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from typing_extensions import override

from cl_lightning.metrics.task_accuracy import TaskAccuracy, accuracy_key
from cl_lightning.models.nets import MLP, ResNet18
from cl_lightning.seeding import generator

#: Logit given to classes outside the task (split benchmarks), as the research code (-10e10).
MASKED_LOGIT = -1e11


def mask_logits(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Give the classes outside each example's task (``mask`` False) the logit ``MASKED_LOGIT``:
    zero probability and zero gradient. ``mask`` broadcasts against ``logits``; None: no mask."""
    return logits if mask is None else logits.masked_fill(~mask, MASKED_LOGIT)


class TaskLRFactor:
    """Learning-rate factor of epoch e: max(floor, lr * decay^(t-1)) / lr for its task t.

    A picklable callable so that ``LambdaLR`` can be checkpointed and resumed.
    """

    def __init__(self, lr: float, decay: float, floor: float, epochs_per_task: int) -> None:
        self.lr, self.decay, self.floor, self.epochs_per_task = lr, decay, floor, epochs_per_task

    def __call__(self, epoch: int) -> float:
        task = epoch // self.epochs_per_task
        return max(self.floor, self.lr * self.decay**task) / self.lr


class ContinualModule(LightningModule):
    """Network + loss + per-task evaluation for a task sequence.

    Args:
        net: The network, ``cl_lightning.models.nets.MLP`` or ``...nets.ResNet18`` (the paper's); it
            maps images to logits over all classes. Typed with these two so that the command line
            offers them, not every ``torch.nn.Module``; a new network joins the union (or
            subclasses one of them).
        lr: SGD learning rate of task 1.
        momentum: SGD momentum. The momentum buffer is cleared at each task start, as the paper's
            code re-created the optimizer for every task.
        lr_decay: Per-task decay: task t trains with max(lr_floor, lr * lr_decay^(t-1)).
        lr_floor: Lowest learning rate of the per-task decay.
        weight_decay: SGD weight decay (the paper used none).
    """

    def __init__(
        self,
        net: MLP | ResNet18,
        lr: PositiveFloat = 0.1,
        momentum: NonNegativeFloat = 0.8,
        lr_decay: PositiveFloat = 1.0,
        lr_floor: NonNegativeFloat = 0.0005,
        weight_decay: NonNegativeFloat = 0.0,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters()
        if isinstance(self.hparams.get("net"), nn.Module):
            # Built in Python rather than from a config: the weights are in the state_dict and a
            # module object in the hparams would not load with `weights_only=True`. (LightningCLI
            # records the net's class_path/init_args here instead, which is what we keep.)
            del self.hparams["net"]
        self.net = net
        # Split benchmarks: (T, num_classes) mask of each task's classes, set in `setup` from the
        # datamodule (it depends on the seed). A non-persistent buffer follows the module's device.
        self.register_buffer("class_mask", None, persistent=False)
        self.val_accuracy: TaskAccuracy | None = None
        self.test_accuracy: TaskAccuracy | None = None

    def __setattr__(self, name: str, value) -> None:
        # Lightning records the running hook's name before every hook call, about 45 times per
        # training step. It is a plain string, so skip nn.Module's parameter/buffer/submodule
        # bookkeeping, which made these assignments ~5 % of an MLP step at batch size 10.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ wiring
    @override
    def setup(self, stage: str) -> None:
        """Take the task structure from the datamodule (it is derived from the run's seed)."""
        dm = self.trainer.datamodule
        self.class_mask = dm.class_mask
        self.val_accuracy = TaskAccuracy(dm.num_tasks)
        self.test_accuracy = TaskAccuracy(dm.num_tasks)

    @override
    def forward(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        """Logits; on split benchmarks the classes of other tasks are masked out."""
        mask = self.class_mask[task] if self.class_mask is not None and task is not None else None
        return mask_logits(self.net(x), mask)

    # ------------------------------------------------------------------ training
    def loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Mean cross-entropy of a ``(x, y, task)`` batch: the training objective, also used by
        methods that take gradients on other batches (A-GEM's reference gradient, ER's replay)."""
        x, y, task = batch
        return F.cross_entropy(self(x, task), y)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        # Only on the steps the logger writes (every `log_every_n_steps`): `self.log` costs about
        # as much as a whole MLP step at batch 10, and the other steps' values are never shown.
        if (self.global_step + 1) % max(self.trainer.log_every_n_steps, 1) == 0:
            self.log("train/loss", loss)
        return loss

    @override
    def configure_optimizers(self):
        dm = self.trainer.datamodule
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
        factor = TaskLRFactor(hp.lr, hp.lr_decay, hp.lr_floor, dm.epochs_per_task)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, factor), "interval": "epoch"}}

    @override
    def on_train_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        # Lightning checkpoints no RNG state: seeding the epoch's random draws (dropout) from
        # (seed, epoch) makes a run resumed at an epoch boundary continue exactly.
        torch.manual_seed(generator(dm.resolved_seed, "epoch", self.current_epoch).initial_seed())
        # A fresh SGD per task, as the research code: clear the momentum buffers. (Lightning does
        # not re-run this hook when resuming mid-epoch, so a restored buffer is kept then.)
        if dm.is_task_start(self.current_epoch):
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()

    # ------------------------------------------------------------------ exact resume
    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Epoch starts re-seed torch (above), but a checkpoint written in the middle of an epoch
        # (`--checkpoint.every_n_train_steps`) must also carry where the dropout stream stands.
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        if torch.cuda.is_available():
            checkpoint["cuda_rng_states"] = torch.cuda.get_rng_state_all()

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
        if "cuda_rng_states" in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng_states"])

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, metric: TaskAccuracy, batch: tuple[Tensor, Tensor, Tensor]) -> None:
        x, y, task = batch
        metric.update(self(x, task).argmax(dim=1), y, task)

    @override
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(self.val_accuracy, batch)

    @override
    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(self.test_accuracy, batch)

    def _log_task_accuracies(self, metric: TaskAccuracy, stage: str) -> None:
        # reshape: torchmetrics squeezes a one-element result (a one-task run) to a scalar
        for task, acc in enumerate(metric.compute().reshape(-1).tolist()):
            if not math.isnan(acc):
                # The metric already combined all processes, so the mean over them is the value itself.
                self.log(accuracy_key(stage, task), acc, sync_dist=True)
        metric.reset()

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_task_accuracies(self.val_accuracy, "val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_task_accuracies(self.test_accuracy, "test")
