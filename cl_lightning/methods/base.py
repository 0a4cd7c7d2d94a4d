"""The contract of a continual-learning method: task-boundary events and everything populations need.

A method is a Lightning callback. :class:`TaskAwareCallback` gives it the two events of a task
sequence trained in one ``fit``; :class:`Method` adds what every method needs because a run trains
a population of N members (``models/population.py``: a plain run is a population of one), so that a
method's author writes the method's math on ``[N, ...]`` tensors and nothing else:

- **per-member settings**: a constructor parameter annotated ``PerMember[T]`` may take one value
  per member; the method passes it to ``Method.__init__``, which checks it, and :meth:`Method.settings`
  expands it to ``[N]`` (the command line, sweeps and HParams find it by its annotation);
- **state**: :meth:`Method.method_state` / :meth:`Method.load_method_state` are the checkpointed
  state; a state loaded before the population exists (before ``setup``) is applied right after
  :meth:`Method.setup_population` built it;
- **logging**: :meth:`Method.log_members` writes each member's values into its own logger, skipping
  members the divergence guard stopped, with no special case for N = 1;
- **stopped members**: ``pl_module.failed`` (``[N]`` bool); ``pl_module.loss`` already leaves them out,
  and :meth:`Method.stop_diverged` runs the run's divergence check on demand (before a method writes
  results computed from the weights);
- **class masks**: ``pl_module.task_mask(task_ids)`` masks each example's logits to its task's classes
  (split benchmarks).

Every subclass of :class:`Method` is a method wherever a run's method is looked for (checkpoint
checks, sweeps, HParams, ``report``): :func:`cl_lightning.methods.registry.method_callbacks`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from cl_lightning.callbacks.guards import FiniteGuard
from cl_lightning.member_outputs import log_members
from cl_lightning.models.member_settings import member_list, member_values, per_member_settings
from cl_lightning.rundir import run_dir, trainer_member_dirs


class TaskAwareCallback(Callback):
    """A callback with ``on_task_start`` / ``on_task_end`` events.

    The whole task sequence runs in one ``fit`` (task t owns epochs [t*E, (t+1)*E)), so task
    boundaries are epoch boundaries known to the datamodule:

    - ``on_task_start`` fires from ``on_train_epoch_start`` of a task's first epoch. Lightning
      does not replay that hook when it resumes in the middle of an epoch, so the event fires
      once per task across a resume.
    - ``on_task_end`` fires from ``on_train_batch_end`` of the task's last training batch, i.e.
      *before* that epoch's validation and checkpoint: the evaluated and saved model is the one
      the method keeps after the task (for MC-SGD, w_bar_t). ``on_train_epoch_end`` would be too
      late: Lightning validates before it.

    Subclasses that override ``on_train_epoch_start`` or ``on_train_batch_end`` must call
    ``super()``.
    """

    def on_task_start(self, trainer: Trainer, pl_module: LightningModule, task: int) -> None:
        """Called before the first training batch of ``task`` (0-based)."""

    def on_task_end(self, trainer: Trainer, pl_module: LightningModule, task: int) -> None:
        """Called after the last training batch of ``task`` (0-based), before its evaluation."""

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        if dm.is_task_start(trainer.current_epoch):
            self.on_task_start(trainer, pl_module, dm.task_of_epoch(trainer.current_epoch))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        dm = trainer.datamodule
        if batch_idx + 1 == trainer.num_training_batches and dm.is_task_end(trainer.current_epoch):
            self.on_task_end(trainer, pl_module, dm.task_of_epoch(trainer.current_epoch))


class Method(TaskAwareCallback):
    """Base class of every continual-learning method (see the module docstring for the contract).

    A subclass passes its per-member settings (the parameters it annotates ``PerMember[T]``) to
    ``super().__init__(name=value, ...)``; builds its ``[N, ...]`` state in
    :meth:`setup_population`; keeps its checkpointed state in :meth:`method_state` /
    :meth:`load_method_state`; and logs through :meth:`log_members`. It does not override
    ``setup``, ``state_dict`` or ``load_state_dict``.
    """

    def __init__(self, **member_settings: float | Sequence[float]) -> None:
        declared = per_member_settings(type(self))
        if set(member_settings) != set(declared):
            raise TypeError(f"{type(self).__name__} declares the per-member settings {sorted(declared)} (annotated "
                            f"PerMember[...]) but passed {sorted(member_settings)} to Method.__init__")
        for name, value in member_settings.items():
            member_list(value, name, declared[name])
            setattr(self, name, value)
        self._restored: dict[str, Any] | None = None  # a state loaded before `setup`
        self._population_ready = False
        self._on_device: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ per-member settings
    def check_settings(self, n: int) -> None:
        """Refuse a per-member setting whose list does not have one value per member of ``n``."""
        self.settings(n)

    def settings(self, n: int) -> dict[str, Tensor]:
        """Each per-member setting of the ``n`` members, float64 ``[n]`` on the CPU."""
        return {name: member_values(getattr(self, name), n, name) for name in per_member_settings(type(self))}

    def on_device(self, key: str, like: Tensor, values: Callable[[int], Tensor]) -> Tensor:
        """``[N]``: the float64 ``values(N)`` for the N members of ``like`` (``[N, ...]``), rounded to its
        dtype on its device (once, as torch's kernels round a Python float setting), kept under ``key``
        until N, the device or the dtype changes: no copy per step."""
        cached = self._on_device.get(key)
        if cached is None or cached.device != like.device or cached.dtype != like.dtype or len(cached) != like.shape[0]:
            cached = self._on_device[key] = values(like.shape[0]).to(device=like.device, dtype=like.dtype)
        return cached

    # ------------------------------------------------------------------ population and state
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.check_settings(trainer.datamodule.size)
        self.setup_population(trainer, pl_module, stage)
        self._population_ready = True
        if self._restored is not None:
            self.load_method_state(self._restored)
            self._restored = None

    def setup_population(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Build the method's ``[N, ...]`` state for the run's population (``trainer.datamodule.seeds``
        is known here). Runs before a checkpoint's state is loaded."""

    def method_state(self) -> dict[str, Any]:
        """The state a checkpoint keeps: tensors (on the CPU), numbers, strings, lists and dicts of
        them (it is read back with ``weights_only=True``)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`method_state`'s output, after :meth:`setup_population`."""

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.method_state()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._population_ready:
            self.load_method_state(state_dict)
        else:  # loaded before `setup`: applied there, once the population is known
            self._restored = state_dict

    # ------------------------------------------------------------------ logging and stopped members
    @staticmethod
    def log_members(trainer: Trainer, pl_module: LightningModule, values: Mapping[str, Tensor | Sequence[float]],
                    step: int) -> None:
        """Log ``values`` (name -> ``[N]``, one value per member) at ``step``, member k's into member k's
        logger (the run's own for a population of one), except the members the guard stopped (their
        values are not results). Reads each tensor once (a host sync: not on every step)."""
        rows = {name: v.detach().cpu().tolist() if isinstance(v, Tensor) else list(v) for name, v in values.items()}
        failed = pl_module.failed.tolist()
        log_members(trainer, [{} if failed[k] else {name: row[k] for name, row in rows.items()}
                              for k in range(len(failed))], step)

    @staticmethod
    def is_logging_step(trainer: Trainer) -> bool:
        """Whether this training step's values are written (every ``log_every_n_steps``): logging costs
        about as much as a small MLP's step, so per-step values are logged only then."""
        return (trainer.global_step + 1) % max(trainer.log_every_n_steps, 1) == 0

    @staticmethod
    def member_dirs(trainer: Trainer) -> list[Path]:
        """Each member's folder (a population of one: the run folder), where a method writes its files."""
        return trainer_member_dirs(trainer, run_dir(trainer))

    @staticmethod
    def stop_diverged(trainer: Trainer, pl_module: LightningModule) -> Tensor:
        """Run the run's divergence check now and return which members are stopped (``[N]`` bool, CPU).

        A method calls it before it writes results computed from the weights (MC-SGD's w_hat row at a
        task end): a member whose training or end-of-task update diverged is stopped first, and the
        whole run stops (``TrainingDivergedError``) if that leaves no member. Every process must call it
        at the same point (the check is collective)."""
        for guard in trainer.callbacks:
            if isinstance(guard, FiniteGuard):
                guard.check(trainer, pl_module)
        return pl_module.failed.cpu()
