"""A-GEM: Averaged Gradient Episodic Memory (Chaudhry, Ranzato, Rohrbach, Elhoseiny, "Efficient
Lifelong Learning with A-GEM", ICLR 2019), as a callback.

A few examples of every finished task are kept in an episodic memory. Before each optimizer step
on a later task, a reference gradient g_ref is computed on a batch drawn from the memory; if the
current gradient g would increase the memory loss (g . g_ref < 0), it is projected onto the
half-space where it does not:

    g <- g - (g . g_ref / g_ref . g_ref) g_ref

A run is a population of N members (``cl_lightning.models.population``): every parameter and
gradient is ``[N, ...]``, member k's slice being member k's own. Everything above is per member:
member k's g_ref comes from its own memory batch, its dot products run over its own parameters
(all dims of each parameter but dim 0), and its projection is decided by its own sign. Nothing is
reduced over members, so member k's run is the solo run with its seed (a population of one) and a
NaN in one member reaches no other.

The projection runs in ``on_before_optimizer_step``: once per optimizer step (also under
gradient accumulation), after mixed precision unscaled the gradients and before gradient
clipping. It is branch-free on the host (``torch.where`` on the dot product), so a training step
never waits for the device.

Multi-process (DDP) runs: the ``.grad`` the hook sees is already averaged over processes, the
memory holds the same examples on every process (drawn from each task's whole training set with
the run's seed) and the memory batch of a step is drawn from (seed, epoch, batch index), so every
process computes the same g_ref and applies the same projection, and the weights stay in sync
without any communication. The reference forward/backward bypasses the DDP wrapper, so it
triggers no gradient all-reduce of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from cl_lightning.data.datamodule import Batch, ContinualDataModule
from cl_lightning.errors import ConfigError
from cl_lightning.methods.base import Method
from cl_lightning.methods.memory import EpisodicMemory
from cl_lightning.models.member_random import keyed_subsets, member_keys, mix64
from cl_lightning.models.member_sgd import member_view

#: The dropout stream of the reference forward: the step's own forward uses stream 0, so the
#: memory batch gets fresh masks in the same step (``ContinualModule.forward``'s ``stream``).
REFERENCE_STREAM = 1


def member_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """``[N]``: each member's dot product of two lists of ``[N, ...]`` tensors (gradients),
    over all dims but 0 of every tensor, summed over the list.

    Row k reads only member k's slices. On the CPU with one thread it is bitwise the same for
    member k whatever N is (measured); with more threads, or on an accelerator, the reduction of
    a row may be split differently for another N (rounding only).
    """
    dots = [torch.linalg.vecdot(x.flatten(1), y.flatten(1)) for x, y in zip(a, b)]
    total = dots[0]
    for d in dots[1:]:
        total = total + d
    return total


def project_gradients(grads: list[Tensor], reference: list[Tensor]) -> Tensor:
    """A-GEM's projection of ``grads`` against ``reference``, per member, in place; returns each
    member's ``g . g_ref`` before the projection (``[N]``, on the gradients' device).

    Both lists hold ``[N, ...]`` tensors, member k's in row k. Member k's ``g`` is left unchanged
    where its ``g . g_ref >= 0``; otherwise it becomes ``g - (g . g_ref / g_ref . g_ref) g_ref``,
    whose dot product with its ``g_ref`` is 0.
    """
    dot = member_dot(grads, reference)
    ref_norm = member_dot(reference, reference)
    # dot < 0 implies ref_norm > 0; the clamp only keeps the unused branch finite.
    scale = torch.where(dot < 0, dot / ref_norm.clamp_min(torch.finfo(ref_norm.dtype).tiny), torch.zeros_like(dot))
    for g, r in zip(grads, reference):
        g.addcmul_(r, -member_view(scale, g).to(g.dtype))
    return dot


def memory_positions(keys: Tensor, size: int, count: int, epoch: int, batch_idx: int) -> Tensor:
    """``[N, count]``: positions in each member's memory of size ``size`` for step ``batch_idx`` of
    ``epoch``, drawn without replacement; row k from member k's key (``member_keys(seeds,
    "agem_memory_batch")``) alone.

    Counter-based (the ranks of splitmix64 outputs keyed by the member, epoch and step), on the
    keys' device, for all members at once: no Python loop over members and no generator carried
    along, so every DDP process and a resumed run draw the same.
    """
    return keyed_subsets(mix64(mix64(keys ^ epoch) ^ batch_idx), size, count)


class AGEM(Method):
    """Projects each member's training gradient so that it does not increase that member's loss
    on its memory batch.

    The memory is filled at each task end with that task's examples
    (:class:`~cl_lightning.methods.memory.EpisodicMemory`, each member's from its own seed);
    from the second task on, member k's reference gradient of every step is the gradient of its
    mean cross-entropy over ``memory_batch_size`` examples drawn without replacement from its
    memory of all tasks seen so far (the whole memory while it is smaller), each example with its
    own task's class mask on split benchmarks. It is computed in the module's training mode, like
    the training loss (the reference code also used training mode), with dropout masks of their
    own (stream :data:`REFERENCE_STREAM`), in full precision.

    Args:
        memory_per_class: Memory examples per class of each task. With neither this nor
            ``memory_per_task`` set: 1, A-GEM's "tiny memory" (1 example per class per task).
        memory_per_task: Examples per task instead, uniform over the task (not with
            ``memory_per_class``).
        memory_replacement: Draw ``memory_per_task`` with replacement.
        memory_batch_size: Examples of the memory batch of each step (A-GEM code: 64 on MNIST,
            256 on CIFAR).
    """

    def __init__(
        self,
        memory_per_class: PositiveInt | None = None,
        memory_per_task: PositiveInt | None = None,
        memory_replacement: bool = False,
        memory_batch_size: PositiveInt = 64,
    ) -> None:
        super().__init__()
        if memory_batch_size < 1:
            raise ConfigError(f"memory_batch_size must be a positive integer, got {memory_batch_size}")
        if memory_per_class is None and memory_per_task is None:
            memory_per_class = 1
        self.memory = EpisodicMemory(per_task=memory_per_task, per_class=memory_per_class, replacement=memory_replacement)
        self.memory_batch_size = int(memory_batch_size)
        self.projected: Tensor | None = None  # [N]: steps of the current task whose gradient was projected
        self.steps = 0  # steps of the current task with a reference gradient
        self._batch_idx = 0
        self._cache: tuple[list[int], Batch] | None = None
        self._keys: Tensor | None = None  # each member's key of its memory-batch draws, on the device

    # ------------------------------------------------------------------ task events
    @override
    def on_task_start(self, trainer: Trainer, pl_module: LightningModule, task: int) -> None:
        self.projected, self.steps = None, 0

    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule, task: int) -> None:
        dm: ContinualDataModule = trainer.datamodule
        self._publish(trainer, pl_module, task)
        self.memory.add_task(dm, task)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    # ------------------------------------------------------------------ the projection
    def memory_batch(self, dm: ContinualDataModule, device: torch.device, epoch: int, batch_idx: int) -> Batch:
        """Every member's memory batch of step ``batch_idx`` of ``epoch``, ``[N, M, ...]``, on ``device``.

        The memory (a few hundred examples per member) is kept on the device, and the step's
        positions are drawn there from (member seed, epoch, batch index): identical on every process
        and after a resume, whatever happened before.
        """
        tasks = self.memory.tasks
        if self._cache is None or self._cache[0] != tasks or self._cache[1][0].device != device:
            self._cache = (tasks, tuple(v.to(device) for v in self.memory.batch(dm, tasks)))
        x, y, task_ids = self._cache[1]
        size = y.shape[1]
        if size <= self.memory_batch_size:
            return x, y, task_ids
        if self._keys is None or self._keys.device != device:
            self._keys = member_keys(dm.seeds, "agem_memory_batch").to(device)
        index = memory_positions(self._keys, size, self.memory_batch_size, epoch, batch_idx)
        rows = torch.arange(len(index), device=device).unsqueeze(1)
        return x[rows, index], y[rows, index], task_ids[rows, index]

    def reference_gradient(self, pl_module: LightningModule, params: list[Tensor], batch: Batch) -> list[Tensor]:
        """Each member's gradient of its mean cross-entropy on its rows of ``batch``, w.r.t.
        ``params`` (``[N, ...]`` each); ``.grad`` is not touched.

        ``pl_module.loss`` sums the members' losses, so member k's slice of each gradient is its
        own loss's gradient: the members stay independent (a member the guard stopped gets 0).
        """
        with torch.inference_mode(False), torch.enable_grad():
            loss = pl_module.loss(batch, stream=REFERENCE_STREAM)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if not self.memory.tasks:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        batch = self.memory_batch(trainer.datamodule, pl_module.device, trainer.current_epoch, self._batch_idx)
        reference = self.reference_gradient(pl_module, params, batch)
        with torch.no_grad():
            dot = project_gradients([p.grad for p in params], reference)
        violated = (dot < 0).to(torch.long)
        self.projected = violated if self.projected is None else self.projected.to(dot.device) + violated
        self.steps += 1

    # ------------------------------------------------------------------ reporting
    def _publish(self, trainer: Trainer, pl_module: LightningModule, task: int) -> None:
        """Each member's fraction of projected steps (and the memory size) into its own logger."""
        if self.projected is None:
            return
        size = float(sum(i.shape[1] for i in self.memory.indices.values()))
        self.log_members(trainer, pl_module, {"agem/projected_fraction": self.projected.double() / max(self.steps, 1),
                                              "agem/memory_size": [size] * len(self.projected)}, task + 1)

    # ------------------------------------------------------------------ checkpoint
    @override
    def method_state(self) -> dict[str, Any]:
        projected = None if self.projected is None else self.projected.detach().cpu().clone()
        return {"memory": self.memory.state_dict(), "projected": projected, "steps": self.steps}

    @override
    def load_method_state(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
        self.projected = state["projected"]
        self.steps = int(state["steps"])
        self._cache = None
