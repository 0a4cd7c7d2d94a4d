"""EWC: Elastic Weight Consolidation, as a callback, in the two forms the literature means by it.

Both add a quadratic penalty that holds the weights near an anchor, weighted per weight by a
diagonal Fisher information F. They differ in which anchors and which Fisher:

``kirkpatrick`` (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks",
PNAS 2017): after each task t the weights theta*_t that solved it are kept with a Fisher F_t,
estimated at the task's end on its training data (per-example squared gradients); training on
later tasks adds ``lam / 2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2`` (one term per task).

``agem``: the EWC of the A-GEM code that produced the MC-SGD paper's baseline rows
(facebookresearch/agem at 45421499483b28935491251e9e821c55e8b3c089, ``model/model.py``; the
Stable-SGD authors' fork imirzadeh/stable-continual-learning at be4049c6f1c433e6d4593bf3113280dcbeb127b9,
``external_libs/continual_learning_algorithms/``, has the same code two lines lower):

- Fisher: a running average of squared *mini-batch* gradients of the unregularised batch-mean
  loss, kept during training (``create_fisher_ops``, model.py 1081-1093). Every step adds the
  step's squared gradient to a window (``set_tmp_fisher``, 1086); before the gradient of step
  ``s`` (0-based within the task) is added, if ``(s + 1) % fisher_update_after == 0`` the window
  is folded in, ``F <- (1 - d) F + d * window / fisher_update_after``, and emptied
  (``set_running_fisher``, 1092-1093; fc_permute_mnist.py 270-279). With ``d`` =
  ``fisher_ema_decay`` = 0.9 the *new* window weighs 0.9: F is mostly the last ~10-20 steps.
  So the first fold of a task averages 9 gradients over 10, and the steps after the last fold of a
  task are dropped (the window is emptied at the task's end, model.py 1261). F starts at 0
  (``set_initial_running_fisher`` copies the still-empty window, 1089-1090, fc_permute_mnist.py
  272-273) and is never reset: it runs on across tasks. Defaults: 0.9 and every 10 steps
  (fc_permute_mnist.py 50-51; the fork's fc_mnist.py 51-52), every 50 for Split CIFAR
  (conv_split_cifar.py 51-52 in both).
- At a task's end (``task_updates``, 1252-1261) F is copied and min-max normalised to [0, 1] by
  its global min and max over all weights, ``(F - min) / (max - min + 1e-32)`` (1100-1110), and
  the weights become the only anchor theta* (``init_updates`` -> ``set_star_vars``, 1232-1236,
  985-993): each task end *replaces* the previous Fisher and anchor.
- Penalty: ``loss = CE + lam * sum_i F_i (theta_i - theta*_i)^2`` (850-852, 882; ``synap_stgth``,
  10 for the MNIST and CIFAR rows: the fork's fc_mnist.py 50 default, replicate_cifar.sh 18-20)
  - no 1/2, so its ``lam`` is twice Kirkpatrick's at equal curvature. The Fisher of the initial
  state is 0, so the penalty acts from the second task on.

One penalty code serves both: the penalty is ``c/2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2``
with curvature scale ``c = lam`` (kirkpatrick) or ``2 lam`` (agem, one term). Its gradient,
``c * (F_sum * theta - sum_t F_t * theta*_t)``, needs only two flat vectors however many tasks
were seen (and one scalar, sum_t sum_i F_t,i theta*_t,i^2, for the penalty's value). It is
added to ``.grad`` in ``on_before_optimizer_step``: once per optimizer step (also under gradient
accumulation), after mixed precision unscaled the gradients and before gradient clipping, i.e.
exactly as if the penalty were part of the loss. The ``agem`` Fisher reads the same ``.grad``
before the penalty is added: the gradient of the (accumulated) batch-mean loss.

Under DDP the hook sees gradients already averaged over processes, identical everywhere: the
penalty gradient is a function of the weights only, so every process adds the same term, and the
``agem`` running Fisher is the one of the *global* batch's gradient (the squared gradient of the
mean over all processes' examples, as one process with the global batch would see), the same on
every process. The ``kirkpatrick`` Fisher is estimated by every process on the same seeded
examples. Each task's Fisher is broadcast from process 0 to guard against floating-point drift.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveInt
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parameters_to_vector
from typing_extensions import override

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.errors import ConfigError
from cl_lightning.methods.base import TaskAwareCallback
from cl_lightning.models.module import mask_logits
from cl_lightning.models.params import eval_mode, outside_inference
from cl_lightning.seeding import generator

FisherKind = Literal["empirical", "true"]
Variant = Literal["kirkpatrick", "agem"]


def min_max(flat: Tensor) -> Tensor:
    """``flat`` rescaled to [0, 1] by its min and max (all zeros if constant), as the A-GEM code
    normalises its Fisher (model.py 1100-1110, there with ``+ 1e-32`` in the denominator)."""
    low, high = flat.min(), flat.max()
    return (flat - low) / (high - low).clamp_min(torch.finfo(flat.dtype).tiny)


def _split_like(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    """Per-parameter views of a flat vector in the layout of ``parameters_to_vector(params)``."""
    return [v.view_as(p) for p, v in zip(params, flat.split([p.numel() for p in params]))]


class EWC(TaskAwareCallback):
    """Penalises moving the weights that mattered for earlier tasks (diagonal Fisher).

    ``variant="kirkpatrick"`` keeps one Fisher and anchor per task and sums the penalties. At the
    end of every task the Fisher is estimated on ``fisher_samples`` of that task's training
    examples (drawn from the run's seed, from the whole task dataset, so every process of a
    multi-process run uses the same examples), with the network in eval mode (dropout off). Each
    example contributes its own squared log-likelihood gradient (per-example gradients with
    ``torch.func.vmap``). With the research ResNet, whose BatchNorm always normalises with batch
    statistics, "per example" means each example normalised on its own.

    ``variant="agem"`` is the A-GEM code's EWC (module docstring): one anchor, the last task's
    weights; the Fisher a running average of squared mini-batch gradients during training,
    min-max normalised at the task's end. Costs nothing beyond one flat vector per step.

    Args:
        lam: lambda, the penalty's strength: ``lam/2 * sum_t sum_i F_t,i (theta_i -
            theta*_t,i)^2`` (kirkpatrick) or ``lam * sum_i F_i (theta_i - theta*_i)^2`` (agem,
            the A-GEM code's ``synap_stgth`` in its own form). SGD follows the penalty only while
            ``lr * c * max_i F_i < 2 (1 + momentum)`` with ``c = lam`` (kirkpatrick, F summed over
            tasks: it grows with every task) or ``2 lam`` (agem, max F = 1); beyond, the stiffest
            weights oscillate with growing amplitude (a warning says so at the task end where the
            limit is crossed).
        variant: ``kirkpatrick`` or ``agem`` (see above).
        fisher: (kirkpatrick) ``empirical``: squared gradients of the log-likelihood of the true
            labels; ``true``: of labels sampled from the model's own predictive distribution
            (seeded), which is the Fisher information proper.
        fisher_samples: (kirkpatrick) Training examples of the task the Fisher is estimated on,
            drawn without replacement from the seed; null uses the whole task.
        fisher_batch_size: (kirkpatrick) Examples per vectorised per-example-gradient call
            (memory: this many copies of the gradient).
        fisher_normalization: (kirkpatrick) ``none``: the Fisher as estimated; ``min_max``: each
            task's Fisher rescaled to [0, 1] by its min and max over all parameters (agem always
            normalises).
        backend: (kirkpatrick) ``vmap`` (default, one batched call per chunk) or ``loop`` (one
            backward per example: for networks ``vmap`` cannot batch, and faster for
            convolutional networks on CPU, where ``vmap`` turns convolutions into grouped ones).
        fisher_decay: (agem) ``d`` of ``F <- (1 - d) F + d * mean of the window's squared
            gradients``: the weight of the newest window (the A-GEM code's ``fisher_ema_decay``, 0.9).
        fisher_update_every: (agem) optimizer steps per window (``fisher_update_after``: 10 in
            the A-GEM code's MNIST scripts, 50 in its CIFAR script).
    """

    def __init__(
        self,
        lam: NonNegativeFloat = 1.0,
        variant: Variant = "kirkpatrick",
        fisher: FisherKind = "empirical",
        fisher_samples: PositiveInt | None = 1024,
        fisher_batch_size: PositiveInt = 64,
        fisher_normalization: Literal["none", "min_max"] = "none",
        backend: Literal["vmap", "loop"] = "vmap",
        fisher_decay: float = 0.9,
        fisher_update_every: PositiveInt = 10,
    ) -> None:
        if not lam >= 0:
            raise ConfigError(f"lam must be non-negative, got {lam}")
        if variant not in ("kirkpatrick", "agem"):
            raise ConfigError(f"variant must be 'kirkpatrick' or 'agem', got {variant!r}")
        if fisher not in ("empirical", "true"):
            raise ConfigError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
        if fisher_samples is not None and fisher_samples < 1:
            raise ConfigError(f"fisher_samples must be a positive integer or null (all), got {fisher_samples}")
        if fisher_batch_size < 1:
            raise ConfigError(f"fisher_batch_size must be a positive integer, got {fisher_batch_size}")
        if fisher_normalization not in ("none", "min_max"):
            raise ConfigError(f"fisher_normalization must be 'none' or 'min_max', got {fisher_normalization!r}")
        if backend not in ("vmap", "loop"):
            raise ConfigError(f"backend must be 'vmap' or 'loop', got {backend!r}")
        if not 0 < fisher_decay <= 1:
            raise ConfigError(f"fisher_decay must lie in (0, 1], got {fisher_decay}")
        if fisher_update_every < 1:
            raise ConfigError(f"fisher_update_every must be a positive integer, got {fisher_update_every}")
        self.lam = float(lam)
        self.variant = variant
        self.fisher = fisher
        self.fisher_samples = fisher_samples
        self.fisher_batch_size = int(fisher_batch_size)
        self.fisher_normalization = fisher_normalization
        self.backend = backend
        self.fisher_decay = float(fisher_decay)
        self.fisher_update_every = int(fisher_update_every)
        # The penalty's state: sum_t F_t, sum_t F_t * theta*_t (flat, the layout of
        # parameters_to_vector(net.parameters())), sum_t sum_i F_t,i theta*_t,i^2 (float64 scalar).
        self.fisher_sum: Tensor | None = None
        self.fisher_anchor: Tensor | None = None
        self.anchor_energy: Tensor | None = None
        self.tasks: list[int] = []
        self._views: list[tuple[Tensor, Tensor]] | None = None
        # agem's running Fisher F, its window of squared gradients, and the optimizer steps of the
        # current task (flat, same layout; None until the first step).
        self.running_fisher: Tensor | None = None
        self.fisher_window: Tensor | None = None
        self.task_steps = 0

    @property
    def curvature(self) -> float:
        """``c`` of the penalty ``c/2 * sum_t F_t (theta - theta*_t)^2``: the penalty's second
        derivative per unit of Fisher (agem's ``lam * F d^2`` has no 1/2)."""
        return self.lam if self.variant == "kirkpatrick" else 2 * self.lam

    # ------------------------------------------------------------------ task events
    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule, task: int) -> None:
        if task in self.tasks:  # never count a task twice (e.g. a task end replayed by a resume)
            return
        theta = parameters_to_vector(pl_module.net.parameters()).detach()
        previous_penalty = self.penalty(theta)
        if self.variant == "kirkpatrick":
            fisher = self.estimate_fisher(pl_module, trainer.datamodule, task)
        else:
            fisher = self.close_running_fisher(theta)
        # Every process computed the same Fisher; the broadcast only guards against
        # floating-point drift between devices (once per task).
        fisher = trainer.strategy.broadcast(fisher, src=0)
        if self.variant == "agem":
            self.clear_penalty()  # one anchor: the new task's replaces the previous one
        self.add_task(fisher, theta)
        self.tasks.append(task)
        stiffness = self.curvature * self.fisher_sum.max().item()
        self._check_stability(trainer, stiffness)
        self._publish(trainer, task, previous_penalty, fisher, stiffness)

    @staticmethod
    def _check_stability(trainer: Trainer, stiffness: float) -> None:
        """Warn when SGD cannot follow the penalty: along a weight with curvature c * F_i
        heavy-ball SGD is stable only while lr * c * F_i < 2 (1 + momentum); beyond, that weight
        oscillates with growing amplitude and the run diverges."""
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                lr, momentum = group.get("lr", 0.0), group.get("momentum", 0.0)
                if lr * stiffness >= 2 * (1 + momentum):
                    rank_zero_warn(
                        f"EWC: the penalty's curvature c * max(Fisher) = {stiffness:.4g} with learning rate {lr:.4g} "
                        f"(momentum {momentum:.4g}) reaches SGD's stability limit lr * c * F < 2 (1 + momentum): the "
                        f"stiffest weights will oscillate and the run may diverge. Lower `lam` or the learning "
                        f"rate."
                    )
                    return

    # ------------------------------------------------------------------ the penalty
    def clear_penalty(self) -> None:
        """Forget every Fisher and anchor (agem keeps only the last task's)."""
        self.fisher_sum = self.fisher_anchor = self.anchor_energy = None
        self._views = None

    def add_task(self, fisher: Tensor, anchor: Tensor) -> None:
        """Accumulate one task's Fisher ``F_t`` and optimum ``theta*_t`` (flat vectors)."""
        if fisher.shape != anchor.shape or fisher.dim() != 1:
            raise ValueError(f"fisher and anchor must be flat vectors of the same size, got shapes "
                             f"{tuple(fisher.shape)} and {tuple(anchor.shape)}")
        dtype = torch.promote_types(anchor.dtype, torch.float32)
        fisher, anchor = fisher.detach().to(dtype), anchor.detach().to(device=fisher.device, dtype=dtype)
        # float64 on the CPU (once per task): some devices (MPS) have no float64.
        energy = (fisher.cpu().double() * anchor.cpu().double().square()).sum()
        if self.fisher_sum is None:
            self.fisher_sum, self.fisher_anchor, self.anchor_energy = fisher.clone(), fisher * anchor, energy
        else:
            device = fisher.device
            self.fisher_sum = self.fisher_sum.to(device) + fisher
            self.fisher_anchor = self.fisher_anchor.to(device) + fisher * anchor
            self.anchor_energy = self.anchor_energy.cpu() + energy
        self._views = None

    def penalty(self, theta: Tensor) -> float | None:
        """``c/2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2`` at a flat ``theta``, None before
        the first task end. Computed in float64 on the CPU (once per task: it syncs)."""
        if self.fisher_sum is None:
            return None
        theta = theta.detach().cpu().double()
        quadratic = theta @ (self.fisher_sum.cpu().double() * theta)
        cross = theta @ self.fisher_anchor.cpu().double()
        value = quadratic - 2 * cross + self.anchor_energy.cpu()
        return 0.5 * self.curvature * value.item()

    def _parameter_views(self, pl_module: LightningModule) -> list[tuple[Tensor, Tensor]]:
        """Per-parameter views of the two flat vectors, on the parameters' device (built once
        after each change of the state: a checkpoint loads the state on the CPU)."""
        params = list(pl_module.net.parameters())
        device = params[0].device
        if self._views is None or self.fisher_sum.device != device:
            self.fisher_sum = self.fisher_sum.to(device)
            self.fisher_anchor = self.fisher_anchor.to(device)
            self.anchor_energy = self.anchor_energy.to("cpu")
            size = sum(p.numel() for p in params)
            if size != self.fisher_sum.numel():
                raise ValueError(f"EWC holds a Fisher of {self.fisher_sum.numel()} parameters but the network "
                                 f"has {size}: was the checkpoint made with another network?")
            self._views = list(zip(_split_like(self.fisher_sum, params), _split_like(self.fisher_anchor, params)))
        return self._views

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """agem: first track the loss gradient's square; then ``grad += c * (F_sum * theta -
        sum_t F_t * theta*_t)``: in place, no host sync."""
        if self.variant == "agem":
            self.track_gradient(pl_module)
        if self.fisher_sum is None or self.lam == 0.0:
            return
        with torch.no_grad():
            for p, (f, a) in zip(pl_module.net.parameters(), self._parameter_views(pl_module)):
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.addcmul_(f, p, value=self.curvature).sub_(a, alpha=self.curvature)

    # ------------------------------------------------------------------ agem's running Fisher
    def track_gradient(self, pl_module: LightningModule) -> None:
        """One optimizer step of the A-GEM code's running Fisher (fc_permute_mnist.py 274-279):
        fold the window into F on every ``fisher_update_every``-th step, then add this step's
        squared loss gradient (``.grad`` before the penalty) to the window."""
        params = list(pl_module.net.parameters())
        if self.running_fisher is None:
            size, dtype = sum(p.numel() for p in params), torch.promote_types(params[0].dtype, torch.float32)
            self.running_fisher = torch.zeros(size, dtype=dtype, device=params[0].device)
            self.fisher_window = torch.zeros_like(self.running_fisher)
        device = params[0].device
        self.running_fisher, self.fisher_window = self.running_fisher.to(device), self.fisher_window.to(device)
        with torch.no_grad():
            if (self.task_steps + 1) % self.fisher_update_every == 0:
                self.running_fisher.mul_(1 - self.fisher_decay).add_(
                    self.fisher_window, alpha=self.fisher_decay / self.fisher_update_every)
                self.fisher_window.zero_()
            for p, w in zip(params, _split_like(self.fisher_window, params)):
                if p.grad is not None:
                    w.addcmul_(p.grad, p.grad)
        self.task_steps += 1

    def close_running_fisher(self, theta: Tensor) -> Tensor:
        """At a task's end (model.py 1252-1261): the running Fisher, min-max normalised, becomes
        the penalty's; the window is emptied and the step count restarts. F itself runs on."""
        fisher = torch.zeros_like(theta) if self.running_fisher is None else min_max(self.running_fisher)
        if self.fisher_window is not None:
            self.fisher_window.zero_()
        self.task_steps = 0
        return fisher

    # ------------------------------------------------------------------ the Fisher
    def fisher_indices(self, dm: ContinualDataModule, task: int) -> Tensor:
        """The task's training examples the Fisher is estimated on (seeded, whole task dataset)."""
        n = len(dm.task_dataset(task, "train"))
        order = torch.randperm(n, generator=generator(dm.resolved_seed, "ewc_fisher", task))
        return order if self.fisher_samples is None else order[: self.fisher_samples]

    def estimate_fisher(self, pl_module: LightningModule, dm: ContinualDataModule, task: int) -> Tensor:
        """Diagonal Fisher of ``task`` at the current weights: a flat vector, mean over examples
        of the squared per-example gradient of the log-likelihood (non-negative)."""
        net = pl_module.net
        device = pl_module.device
        params = {name: outside_inference(p.detach()) for name, p in net.named_parameters()}
        class_mask = getattr(pl_module, "class_mask", None)
        dataset = dm.task_dataset(task, "train")
        indices = self.fisher_indices(dm, task)
        labels = generator(dm.resolved_seed, "ewc_fisher_labels", task)
        total = {name: torch.zeros_like(p) for name, p in params.items()}
        with eval_mode(net), torch.inference_mode(False), torch.no_grad():
            for chunk in indices.split(self.fisher_batch_size):
                x, y, task_ids = (outside_inference(v.to(device)) for v in dataset.__getitems__(chunk))
                mask = class_mask[task_ids] if class_mask is not None else None
                if self.fisher == "true":
                    # Gumbel-max sampling from the predictive distribution; the noise comes from
                    # a CPU generator, so the labels do not depend on the device.
                    logits = mask_logits(net(x), mask)
                    uniform = torch.rand(logits.shape, generator=labels, dtype=torch.float64).to(device)
                    y = (logits.double() - torch.log(-torch.log(uniform))).argmax(dim=1)
                compute = self._squared_grads_vmap if self.backend == "vmap" else self._squared_grads_loop
                for name, value in compute(net, params, x, y, mask).items():
                    total[name] += value
        flat = torch.cat([total[name].flatten() for name, _ in net.named_parameters()]) / len(indices)
        return min_max(flat) if self.fisher_normalization == "min_max" else flat

    @staticmethod
    def _squared_grads_vmap(
        net: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor, mask: Tensor | None
    ) -> dict[str, Tensor]:
        buffers = {name: outside_inference(b.detach()).clone() for name, b in net.named_buffers()}

        def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor, mi: Tensor | None) -> Tensor:
            logits = functional_call(net, (p, buffers), (xi.unsqueeze(0),))
            return F.cross_entropy(mask_logits(logits, mi), yi.unsqueeze(0))

        with torch.enable_grad():
            if mask is None:
                grads = vmap(grad(lambda p, xi, yi: loss(p, xi, yi, None)), in_dims=(None, 0, 0))(params, x, y)
            else:
                grads = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, y, mask)
        return {name: g.square().sum(0) for name, g in grads.items()}

    @staticmethod
    def _squared_grads_loop(
        net: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor, mask: Tensor | None
    ) -> dict[str, Tensor]:
        leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
        buffers = {name: outside_inference(b.detach()).clone() for name, b in net.named_buffers()}
        total = {name: torch.zeros_like(p) for name, p in params.items()}
        with torch.enable_grad():
            for i in range(len(x)):
                logits = functional_call(net, (leaves, buffers), (x[i : i + 1],))
                loss = F.cross_entropy(mask_logits(logits, None if mask is None else mask[i : i + 1]), y[i : i + 1])
                for (name, _), g in zip(leaves.items(), torch.autograd.grad(loss, list(leaves.values()))):
                    total[name] += g.square()
        return total

    # ------------------------------------------------------------------ reporting
    @rank_zero_only
    def _publish(
        self, trainer: Trainer, task: int, previous_penalty: float | None, fisher: Tensor, stiffness: float
    ) -> None:
        metrics = {"ewc/fisher_mean": fisher.mean().item(), "ewc/fisher_max": fisher.max().item(),
                   "ewc/stiffness": stiffness}
        if previous_penalty is not None:
            # The penalty of tasks 1..t-1 at theta*_t: how far training task t pulled the weights
            # from where the earlier tasks want them (the current task adds 0 at its optimum).
            metrics["ewc/penalty"] = previous_penalty
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=task + 1)

    # ------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {"fisher_sum": cpu(self.fisher_sum), "fisher_anchor": cpu(self.fisher_anchor),
                "anchor_energy": cpu(self.anchor_energy), "tasks": list(self.tasks),
                "running_fisher": cpu(self.running_fisher), "fisher_window": cpu(self.fisher_window),
                "task_steps": self.task_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fisher_sum = state_dict["fisher_sum"]
        self.fisher_anchor = state_dict["fisher_anchor"]
        self.anchor_energy = state_dict["anchor_energy"]
        self.tasks = [int(t) for t in state_dict["tasks"]]
        self._views = None
        # absent from checkpoints written before the agem variant existed (kirkpatrick only)
        self.running_fisher = state_dict.get("running_fisher")
        self.fisher_window = state_dict.get("fisher_window")
        self.task_steps = int(state_dict.get("task_steps", 0))
