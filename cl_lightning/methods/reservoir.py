"""Every population member's reservoir of training examples: a uniform sample of everything the
member has seen so far, in fixed memory.

Reservoir sampling (Vitter's algorithm R) keeps, after n examples of a stream, each of them
with the same probability capacity/n, without knowing n in advance and without task
boundaries. It is the memory of ER-Reservoir (Chaudhry et al., "On Tiny Episodic Memories in
Continual Learning", 2019), one of the MC-SGD paper's baselines.

What is stored: per member, ``[capacity]`` **indices into the shared base set plus task ids**
(``index`` and ``task``, ``[N, capacity]`` int64), never images. An example of a population is a
base image seen through its task's transform (pixel map), and member k's batches are base indices
of its own task sets (``data/members.py``), so (base index, task) names it exactly; the replayed
batch is rebuilt through the same :class:`~cl_lightning.data.members.MemberSet` path as training
batches. Measured cost, at the paper's sizes: 16 bytes per kept example, 3.2 KB per member for
200 examples (1.6 MB for N = 512), where float32 images cost 627 KB per member on MNIST (321 MB
for N = 512) and 1.2 MB per member on CIFAR-100's 100 examples (629 MB for N = 512); a checkpoint
is as small, and under DDP the processes exchange ``[N, B]`` indices instead of images.

Random choices are counter-based, not drawn from stateful generators: the slot the n-th example
of member k's stream draws is a hash of (member k's key, n), where the key comes from
``generator(seed_k, "er_reservoir")`` (the stream key of the solo code). So one step's draws for
all members are one ``[N, B]`` tensor operation on the device, with no loop over members, no
host round trip and no generator state to checkpoint; member k's draws depend on its seed and
the stream position alone, never on N, on the other members or on how the stream is cut into
batches. The hash is splitmix64 (Steele, Lea, Flood, OOPSLA 2014), as the population's dropout
masks (``models/population.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Trainer
from torch import Tensor

from cl_lightning.data.members import Batch, MemberSet
from cl_lightning.errors import ConfigError
from cl_lightning.models.member_random import keyed_subsets, member_keys, mix64, stream_bits

__all__ = ["ReservoirBuffer", "replay_sizes", "step_examples"]

class ReservoirBuffer:
    """Every member's fixed-capacity uniform sample (algorithm R) of its stream of examples.

    Member k's n-th example (1-based) fills slot n-1 while the buffer is not full; afterwards it
    draws j uniformly in [0, n) and replaces slot j if j < capacity, so it is kept with
    probability capacity/n and every example seen so far is in the buffer with the same
    probability. A batch is inserted as its examples one after the other: when two examples of
    the same batch draw the same slot, the later one wins, as it would sequentially.

    The members share the stream's length (a population's members have equally sized tasks and
    batches), so ``seen`` and ``len`` are host-side ints common to all, and insertion is one
    batched operation over ``[N, B]``.

    Besides the example's name (base index and task id), a method may keep values computed when the
    example was seen (DER++ keeps the network's logits): :meth:`add` takes them as ``[N, B, ...]``
    tensors and :attr:`values` holds them per slot, ``[N, capacity, ...]``.

    Args:
        capacity: Examples kept per member (over all tasks).
        seeds: The members' seeds; member k's draws are keyed by ``generator(seeds[k], key)``.
        key: The name of the reservoir's random stream (each method its own).
    """

    def __init__(self, capacity: int, seeds: Sequence[int], key: str = "er_reservoir") -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"a reservoir needs a capacity of at least 1 example, got {capacity!r}")
        if not seeds:
            raise ValueError("a reservoir needs at least one member seed")
        self.capacity = capacity
        self.keys = member_keys(seeds, key)
        self.seen = 0  # examples each member's stream offered so far (a host-side int: no device sync)
        #: ``[N, capacity]`` base index and task id of each slot; columns ``[0, len(self))`` are held.
        self.index = torch.zeros(len(seeds), capacity, dtype=torch.int64)
        self.task = torch.zeros(len(seeds), capacity, dtype=torch.int64)
        #: ``[N, capacity, ...]`` per name: the values given with each kept example (created by the first :meth:`add`).
        self.values: dict[str, Tensor] = {}

    def __len__(self) -> int:
        """Examples held by each member (``min(seen, capacity)``)."""
        return min(self.seen, self.capacity)

    @property
    def size(self) -> int:
        """N, the number of members."""
        return int(self.keys.shape[0])

    def to(self, device: torch.device | str) -> ReservoirBuffer:
        """Move the slots and keys to ``device`` (a no-op when they are there already)."""
        device = torch.device(device)
        if self.index.device != device:
            self.index, self.task, self.keys = (t.to(device) for t in (self.index, self.task, self.keys))
            self.values = {name: t.to(device) for name, t in self.values.items()}
        return self

    # ------------------------------------------------------------------ insertion
    def add(self, index: Tensor, task: Tensor, **values: Tensor) -> None:
        """Offer every member's next examples, in order: base indices and task ids, ``[N, B]``, and the
        ``values`` to keep with them (``[N, B, ...]`` each)."""
        if index.shape != task.shape or index.dim() != 2 or index.shape[0] != self.size:
            raise ValueError(f"index and task must both have shape [N={self.size}, B], got {tuple(index.shape)} "
                             f"and {tuple(task.shape)}")
        if index.shape[1] == 0:
            return
        writer = self._writers(self._slots(index.shape[1]))
        self.seen += index.shape[1]
        written = writer >= 0
        source = writer.clamp(min=0)
        self.index = torch.where(written, index.gather(1, source), self.index)
        self.task = torch.where(written, task.gather(1, source), self.task)
        rows = torch.arange(self.size, device=source.device).unsqueeze(1)
        for name, value in values.items():
            stored = self.values.get(name)
            if stored is None:
                stored = value.new_zeros((self.size, self.capacity, *value.shape[2:]))
            kept = written.view(*written.shape, *([1] * (value.dim() - 2)))
            self.values[name] = torch.where(kept, value[rows, source], stored)

    def _slots(self, count: int) -> Tensor:
        """``[N, count]``: the slot each of the next ``count`` examples draws (``capacity``: not kept)."""
        n = torch.arange(self.seen + 1, self.seen + count + 1, device=self.keys.device)  # 1-based stream positions
        # j = bits mod n is uniform in [0, n) up to a bias of n / 2**63; exact integer arithmetic
        drawn = stream_bits(self.keys, n - 1) % n
        slots = torch.where(n <= self.capacity, n - 1, drawn)
        return slots.clamp(max=self.capacity)

    def _writers(self, slots: Tensor) -> Tensor:
        """``[N, capacity]``: for each slot, the position in the batch of the example left in it
        (the last one that drew it), or -1 where none did. ``amax`` is order-independent, so this
        is deterministic on every device, unlike a scatter with repeated indices."""
        positions = torch.arange(slots.shape[1], device=slots.device).expand_as(slots)
        writer = torch.full((self.size, self.capacity + 1), -1, dtype=torch.int64, device=slots.device)
        return writer.scatter_reduce_(1, slots, positions, reduce="amax")[:, : self.capacity]

    # ------------------------------------------------------------------ sampling
    def sample(self, batch_size: int, keys: Tensor) -> Tensor:
        """``[N, min(batch_size, len(self))]`` slots of every member, drawn uniformly without
        replacement (all of them, in a random order, when the buffer holds fewer).

        Member k's draw is a random order of its held slots, keyed by ``keys[k]`` and by
        :attr:`seen`, which names the training step (each step offers new examples): the sort of
        ``len(self)`` hashes per member. Ties (probability about len**2 / 2**64) keep slot order.
        """
        held = len(self)
        if held == 0:
            raise ValueError("cannot sample from an empty reservoir")
        return keyed_subsets(mix64(keys ^ self.seen), held, batch_size)

    def batch(self, training: MemberSet, slots: Tensor) -> Batch:
        """The examples in ``slots`` (``[N, m]``, row k: member k's slots) as an ``(x, y, task)`` batch,
        built through the training set's own path (its base images, each example's task map)."""
        memory = MemberSet(training.base, self.index.gather(1, slots), self.task.gather(1, slots), training.pixel_maps)
        return memory.batch(0, slots.shape[1])

    def examples(self) -> tuple[Tensor, Tensor]:
        """Every member's stored base indices and task ids ``[N, len(self)]``, in slot order."""
        held = len(self)
        if held == 0:
            raise ValueError("the reservoir is empty")
        return self.index[:, :held], self.task[:, :held]

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Tensors and ints only (loads with ``weights_only=True``); copies, so later insertions do
        not change a state taken earlier. No generator state: the draws are counter-based."""
        return {"capacity": self.capacity, "seen": self.seen,
                "index": self.index.detach().clone(), "task": self.task.detach().clone(),
                "values": {name: t.detach().clone() for name, t in self.values.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state (its tensors are moved to this buffer's device)."""
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"the saved reservoir holds {state['capacity']} examples but this one "
                             f"{self.capacity}: resume with the run's own memory size")
        if state["index"].shape[0] != self.size:
            raise ValueError(f"the saved reservoir has {state['index'].shape[0]} members but this population "
                             f"{self.size}: resume with the run's own seeds")
        self.seen = int(state["seen"])
        self.index, self.task = (state[name].to(self.keys.device) for name in ("index", "task"))
        self.values = {name: t.to(self.keys.device) for name, t in state.get("values", {}).items()}


def replay_sizes(method: str, memory_size: int | None, memory_batch_size: int | None) -> tuple[int, int]:
    """A replay method's memory size and per-draw batch as ints, refused below 1 with the method's name."""
    if memory_size is None or memory_size < 1:
        raise ConfigError(f"{method} needs a memory: memory_size must be at least 1, got {memory_size!r}")
    if memory_batch_size is None or memory_batch_size < 1:
        raise ConfigError(f"{method} replays at least one example per draw: memory_batch_size must be at least 1, "
                          f"got {memory_batch_size!r}")
    return int(memory_size), int(memory_batch_size)


def step_examples(trainer: Trainer, batch: Batch, batch_idx: int, *values: Tensor) -> tuple[Tensor, ...]:
    """Base indices and task ids ``[N, B]`` of the training step's examples on every process, in rank
    order, followed by ``values`` (``[N, b, ...]`` per process) gathered the same way: what every
    process inserts into its reservoir, so that the members' reservoirs stay the same everywhere.

    The batch carries images, not indices: its indices are those of the training loader's examples
    at this batch's place in the epoch (``MemberBatches``: batch i is columns ``[i*B, (i+1)*B)`` of
    its ordered :class:`MemberSet`, also after a mid-epoch resume, where Lightning's ``batch_idx``
    continues the interrupted epoch's count).
    """
    loader = trainer.train_dataloader
    start = batch_idx * loader.batch_size
    stop = start + batch[1].shape[1]
    local = (loader.dataset.base_index[:, start:stop], batch[2], *values)
    if trainer.world_size == 1:
        return local
    return tuple(trainer.strategy.all_gather(t).transpose(0, 1).flatten(1, 2) for t in local)
