"""ER-Reservoir: experience replay from a reservoir-sampled memory (Chaudhry et al., "On Tiny
Episodic Memories in Continual Learning", 2019), a baseline of the MC-SGD paper's Table 1.

At every training step the model also learns from a batch drawn from a small memory of past
examples, and the memory is a uniform sample (reservoir sampling) of the whole stream of
training examples seen so far: it needs no task boundaries.

How it plugs into Lightning without touching the LightningModule: the gradient of a sum of
losses is the sum of their gradients, so after Lightning's backward of the current batch's
loss (``on_after_backward``) the callback backpropagates the memory batch's loss into the same
``.grad``; the optimizer step then follows L(current batch) + L(memory batch). The current
batch enters the reservoir after the step (``on_train_batch_end``), so a batch is never replayed
in its own step.

Differences from the A-GEM code the paper's ER numbers came from, on purpose: that code trained
on the concatenation of the two batches (one mean over both, so each part weighted by its
size, and one BatchNorm statistic over both); here each loss is its own batch mean and the
memory batch is a forward pass of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from cl_lightning.data.datamodule import Batch
from cl_lightning.errors import ConfigError
from cl_lightning.methods.base import TaskAwareCallback
from cl_lightning.methods.reservoir import ReservoirBuffer
from cl_lightning.seeding import generator


class ER(TaskAwareCallback):
    """Experience replay with a reservoir memory.

    Each training step, once the memory holds examples, adds the gradient of the cross-entropy
    on ``memory_batch_size`` examples drawn from the memory (uniformly, without replacement) to
    the current batch's gradient, then offers the current batch to the reservoir. Replay starts
    with the first task's own examples as soon as the memory is non-empty (Chaudhry et al.'s
    algorithm; the memory has no task boundaries). With several epochs per task, every epoch's
    pass is part of the stream.

    Every random choice (which examples are kept, which are replayed) comes from the run's seed
    through two generators whose states are in the checkpoint, so a resumed run replays what
    the uninterrupted one would have. The memory loss runs through the module's forward (task
    masking included) in training mode (dropout on), under the Trainer's precision.

    Multi-process runs (DDP): each process trains on its own shard of every batch, so before
    inserting, the callback gathers the batch from all processes (rank order) and every process
    inserts the same global batch with the same generator: the memories stay identical and the
    reservoir samples the global stream. The memory batch is then the same on every process and
    so is its gradient (computed on the same weights; dropout masks agree too, since the module
    re-seeds every process's RNG identically each epoch), so the summed gradients stay
    identical without an extra all-reduce. The cost is one all-gather of the batch per step.
    Processes must see batches of equal size (Lightning's ``DistributedSampler`` ensures it).

    Args:
        memory_size: Total number of examples the memory keeps, over all tasks (A-GEM code:
            1 per class per task, e.g. 10 classes x 20 tasks = 200 on MNIST).
        memory_batch_size: Examples replayed per training step (all of the memory while it
            holds fewer). A-GEM code: 64 on MNIST, 256 on CIFAR.
    """

    def __init__(self, memory_size: PositiveInt = 200, memory_batch_size: PositiveInt = 64) -> None:
        if memory_size is None or memory_size < 1:
            raise ConfigError(f"ER needs a memory: memory_size must be at least 1, got {memory_size!r}")
        if memory_batch_size is None or memory_batch_size < 1:
            raise ConfigError(f"ER replays at least one example per step: memory_batch_size must be at least 1, "
                              f"got {memory_batch_size!r}")
        self.memory_size = int(memory_size)
        self.memory_batch_size = int(memory_batch_size)
        self.buffer: ReservoirBuffer | None = None
        self.sampler: torch.Generator | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Created once (a later fit/test with the same callback keeps the memory); a checkpoint
        # is loaded after `setup` and overwrites both.
        if self.buffer is None:
            seed = trainer.datamodule.resolved_seed
            self.buffer = ReservoirBuffer(self.memory_size, generator(seed, "er_reservoir"))
            self.sampler = generator(seed, "er_sample")

    # ------------------------------------------------------------------ training
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Add the gradient of the memory batch's loss to the current batch's gradient."""
        if len(self.buffer) == 0:
            return
        batch = self.buffer.to(pl_module.device).sample(self.memory_batch_size, self.sampler)
        with torch.inference_mode(False), torch.enable_grad():
            with trainer.precision_plugin.forward_context():
                loss = pl_module.loss(batch)
            pl_module.log("er/memory_loss", loss.detach())
            # Lightning divides the training loss by the accumulation steps and scales it for
            # fp16 (the scaler unscales every .grad before the step): the memory loss likewise.
            loss = loss / trainer.accumulate_grad_batches
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if scaler is not None:
                loss = scaler.scale(loss)
            loss.backward()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Batch, batch_idx: int
    ) -> None:
        x, y, task = self._global_batch(trainer, batch)
        self.buffer.to(pl_module.device).add(x.detach(), y, task)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @staticmethod
    def _global_batch(trainer: Trainer, batch: Batch) -> Batch:
        """The batch of every process, concatenated in rank order (the local batch on one process)."""
        if trainer.world_size == 1:
            return batch
        return tuple(trainer.strategy.all_gather(t).flatten(0, 1) for t in batch)

    # ------------------------------------------------------------------ reporting
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule, task: int) -> None:
        self._publish(trainer, task)

    @rank_zero_only
    def _publish(self, trainer: Trainer, task: int) -> None:
        """Once per task: how much of the memory each task holds (a host sync here is fine)."""
        if trainer.logger is None or len(self.buffer) == 0:
            return
        share = self.shares(trainer.datamodule.num_tasks)
        metrics = {f"er/memory_share/task_{i + 1:02d}": v for i, v in enumerate(share[: task + 1].tolist())}
        metrics["er/examples_seen"] = float(self.buffer.seen)
        trainer.logger.log_metrics(metrics, step=task + 1)

    def shares(self, num_tasks: int) -> Tensor:
        """Fraction of the memory held by each task (CPU)."""
        _, _, task = self.buffer.examples()
        return torch.bincount(task.cpu(), minlength=num_tasks).double() / len(self.buffer)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict() if self.buffer is not None else None,
                "sampler": self.sampler.get_state() if self.sampler is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["buffer"] is None:
            return
        if self.buffer is None:  # loaded before `setup`: the states below replace the seeds anyway
            self.buffer, self.sampler = ReservoirBuffer(self.memory_size), torch.Generator()
        self.buffer.load_state_dict(state_dict["buffer"])
        self.sampler.set_state(state_dict["sampler"])
