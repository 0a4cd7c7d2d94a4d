"""Stop a run whose training diverged before anything computed from it is saved.

Lightning has no such guard (``Trainer(terminate_on_nan=...)`` was removed in 1.7;
``EarlyStopping(check_finite=True)`` only watches a validation metric, after the bad weights
were evaluated and possibly checkpointed; ``detect_anomaly`` slows every step down). A NaN or
infinite loss in a continual-learning run otherwise goes on silently for all remaining tasks,
writes garbage rows into the accuracy matrix and overwrites ``last.ckpt`` with NaN weights.
"""

from __future__ import annotations

from typing import Any

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from typing_extensions import override

from cl_lightning.errors import ConfigError, TrainingDivergedError

#: "No non-finite loss" as the position of the first bad batch.
_NONE = torch.iinfo(torch.int64).max


class FiniteGuard(Callback):
    """Stops training at the first non-finite training loss or non-finite weights.

    Each batch only keeps a reference to its (detached) loss and its (epoch, batch, global step):
    no device work and no waiting per step. The kept losses are read at once (one host-device
    synchronisation) every ``check_every_n_batches`` batches and before anything is
    made from the weights: before each validation during ``fit``, before every checkpoint, at each
    epoch end. The weights are checked there too, which catches a divergence that no training loss
    shows, e.g. a method's end-of-task update (MC-SGD's consolidation). On a failure it raises
    :class:`~cl_lightning.errors.TrainingDivergedError` naming the task, epoch, batch and global
    step of the first bad loss; since it raises before the checkpoint is written (and before the
    evaluation of the task's accuracy-matrix row), the last checkpoint on disk and the accuracy
    matrix files are those of the last good state.

    Multi-process runs: every process checks at the same batches, and the position of the first
    bad batch is the minimum over processes, so all processes stop together with one message.

    Args:
        check_every_n_batches: Batches between two reads of the record. Larger is cheaper on
            accelerators (the read waits for the device); the stop is never later than the next
            validation or checkpoint, whatever the value.
    """

    def __init__(self, check_every_n_batches: PositiveInt = 100) -> None:
        if check_every_n_batches < 1:
            raise ConfigError(f"check_every_n_batches must be a positive integer, got {check_every_n_batches}")
        self.check_every_n_batches = int(check_every_n_batches)
        self._reset()

    def _reset(self) -> None:
        self._batches: list[tuple[int, int, int]] = []  # (epoch, batch_idx, global_step) since the last check
        self._losses: list[Tensor] = []  # their training losses, detached, where they were computed

    # ------------------------------------------------------------------ recording
    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, Tensor):  # the step was skipped (training_step returned None)
            return
        self._losses.append(loss.detach())
        self._batches.append((trainer.current_epoch, batch_idx, trainer.global_step))
        if len(self._batches) >= self.check_every_n_batches:
            self.check(trainer, pl_module, weights=False)

    # ------------------------------------------------------------------ checking
    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.check(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check(trainer, pl_module)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Runs while the checkpoint is assembled, before it is written: raising keeps the old file.
        if trainer.state.fn == TrainerFn.FITTING:
            self.check(trainer, pl_module)

    def check(self, trainer: Trainer, pl_module: LightningModule, weights: bool = True) -> None:
        """Raise :class:`TrainingDivergedError` if a recorded loss (or, with ``weights``, a weight)
        is not finite; otherwise start a new record. Every process must call it at the same point."""
        device = pl_module.device
        first = torch.full((), _NONE, dtype=torch.int64, device=device)
        if self._losses:
            bad = ~torch.isfinite(torch.stack(self._losses).to(device))
            first = torch.where(bad.any(), bad.to(torch.int64).argmax(), first)  # argmax: the first True
        first_everywhere = trainer.strategy.reduce(first.clone(), reduce_op="min")
        bad_weights = torch.zeros((), dtype=torch.int64, device=device)
        if weights:
            finite = torch.stack([torch.isfinite(p).all() for p in pl_module.parameters()]).all()
            bad_weights = trainer.strategy.reduce((~finite).to(torch.int64), reduce_op="max")
        position = int(first_everywhere)
        if position != _NONE:
            raise TrainingDivergedError(self._loss_message(trainer, position, local=int(first) == position))
        if int(bad_weights):
            raise TrainingDivergedError(self._weights_message(trainer))
        self._reset()

    # ------------------------------------------------------------------ messages
    def _loss_message(self, trainer: Trainer, position: int, local: bool) -> str:
        epoch, batch_idx, step = self._batches[position]
        task = trainer.datamodule.task_of_epoch(epoch) + 1
        value = f" ({float(self._losses[position])})" if local else ""
        return (
            f"the training loss is not finite{value} at task {task}, epoch {epoch}, batch {batch_idx} "
            f"(global step {step}). Training stopped; {self._kept(trainer)} Usual fixes: a lower learning rate "
            "(model.lr, or model.lr_decay if later tasks diverge) or gradient clipping (--trainer.gradient_clip_val 1.0)."
        )

    def _weights_message(self, trainer: Trainer) -> str:
        task = trainer.datamodule.task_of_epoch(trainer.current_epoch) + 1
        return (
            f"the weights are not finite at task {task}, epoch {trainer.current_epoch} (global step "
            f"{trainer.global_step}), although every training loss was finite: the last optimizer step or the "
            f"method's end-of-task update (e.g. MC-SGD's consolidation: lower its lr) diverged. Training stopped; "
            f"{self._kept(trainer)}"
        )

    @staticmethod
    def _kept(trainer: Trainer) -> str:
        callback = trainer.checkpoint_callback
        last = (callback.last_model_path or callback.best_model_path) if callback is not None else ""
        last = last or trainer.ckpt_path
        if last:
            return f"the last good checkpoint ({last}) and the accuracy matrix files of the earlier tasks are kept."
        return "no checkpoint had been written yet."
