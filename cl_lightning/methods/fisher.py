"""EWC's two estimators of the diagonal Fisher information, per population member.

- :func:`example_fisher` (Kirkpatrick et al., PNAS 2017): at a task's end, the mean over examples
  of the task of each example's squared log-likelihood gradient, all members and examples in
  vmapped calls (``torch.func``); ``empirical`` with the true labels, ``true`` with labels sampled
  from the member's own predictive distribution.
- :class:`RunningFisher` (the A-GEM code's EWC, facebookresearch/agem 4542149 ``model/model.py``
  1081-1110, ``fc_permute_mnist.py`` 270-279): a running average of squared mini-batch gradients
  kept during training, min-max normalised per member at a task's end.

Both work on ``[N, P]`` flat vectors in the layout of
:meth:`~cl_lightning.models.population.Population.flat` (row k member k's) and never reduce over
members. :class:`~cl_lightning.methods.ewc.EWC` turns either into its penalty.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.models.module import mask_logits
from cl_lightning.models.params import eval_mode, outside_inference
from cl_lightning.seeding import generator

FisherKind = Literal["empirical", "true"]
#: Per-example gradients of one member: ``(params, buffers, x, y, mask) -> {name: gradient}``.
ExampleGrad = Callable[..., dict[str, Tensor]]


def min_max(flat: Tensor) -> Tensor:
    """Each member's row of ``flat`` ``[N, P]`` rescaled to [0, 1] by its own min and max (all
    zeros if constant), as the A-GEM code normalises its Fisher (model.py 1100-1110, there with
    ``+ 1e-32`` in the denominator)."""
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    return (flat - low) / (high - low).clamp_min(torch.finfo(flat.dtype).tiny)


def split_like(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Per-parameter ``[N, ...]`` views of ``[N, P]`` flat vectors in the layout of
    :meth:`~cl_lightning.models.population.Population.flat`."""
    widths = [p[0].numel() for p in params]
    return [v.view_as(p) for p, v in zip(params, flat.split(widths, dim=1))]


# ---------------------------------------------------------------------- Kirkpatrick's: per-example gradients
def fisher_indices(dm: ContinualDataModule, task: int, samples: int | None) -> Tensor:
    """``[N, m]``: row k holds the positions in member k's training set of ``task`` that its Fisher
    is estimated on (``samples`` of them, all with None), drawn from member k's seed with the solo
    run's key."""
    n = len(dm.task_set(task, "train"))
    orders = torch.stack([torch.randperm(n, generator=generator(seed, "ewc_fisher", task)) for seed in dm.seeds])
    return orders if samples is None else orders[:, :samples]


def example_fisher(pl_module: LightningModule, dm: ContinualDataModule, task: int, indices: Tensor, kind: FisherKind,
                   batch_size: int, backend: Literal["vmap", "loop"]) -> Tensor:
    """Diagonal Fisher of ``task`` at the current weights, ``[N, P]``: row k is the mean over member k's
    examples ``indices[k]`` of the squared per-example gradient of its log-likelihood (non-negative),
    with the network in eval mode, ``batch_size`` examples per member and vectorised call."""
    population = pl_module.population
    stacked = population.stacked
    params = {name: outside_inference(p.detach()) for name, p in stacked.named_parameters()}
    buffers = {name: outside_inference(b.detach()).clone() for name, b in stacked.named_buffers()}
    dataset = dm.task_set(task, "train")
    examples = dataset.select(indices.to(dataset.base_index.device))
    labels = [generator(seed, "ewc_fisher_labels", task) for seed in dm.seeds]
    example_grad = _example_grad(stacked)
    compute = _squared_grads_vmap if backend == "vmap" else _squared_grads_loop
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    with eval_mode(population), torch.inference_mode(False), torch.no_grad():
        for start in range(0, indices.shape[1], batch_size):
            x, y, task_ids = (outside_inference(v.to(pl_module.device)) for v in examples.batch(start, start + batch_size))
            mask = pl_module.task_mask(task_ids)
            if kind == "true":
                y = _sampled_labels(population(x), mask, labels)
            for name, value in compute(example_grad, params, buffers, x, y, mask).items():
                total[name] += value
    return torch.cat([total[name].flatten(1) for name in params], dim=1) / indices.shape[1]


def _sampled_labels(logits: Tensor, mask: Tensor | None, labels: list[torch.Generator]) -> Tensor:
    """``[N, B]`` labels drawn from each member's predictive distribution (Gumbel-max), the noise from
    member k's CPU generator, so the labels do not depend on the device or on N."""
    logits = mask_logits(logits, mask)
    uniform = torch.stack([torch.rand(logits.shape[1:], generator=g, dtype=torch.float64) for g in labels])
    return (logits.double() - torch.log(-torch.log(uniform.to(logits.device)))).argmax(dim=2)


def _example_grad(net: nn.Module) -> ExampleGrad:
    """The gradient of one member's cross-entropy on one example, ``(params, buffers, x, y, mask)
    -> {name: gradient}`` with the member's parameters and buffers (slices of the stacked
    network's) and one example (``mask``: its task's classes, or None without masks)."""

    def loss(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
        logits = functional_call(net, (params, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(mask_logits(logits, mask), y.unsqueeze(0))

    return grad(loss)


def _squared_grads_vmap(example_grad: ExampleGrad, params: dict[str, Tensor], buffers: dict[str, Tensor],
                        x: Tensor, y: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
    """Sum over each member's examples ``x [N, B, ...]`` of the squared per-example gradients,
    ``{name: [N, ...]}``, in one call vmapped over the members and, inside, their examples."""
    mask_dim = None if mask is None else 0
    per_example = vmap(example_grad, in_dims=(None, None, 0, 0, mask_dim))
    with torch.enable_grad():
        grads = vmap(per_example, in_dims=(0, 0, 0, 0, mask_dim))(params, buffers, x, y, mask)
    return {name: g.square().sum(dim=1) for name, g in grads.items()}


def _squared_grads_loop(example_grad: ExampleGrad, params: dict[str, Tensor], buffers: dict[str, Tensor],
                        x: Tensor, y: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
    """As :func:`_squared_grads_vmap`, one example position at a time (vmapped over the members
    only)."""
    mask_dim = None if mask is None else 0
    per_member = vmap(example_grad, in_dims=(0, 0, 0, 0, mask_dim))
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    with torch.enable_grad():
        for i in range(x.shape[1]):
            grads = per_member(params, buffers, x[:, i], y[:, i], None if mask is None else mask[:, i])
            for name, g in grads.items():
                total[name] += g.square()
    return total


# ---------------------------------------------------------------------- the A-GEM code's: a running average
class RunningFisher:
    """The A-GEM code's running Fisher F of every member, ``[N, P]`` (None until the first step).

    Every optimizer step adds the step's squared gradient to a window (``set_tmp_fisher``,
    model.py 1086); before the gradient of step ``s`` of a task (0-based) is added, if ``(s + 1) %
    update_every == 0``, the window is folded in, ``F <- keep * F + gain * window`` with ``keep = 1 - d``
    and ``gain = d / update_every`` per member, and emptied (``set_running_fisher``, 1092-1093). F
    starts at 0 and runs on across tasks; a task's end empties the window and restarts the count.
    """

    def __init__(self, update_every: int) -> None:
        self.update_every = update_every
        self.fisher: Tensor | None = None
        self.window: Tensor | None = None
        self.steps = 0  # optimizer steps of the current task (the same for every member)

    def track(self, params: list[Tensor], keep: Callable[[Tensor], Tensor], gain: Callable[[Tensor], Tensor]) -> None:
        """One optimizer step on the gradients in ``params``' ``.grad`` (``[N, ...]`` each); ``keep(F)`` and
        ``gain(F)`` give the members' ``[N]`` fold weights in F's dtype and device."""
        if self.fisher is None:
            dtype = torch.promote_types(params[0].dtype, torch.float32)
            shape = (len(params[0]), sum(p[0].numel() for p in params))
            self.fisher = torch.zeros(shape, dtype=dtype, device=params[0].device)
            self.window = torch.zeros_like(self.fisher)
        device = params[0].device
        self.fisher, self.window = self.fisher.to(device), self.window.to(device)
        with torch.no_grad():
            if (self.steps + 1) % self.update_every == 0:
                self.fisher.mul_(keep(self.fisher).unsqueeze(1)).add_(self.window * gain(self.fisher).unsqueeze(1))
                self.window.zero_()
            for p, w in zip(params, split_like(self.window, params)):
                if p.grad is not None:
                    w.add_(p.grad * p.grad)
        self.steps += 1

    def close(self, theta: Tensor) -> Tensor:
        """At a task's end (model.py 1252-1261): F, min-max normalised per member (zeros before any step,
        shaped as ``theta``); the window is emptied and the step count restarts. F itself runs on."""
        fisher = torch.zeros_like(theta) if self.fisher is None else min_max(self.fisher)
        if self.window is not None:
            self.window.zero_()
        self.steps = 0
        return fisher

    def state_dict(self) -> dict[str, Any]:
        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {"running_fisher": cpu(self.fisher), "fisher_window": cpu(self.window), "task_steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher, self.window, self.steps = state["running_fisher"], state["fisher_window"], int(state["task_steps"])
