"""Stop a member whose training diverged before anything computed from it is saved.

Lightning has no such guard (``Trainer(terminate_on_nan=...)`` was removed in 1.7;
``EarlyStopping(check_finite=True)`` only watches a validation metric, after the bad weights
were evaluated and possibly checkpointed; ``detect_anomaly`` slows every step down). A NaN or
infinite loss in a continual-learning run otherwise goes on silently for all remaining tasks,
writes garbage rows into the accuracy matrix and overwrites ``last.ckpt`` with NaN weights.

In a population each member is checked on its own: a member that diverges is stopped (frozen, its
accuracy matrix kept up to its last good task) and the others train on; the run stops when every
member has.
"""

from __future__ import annotations

from typing import Any

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from cl_lightning.errors import ConfigError, TrainingDivergedError
from cl_lightning.rundir import FAILED_MARKER, local_run_dir, trainer_member_dirs, write_atomically

#: "No non-finite loss" as the position of the first bad batch.
_NONE = torch.iinfo(torch.int64).max


class FiniteGuard(Callback):
    """Stops each population member at its first non-finite training loss or non-finite weights.

    Each batch only keeps a reference to its (detached) ``[N]`` member losses and its (epoch, batch,
    global step): no device work and no waiting per step. The kept losses are read at once (one
    host-device synchronisation) every ``check_every_n_batches`` batches and before anything is
    made from the weights: before each validation during ``fit``, before every checkpoint, at each
    epoch end. The weights are checked there too, which catches a divergence that no training loss
    shows, e.g. a method's end-of-task update (MC-SGD's consolidation).

    A member that fails is stopped (``ContinualModule.stop_members``: lr 0 and no loss from then
    on) with a warning naming the task, epoch, batch and global step of its first bad loss; its
    accuracy matrix keeps the tasks it completed, and the other members go on. When every member
    has failed (a plain run's one member) it raises :class:`~cl_lightning.errors.TrainingDivergedError`
    instead; since it raises before the checkpoint is written (and before the evaluation of the task's
    accuracy-matrix row), the last checkpoint on disk and the accuracy matrix files are those of the
    last good state.

    Multi-process runs: every process checks at the same batches, and the position of each member's
    first bad batch is the minimum over processes, so all processes stop the same members together.

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
        self._losses: list[Tensor] = []  # their [N] member losses, detached, where they were computed

    # ------------------------------------------------------------------ recording
    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        losses = outputs.get("member_losses") if isinstance(outputs, dict) else None
        if not isinstance(losses, Tensor):  # the step was skipped (training_step returned None)
            return
        self._losses.append(losses.detach())
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
        """Stop the members with a non-finite recorded loss (or, with ``weights``, a non-finite weight);
        raise :class:`TrainingDivergedError` if that leaves none. Then start a new record. Every
        process must call it at the same point."""
        device = pl_module.device
        running = ~pl_module.failed
        first = torch.full((pl_module.size,), _NONE, dtype=torch.int64, device=device)
        if self._losses:
            bad = ~torch.isfinite(torch.stack(self._losses).to(device)) & running  # [batches, N]
            first = torch.where(bad.any(dim=0), bad.to(torch.int64).argmax(dim=0), first)  # argmax: the first True
        first_everywhere = trainer.strategy.reduce(first.clone(), reduce_op="min")
        bad_weights = torch.zeros(pl_module.size, dtype=torch.int64, device=device)
        if weights:
            finite = torch.stack([torch.isfinite(p).flatten(1).all(dim=1) for p in pl_module.parameters()]).all(dim=0)
            bad_weights = trainer.strategy.reduce((~finite & running).to(torch.int64), reduce_op="max")
        positions, local, weights_bad = first_everywhere.tolist(), first.tolist(), bad_weights.tolist()
        messages: dict[int, tuple[str, str]] = {}
        for k in range(pl_module.size):
            if positions[k] != _NONE:
                messages[k] = self._loss_message(trainer, positions[k], k, local=local[k] == positions[k])
            elif weights_bad[k]:
                messages[k] = self._weights_message(trainer)
        self._reset()
        if not messages:
            return
        stopped = torch.zeros(pl_module.size, dtype=torch.bool)
        stopped[list(messages)] = True
        if bool((pl_module.failed.cpu() | stopped).all()):
            raise TrainingDivergedError(self._who(pl_module, messages, f"Training stopped; {self._kept(trainer)}"))
        pl_module.stop_members(stopped)
        rank_zero_warn(self._who(pl_module, messages, "This member is stopped; the others train on, and its accuracy "
                                 "matrix keeps the tasks it completed."))
        if trainer.is_global_zero:  # the reason in each stopped member's folder, where a failed plain run has its own
            folders = trainer_member_dirs(trainer, local_run_dir(trainer))
            for k in messages:
                folders[k].mkdir(parents=True, exist_ok=True)
            write_atomically({folders[k] / FAILED_MARKER: f"error: {' '.join(filter(None, message))}\n"
                              for k, message in messages.items()})

    @staticmethod
    def _who(pl_module: LightningModule, messages: dict[int, tuple[str, str]], outcome: str) -> str:
        """One message: what happened to each member, then ``outcome``, then the usual fixes."""
        fixes = " ".join(dict.fromkeys(fix for _, fix in messages.values() if fix))
        if pl_module.size == 1:
            events = messages[0][0]
        else:
            events = " ".join(f"Member {k} (seed {pl_module.seeds[k]}): {event}" for k, (event, _) in messages.items())
        return " ".join(filter(None, [events, outcome, fixes]))

    # ------------------------------------------------------------------ messages
    def _loss_message(self, trainer: Trainer, position: int, member: int, local: bool) -> tuple[str, str]:
        """(what happened, the usual fixes) for a member whose loss at recorded ``position`` is not finite."""
        epoch, batch_idx, step = self._batches[position]
        task = trainer.datamodule.task_of_epoch(epoch) + 1
        value = f" ({float(self._losses[position][member])})" if local else ""
        return (
            f"the training loss is not finite{value} at task {task}, epoch {epoch}, batch {batch_idx} (global step {step}).",
            "Usual fixes: a lower learning rate (model.lr, or model.lr_decay if later tasks diverge) or gradient clipping "
            "(--trainer.gradient_clip_val 1.0).",
        )

    def _weights_message(self, trainer: Trainer) -> tuple[str, str]:
        task = trainer.datamodule.task_of_epoch(trainer.current_epoch) + 1
        return (
            f"the weights are not finite at task {task}, epoch {trainer.current_epoch} (global step "
            f"{trainer.global_step}), although every training loss was finite: the last optimizer step or the "
            f"method's end-of-task update (e.g. MC-SGD's consolidation: lower its lr) diverged.",
            "",
        )

    @staticmethod
    def _kept(trainer: Trainer) -> str:
        callback = trainer.checkpoint_callback
        last = (callback.last_model_path or callback.best_model_path) if callback is not None else ""
        last = last or trainer.ckpt_path
        if last:
            return f"the last good checkpoint ({last}) and the accuracy matrix files of the earlier tasks are kept."
        return "no checkpoint had been written yet."
