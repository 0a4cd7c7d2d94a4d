"""ER-Reservoir: experience replay from a reservoir-sampled memory (Chaudhry et al., "On Tiny
Episodic Memories in Continual Learning", 2019), a baseline of the MC-SGD paper's Table 1.

At every training step the model learns from the current batch joined with a batch drawn from
a small memory of past examples, and the memory is a uniform sample (reservoir sampling) of
the whole stream of training examples seen so far: it needs no task boundaries.

The loss, as in the code the paper's ER numbers came from, is **one mean cross-entropy over
the concatenation** of the memory batch and the current batch:

- facebookresearch/agem 4542149, ``fc_permute_mnist.py`` lines 338-354: ``er_train_x_batch =
  np.concatenate((episodic_images[er_mem_indices], train_x[offset:offset+residual]))`` and one
  ``model.train`` step on it, whose loss is ``tf.reduce_mean`` of the cross-entropy over the fed
  batch (``model/model.py`` lines 244-245); on split CIFAR (``conv_split_cifar.py`` lines
  463-486; ``model/model.py`` lines 217-225, 878-879) the per-example task-masked cross-entropies
  are summed and divided by the joined batch size;
- the same code in the fork the Stable-SGD/MC-SGD authors ran (imirzadeh/stable-continual-learning
  be4049c, ``external_libs/continual_learning_algorithms/fc_mnist.py`` lines 346-362).

A run is a population of N members (``models/population.py``); member k is the solo run with
seed k, so everything above holds per member: member k's joined batch is its own ``B`` current
and ``M`` replayed examples (``[N, B + M]`` for the population), its loss the mean over them, and
the population backpropagates the sum over members of these means, so member k's slice of every
gradient is its own joined-batch gradient. ``B`` and ``M`` are the same for every member (equal
batch sizes, equally long streams), so the weights below are scalars.

How it plugs into Lightning without touching the LightningModule: the gradient of the joined
mean is ``B/(B+M) grad(current mean) + M/(B+M) grad(memory mean)``. Lightning backpropagates the
current batch's loss; a hook on that loss (``on_before_backward``) scales its gradient by
``B/(B+M)``, and ``on_after_backward`` backpropagates ``M/(B+M)`` times the memory batch's loss
into the same ``.grad``. Both parts pass through Lightning's division by the accumulation steps
and the fp16 loss scale, so every micro-batch of an accumulation window contributes its own
joined-batch gradient. The current batch enters the reservoir after the step
(``on_train_batch_end``), so a batch is never replayed in its own step.

This equals the reference step exactly for networks whose output for an example does not
depend on the rest of the batch (the MLPs of every MNIST config). With ``ResNet18`` in training
mode BatchNorm normalises the current batch and the memory batch each with its own statistics,
where the reference normalised the joined batch with one; with ``bn_stats="running"`` the running
averages are also updated twice per step (current batch, then memory batch) instead of once with
the joined batch's statistics. Exact there needs the memory concatenated into the batch before
the module's forward, which a callback cannot do (batches are tuples, and Lightning has no
callback hook that replaces the batch).
"""

from __future__ import annotations

from typing import Any

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from cl_lightning.data.members import Batch
from cl_lightning.methods.base import Method
from cl_lightning.methods.reservoir import ReservoirBuffer, replay_sizes, step_examples
from cl_lightning.models.member_random import member_keys
from cl_lightning.models.module import total

#: Dropout stream of the memory batch's forward: masks other than the current batch's (stream 0).
REPLAY_STREAM = 1


class ER(Method):
    """Experience replay with a reservoir memory, for every member of the population.

    Each training step, once the memory holds examples, trains each member on the mean
    cross-entropy over its current batch joined with ``memory_batch_size`` examples drawn from
    its memory (uniformly, without replacement; all of it while it holds fewer), then offers the
    current batch to the reservoir. Replay starts with the first task's own examples as soon as
    the memory is non-empty (Chaudhry et al.'s algorithm; the memory has no task boundaries). With
    several epochs per task, every epoch's pass is part of the stream.

    Every random choice (which examples are kept, which are replayed) of member k is a hash of
    its seed's keys (``generator(seed_k, "er_reservoir")``, ``(seed_k, "er_sample")``) and of the
    stream position (:mod:`~cl_lightning.methods.reservoir`), so member k replays what its solo
    run replays, a resumed run what the uninterrupted one would have, and a step's draws for all
    members are a few ``[N, ...]`` tensor operations. The memory holds base indices and task ids;
    the replayed batch is built from them through the training set's own path (pixel maps of the
    examples' tasks), and its loss runs through the module's forward (task masking included) in
    training mode (dropout on, masks of stream :data:`REPLAY_STREAM`), under the Trainer's
    precision.

    Multi-process runs (DDP): each process trains on its own shard of every batch, so before
    inserting, the callback gathers the batch's base indices and task ids from all processes
    (rank order) and every process inserts the same global batch: the memories stay identical and
    the reservoir samples the global stream. The memory batch is then the same on every process
    and so is its gradient (computed on the same weights, with the same counter-based dropout
    masks), so it needs no all-reduce. The weights use the global batch size ``B = world_size x
    local batch``: DDP's average of the processes' ``B/(B+M)``-scaled current gradients plus the
    common ``M/(B+M)``-scaled memory gradient is the gradient of the mean over the joined global
    batch, as one process with the whole batch would compute it. The cost is one all-gather of
    ``[N, B]`` indices per step. Processes must see batches of equal size (the population's
    training batches are padded to equal shares).

    Args:
        memory_size: Examples each member's memory keeps, over all tasks (A-GEM code: 1 per class
            per task, e.g. 10 classes x 20 tasks = 200 on MNIST).
        memory_batch_size: Examples replayed per member and training step (all of the memory
            while it holds fewer). A-GEM code: 64 on MNIST, 256 on CIFAR.
    """

    def __init__(self, memory_size: PositiveInt = 200, memory_batch_size: PositiveInt = 64) -> None:
        super().__init__()
        self.memory_size, self.memory_batch_size = replay_sizes("ER", memory_size, memory_batch_size)
        self.buffer: ReservoirBuffer | None = None
        #: ``[N]`` each member's key of the replay draws (``generator(seed_k, "er_sample")``).
        self.sample_keys: Tensor | None = None
        #: M/(B+M) of the running step: the memory's share of the joined batch (0: no replay).
        self._memory_share = 0.0

    @override
    def setup_population(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Created once (a later fit/test with the same callback keeps the memory); a checkpoint
        # is loaded after this and overwrites the buffer's contents.
        if self.buffer is None:
            seeds = trainer.datamodule.seeds
            self.buffer = ReservoirBuffer(self.memory_size, seeds)
            self.sample_keys = member_keys(seeds, "er_sample")

    # ------------------------------------------------------------------ training
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Batch, batch_idx: int) -> None:
        """The joined batch's make-up for this step: B current (global) and M replayed examples."""
        replayed = min(self.memory_batch_size, len(self.buffer))
        current = batch[0].shape[1] * trainer.world_size
        self._memory_share = replayed / (current + replayed)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        """Weight the current batch's loss by its share B/(B+M) of the joined batch."""
        if self._memory_share > 0.0:
            current_share = 1.0 - self._memory_share
            loss.register_hook(lambda grad: grad * current_share)

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Add M/(B+M) times the gradient of every member's memory-batch mean loss."""
        if self._memory_share == 0.0:
            return
        batch = self.memory_batch(trainer, pl_module)
        with torch.inference_mode(False), torch.enable_grad():
            with trainer.precision_plugin.forward_context():
                losses = pl_module.member_losses(batch, stream=REPLAY_STREAM)
            if self.is_logging_step(trainer):
                self.log_members(trainer, pl_module, {"er/memory_loss": losses}, trainer.global_step)
            # Lightning divides the training loss by the accumulation steps and scales it for
            # fp16 (the scaler unscales every .grad before the step): the memory loss likewise.
            # A member the guard stopped adds nothing (its loss may be NaN), as in the module's loss.
            loss = total(losses, pl_module.failed) * (self._memory_share / trainer.accumulate_grad_batches)
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if scaler is not None:
                loss = scaler.scale(loss)
            loss.backward()

    def memory_batch(self, trainer: Trainer, pl_module: LightningModule) -> Batch:
        """This step's replayed ``(x, y, task)`` batch, ``[N, M, ...]``: member k's draw from its memory."""
        self.sample_keys = self.sample_keys.to(pl_module.device)  # once: a no-op when there
        slots = self.buffer.to(pl_module.device).sample(self.memory_batch_size, self.sample_keys)
        return self.buffer.batch(trainer.train_dataloader.dataset, slots)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Batch, batch_idx: int
    ) -> None:
        index, task = step_examples(trainer, batch, batch_idx)
        self.buffer.to(pl_module.device).add(index, task)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # ------------------------------------------------------------------ reporting
    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule, task: int) -> None:
        """Once per task: how much of each member's memory each task holds (a host sync here is fine)."""
        if len(self.buffer) == 0:
            return
        shares = self.shares(trainer.datamodule.num_tasks)
        values = {f"er/memory_share/task_{i + 1:02d}": shares[:, i] for i in range(task + 1)}
        values["er/examples_seen"] = [float(self.buffer.seen)] * self.buffer.size
        self.log_members(trainer, pl_module, values, task + 1)

    def shares(self, num_tasks: int) -> Tensor:
        """``[N, num_tasks]``: fraction of each member's memory held by each task (CPU)."""
        _, task = self.buffer.examples()
        counts = torch.zeros(self.buffer.size, num_tasks, dtype=torch.float64)
        return counts.scatter_add_(1, task.cpu(), torch.ones(task.shape, dtype=torch.float64)) / len(self.buffer)

    # ------------------------------------------------------------------ checkpoint
    @override
    def method_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict() if self.buffer is not None else None}

    @override
    def load_method_state(self, state: dict[str, Any]) -> None:
        if state["buffer"] is not None:
            self.buffer.load_state_dict(state["buffer"])
