"""SGD for a population: each member has its own learning rate, momentum and weight decay.

A :class:`~cl_lightning.models.population.Population` stacks its N members' parameters along dim 0
(shape ``[N, ...]``), and the loss it is trained on is the sum of the members' losses, so the
gradient of member k's slice is member k's own gradient. ``torch.optim.SGD`` is elementwise, but
takes one scalar lr, momentum and weight decay per parameter group, while members may differ in all
three (and in the paper's per-task lr decay): :class:`MemberSGD` is the same update with an ``[N]``
tensor of each, applied along dim 0. Member k's trajectory therefore depends only on its own
gradients and settings, as the population design requires (docs/populations.md).

:class:`MemberTaskLR` is the paper's per-task lr decay, ``max(floor, lr * decay^t)`` for task t
(0-based), with one lr, decay and floor per member.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["MemberSGD", "MemberTaskLR"]

#: The per-member settings of a parameter group, each an ``[N]`` tensor.
MEMBER_SETTINGS = ("lr", "momentum", "weight_decay")


def member_tensor(value: Tensor | float, name: str, n: int, like: Tensor) -> Tensor:
    """``value`` as a new ``[n]`` tensor with ``like``'s device and dtype (a scalar is broadcast).

    Always a copy, never the caller's tensor, so that changing one optimizer's settings cannot change
    another's (a state dict and the optimizer it came from, for instance). The dtype is the
    parameters' because that is what ``torch.optim.SGD``'s kernels round a scalar setting to (for
    float32 and float64 parameters), which keeps a population of one equal to it.
    """
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device).detach().clone()
    if t.dim() == 0:
        t = t.repeat(n)
    if t.shape != (n,):
        raise ValueError(f"MemberSGD {name}: one value per member, shape ({n},), or a scalar; got shape {tuple(t.shape)}")
    if not bool((t >= 0).all()):  # NaN fails too
        raise ValueError(f"MemberSGD {name} must be >= 0 for every member, got {t.tolist()}")
    return t


def member_view(t: Tensor, param: Tensor) -> Tensor:
    """The ``[N]`` tensor ``t`` shaped ``[N, 1, ..., 1]`` to broadcast along dim 0 of ``param``."""
    return t.view(-1, *([1] * (param.dim() - 1)))


class MemberSGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` (dampening 0, no Nesterov) with a learning rate, momentum and weight decay
    per population member.

    Every parameter has the members along dim 0 (``[N, ...]``); the settings are ``[N]`` tensors (a
    Python float is broadcast to all members). For each parameter w with gradient g, with the
    settings viewed as ``[N, 1, ..., 1]``, one step is torch's SGD update, in its order::

        d   = g + weight_decay * w
        buf = d                      first step (no momentum buffer yet)
        buf = momentum * buf + d     later steps
        w   = w - lr * buf

    so a population of one is ``torch.optim.SGD`` and member k of N is the population of one with
    member k's settings (the operations are elementwise). A member with momentum 0 gets
    ``buf = 0 * buf + d = d`` (for a finite buffer): plain SGD. Every group keeps a buffer whatever
    its momenta, so that the step never reads the values (a device synchronisation on an accelerator).

    The paper's code created a new optimizer for every task; as with ``torch.optim.SGD``,
    ``optimizer.state.clear()`` drops the momentum buffers, so the next step starts them afresh,
    and :meth:`set_lr` sets each member's lr of the new task (see :class:`MemberTaskLR`).

    The settings live in ``param_groups``, so ``state_dict()`` carries them and
    ``load_state_dict()`` restores them with the momentum buffers: a run resumed from a checkpoint
    continues exactly. Loaded settings may come from another device or dtype; like the state,
    they are moved to the parameters' (at the next step).

    Args:
        params: Parameters of shape ``[N, ...]``, all with the same N, device and dtype in a group
            (or groups of them, as for any torch optimizer).
        lr: Learning rate per member, ``[N]`` or a float.
        momentum: Momentum per member, ``[N]`` or a float.
        weight_decay: L2 weight decay per member, ``[N]`` or a float.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: Tensor | float,
        momentum: Tensor | float = 0.0,
        weight_decay: Tensor | float = 0.0,
    ) -> None:
        # group id -> (its weight_decay tensor, whether some member decays): see _decays
        self._decay_checks: dict[int, tuple[Tensor, bool]] = {}
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as ``torch.optim.Optimizer`` does, with its settings made ``[N]`` tensors."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        first = group["params"][0]
        for p in group["params"]:
            if p.dim() == 0 or p.shape[0] != first.shape[0] or p.device != first.device or p.dtype != first.dtype:
                raise ValueError(
                    "MemberSGD: the parameters of a group must all be [N, ...] with the same N, device and dtype;"
                    f" got {tuple(p.shape)} {p.device} {p.dtype} beside {tuple(first.shape)} {first.device} {first.dtype}"
                )
        for name in MEMBER_SETTINGS:
            group[name] = member_tensor(group[name], name, first.shape[0], first)

    def set_lr(self, lr: Tensor | float) -> None:
        """Set the learning rate of every member (``[N]`` or a float), in every group: at a task start,
        the lr of the new task from the per-task decay (:class:`MemberTaskLR`)."""
        for group in self.param_groups:
            first = group["params"][0]
            group["lr"] = member_tensor(lr, "lr", first.shape[0], first)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One SGD step of every member (see the class docstring for the update).

        Four ``torch._foreach_*`` calls per group whatever N (three when no member has weight decay:
        then d = g, as in ``torch.optim.SGD``): the members are dim 0 of each tensor,
        never a Python loop. (On CUDA, foreach's multi-tensor kernels need the tensors of one index
        to share shape and strides, which the ``[N, 1, ..., 1]`` settings do not, so each call runs
        one kernel per parameter tensor; a flat ``[N, P]`` layout would fuse them, should the
        optimizer step show in the GPU benchmark.)
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("MemberSGD does not support sparse gradients")
            lr, momentum, weight_decay = (self._setting(group, name) for name in MEMBER_SETTINGS)
            if self._decays(group, weight_decay):
                # d = g + weight_decay * w: a new tensor per parameter, so it can become the buffer as it is
                directions = torch._foreach_addcmul([p.grad for p in params], params,
                                                    [member_view(weight_decay, p) for p in params])
                fresh = True
            else:  # d = g, as torch.optim.SGD without weight decay: saves a pass over the population
                directions, fresh = [p.grad for p in params], False
            buffers = []
            # buffers that exist already (not the first step since the last state.clear()), with their d and momentum
            kept, kept_directions, kept_momenta = [], [], []
            for p, d in zip(params, directions):
                state = self.state[p]
                if "momentum_buffer" in state:
                    kept.append(state["momentum_buffer"])
                    kept_directions.append(d)
                    kept_momenta.append(member_view(momentum, p))
                else:
                    state["momentum_buffer"] = d if fresh else d.clone()
                buffers.append(state["momentum_buffer"])
            if kept:
                torch._foreach_mul_(kept, kept_momenta)
                torch._foreach_add_(kept, kept_directions)
            # w -= lr * buf; addcmul rounds as torch.optim.SGD's add(buf, alpha=-lr) does (one fused multiply-add)
            torch._foreach_addcmul_(params, buffers, [member_view(lr, p) for p in params], value=-1)
        return loss

    def _decays(self, group: dict[str, Any], weight_decay: Tensor) -> bool:
        """Whether some member of ``group`` has a weight decay above 0, checked once per settings
        tensor (the check reads its values: a device synchronisation on an accelerator), again only
        when the group's ``weight_decay`` is a new tensor (loaded, moved or assigned)."""
        checked = self._decay_checks.get(id(group))
        if checked is None or checked[0] is not weight_decay:
            checked = self._decay_checks[id(group)] = (weight_decay, bool((weight_decay != 0).any()))
        return checked[1]

    def _setting(self, group: dict[str, Any], name: str) -> Tensor:
        """The group's ``[N]`` setting ``name`` on its parameters' device and dtype: moved there once
        if it is not (settings loaded from another device, or the parameters moved since)."""
        first = group["params"][0]
        value = group[name]
        if not isinstance(value, Tensor) or value.device != first.device or value.dtype != first.dtype:
            value = group[name] = member_tensor(value, name, first.shape[0], first)
        elif value.shape != (first.shape[0],):
            raise ValueError(f"MemberSGD {name}: shape {tuple(value.shape)}, but the parameters hold {first.shape[0]} members")
        return value


class MemberTaskLR:
    """The paper's per-task lr decay, per member: the lr of epoch e is ``max(floor, lr * decay^t)``
    with t = e // epochs_per_task the (0-based) task, for each member's own lr, decay and floor.

    ``ContinualModule``'s ``TaskLRFactor`` semantics with ``[N]`` settings; the lr is computed
    directly in float64 (not as ``lr * factor`` as ``LambdaLR`` does) and returned as a float64
    ``[N]`` tensor for :meth:`MemberSGD.set_lr` at each task start. A plain object of CPU tensors,
    so it pickles with a checkpoint or a process.

    Args:
        lr: The lr of task 0 per member, ``[N]`` or a float.
        decay: The per-task decay factor per member, ``[N]`` or a float.
        floor: The lowest lr per member, ``[N]`` or a float.
        epochs_per_task: Epochs of each task, shared by the population (it fixes the run's length).
    """

    def __init__(self, lr: Tensor | float, decay: Tensor | float, floor: Tensor | float, epochs_per_task: int) -> None:
        settings = [torch.as_tensor(v, dtype=torch.float64).detach().cpu().clone() for v in (lr, decay, floor)]
        self.lr, self.decay, self.floor = (t.reshape(-1).contiguous() for t in torch.broadcast_tensors(*settings))
        self.epochs_per_task = epochs_per_task

    def __call__(self, epoch: int) -> Tensor:
        """The ``[N]`` float64 learning rates of ``epoch``'s task."""
        task = epoch // self.epochs_per_task
        return torch.maximum(self.floor, self.lr * self.decay**task)
