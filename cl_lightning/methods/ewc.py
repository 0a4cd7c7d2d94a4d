"""EWC: Elastic Weight Consolidation (Kirkpatrick et al., "Overcoming catastrophic forgetting in
neural networks", PNAS 2017), as a callback.

After each task t the weights theta*_t that solved it are kept with a diagonal Fisher information
F_t, estimated on the task's training data. Training on later tasks adds the quadratic penalty

    lam / 2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2

whose gradient, lam * (F_sum * theta - sum_t F_t * theta*_t) with F_sum = sum_t F_t, needs only
two flat vectors however many tasks were seen (and one scalar, sum_t sum_i F_t,i theta*_t,i^2,
for the penalty's value). The gradient is added to ``.grad`` in ``on_before_optimizer_step``:
once per optimizer step (also under gradient accumulation), after mixed precision unscaled the
gradients and before gradient clipping, i.e. exactly as if the penalty were part of the loss.
Under DDP the hook sees gradients already averaged over processes; the penalty gradient is a
function of the weights only, identical everywhere, so every process adds the same term.

Relation to the baseline code of the MC-SGD paper (the A-GEM TF fork, MCSGD_NOTES.md §2): there
"EWC" keeps a running average of squared *batch* gradients during training (decay 0.9 every 10
steps), normalises it to [0, 1] by its global min and max, anchors it at the previous task's
weights only, and penalises ``synap_stgth * sum F (theta - theta*)^2`` (no 1/2). This class is
the original EWC (one Fisher and anchor per task, per-example Fisher at the task's end);
``fisher_normalization="min_max"`` applies the reference's normalisation, and its
``synap_stgth`` corresponds to ``lam = 2 * synap_stgth`` here.
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

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.errors import ConfigError
from cl_lightning.methods.base import TaskAwareCallback
from cl_lightning.models.module import eval_mode, mask_logits
from cl_lightning.seeding import generator

FisherKind = Literal["empirical", "true"]


def _outside_inference(t: Tensor) -> Tensor:
    """A tensor usable by autograd even if it was made under ``torch.inference_mode``."""
    return t.clone() if t.is_inference() else t


class EWC(TaskAwareCallback):
    """Penalises moving the weights that mattered for earlier tasks (diagonal Fisher).

    At the end of every task the Fisher is estimated on ``fisher_samples`` of that task's
    training examples (drawn from the run's seed, from the whole task dataset, so every process
    of a multi-process run uses the same examples), with the network in eval mode (dropout off).
    Each example contributes its own squared log-likelihood gradient (per-example gradients with
    ``torch.func.vmap``). With the research ResNet, whose BatchNorm always normalises with batch
    statistics, "per example" means each example normalised on its own.

    Args:
        lam: lambda, the strength of the penalty ``lam/2 * sum_t sum_i F_t,i (theta_i -
            theta*_t,i)^2``. SGD follows the penalty only while ``lr * lam * max_i F_sum,i <
            2 (1 + momentum)``; as F_sum grows with every task, a too large ``lam`` diverges late
            in a sequence (a warning says so at the task end where the limit is crossed). (The
            baseline code's ``synap_stgth`` s would be ``lam = 2 s`` with ``min_max``.)
        fisher: ``empirical``: squared gradients of the log-likelihood of the true labels;
            ``true``: of labels sampled from the model's own predictive distribution (seeded),
            which is the Fisher information proper.
        fisher_samples: Training examples of the task the Fisher is estimated on, drawn without
            replacement from the seed; null uses the whole task.
        fisher_batch_size: Examples per vectorised per-example-gradient call (memory:
            this many copies of the gradient).
        fisher_normalization: ``none``: the Fisher as estimated; ``min_max``: each task's Fisher
            rescaled to [0, 1] by its min and max over all parameters, as the baseline code did
            (it makes ``lam`` independent of the loss scale).
        backend: ``vmap`` (default, one batched call per chunk) or ``loop`` (one backward per
            example: for networks ``vmap`` cannot batch, and faster for convolutional networks on
            CPU, where ``vmap`` turns convolutions into grouped ones).
    """

    def __init__(
        self,
        lam: NonNegativeFloat = 1.0,
        fisher: FisherKind = "empirical",
        fisher_samples: PositiveInt | None = 1024,
        fisher_batch_size: PositiveInt = 64,
        fisher_normalization: Literal["none", "min_max"] = "none",
        backend: Literal["vmap", "loop"] = "vmap",
    ) -> None:
        if not lam >= 0:
            raise ConfigError(f"lam must be non-negative, got {lam}")
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
        self.lam = float(lam)
        self.fisher = fisher
        self.fisher_samples = fisher_samples
        self.fisher_batch_size = int(fisher_batch_size)
        self.fisher_normalization = fisher_normalization
        self.backend = backend
        # The whole method state: sum_t F_t, sum_t F_t * theta*_t (flat, the layout of
        # parameters_to_vector(net.parameters())), sum_t sum_i F_t,i theta*_t,i^2 (float64 scalar).
        self.fisher_sum: Tensor | None = None
        self.fisher_anchor: Tensor | None = None
        self.anchor_energy: Tensor | None = None
        self.tasks: list[int] = []
        self._views: list[tuple[Tensor, Tensor]] | None = None

    # ------------------------------------------------------------------ task events
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule, task: int) -> None:
        if task in self.tasks:  # never count a task twice (e.g. a task end replayed by a resume)
            return
        dm: ContinualDataModule = trainer.datamodule
        theta = parameters_to_vector(pl_module.net.parameters()).detach()
        previous_penalty = self.penalty(theta)
        fisher = self.estimate_fisher(pl_module, dm, task)
        # Every process estimated the same Fisher on the same examples; the broadcast only guards
        # against floating-point drift between devices (once per task).
        fisher = trainer.strategy.broadcast(fisher, src=0)
        self.add_task(fisher, theta)
        self.tasks.append(task)
        stiffness = self.lam * self.fisher_sum.max().item()
        self._check_stability(trainer, stiffness)
        self._publish(trainer, task, previous_penalty, fisher, stiffness)

    @staticmethod
    def _check_stability(trainer: Trainer, stiffness: float) -> None:
        """Warn when SGD cannot follow the penalty: along a weight with curvature c = lam * F_sum,i
        heavy-ball SGD is stable only while lr * c < 2 (1 + momentum); beyond, that weight
        oscillates with growing amplitude and the run diverges."""
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                lr, momentum = group.get("lr", 0.0), group.get("momentum", 0.0)
                if lr * stiffness >= 2 * (1 + momentum):
                    rank_zero_warn(
                        f"EWC: lam * max(Fisher) = {stiffness:.4g} with learning rate {lr:.4g} (momentum "
                        f"{momentum:.4g}) exceeds SGD's stability limit lr * lam * F < 2 (1 + momentum): the "
                        f"stiffest weights will oscillate and the run may diverge. Lower `lam` or the learning "
                        f"rate."
                    )
                    return

    # ------------------------------------------------------------------ the penalty
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
        """``lam/2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2`` at a flat ``theta``, None before
        the first task end. Computed in float64 on the CPU (once per task: it syncs)."""
        if self.fisher_sum is None:
            return None
        theta = theta.detach().cpu().double()
        quadratic = theta @ (self.fisher_sum.cpu().double() * theta)
        cross = theta @ self.fisher_anchor.cpu().double()
        value = quadratic - 2 * cross + self.anchor_energy.cpu()
        return 0.5 * self.lam * value.item()

    def _parameter_views(self, pl_module: LightningModule) -> list[tuple[Tensor, Tensor]]:
        """Per-parameter views of the two flat vectors, on the parameters' device (built once
        after each change of the state: a checkpoint loads the state on the CPU)."""
        params = list(pl_module.net.parameters())
        device = params[0].device
        if self._views is None or self.fisher_sum.device != device:
            self.fisher_sum = self.fisher_sum.to(device)
            self.fisher_anchor = self.fisher_anchor.to(device)
            self.anchor_energy = self.anchor_energy.to("cpu")
            sizes = [p.numel() for p in params]
            if sum(sizes) != self.fisher_sum.numel():
                raise ValueError(f"EWC holds a Fisher of {self.fisher_sum.numel()} parameters but the network "
                                 f"has {sum(sizes)}: was the checkpoint made with another network?")
            self._views = [
                (f.view_as(p), a.view_as(p))
                for p, f, a in zip(params, self.fisher_sum.split(sizes), self.fisher_anchor.split(sizes))
            ]
        return self._views

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """``grad += lam * (F_sum * theta - sum_t F_t * theta*_t)``: in place, no host sync."""
        if self.fisher_sum is None or self.lam == 0.0:
            return
        with torch.no_grad():
            for p, (f, a) in zip(pl_module.net.parameters(), self._parameter_views(pl_module)):
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.addcmul_(f, p, value=self.lam).sub_(a, alpha=self.lam)

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
        params = {name: _outside_inference(p.detach()) for name, p in net.named_parameters()}
        class_mask = getattr(pl_module, "class_mask", None)
        dataset = dm.task_dataset(task, "train")
        indices = self.fisher_indices(dm, task)
        labels = generator(dm.resolved_seed, "ewc_fisher_labels", task)
        total = {name: torch.zeros_like(p) for name, p in params.items()}
        with eval_mode(net), torch.inference_mode(False), torch.no_grad():
            for chunk in indices.split(self.fisher_batch_size):
                x, y, task_ids = (_outside_inference(v.to(device)) for v in dataset.__getitems__(chunk))
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
        if self.fisher_normalization == "min_max":
            low, high = flat.min(), flat.max()
            flat = (flat - low) / (high - low).clamp_min(torch.finfo(flat.dtype).tiny)
        return flat

    @staticmethod
    def _squared_grads_vmap(
        net: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor, mask: Tensor | None
    ) -> dict[str, Tensor]:
        buffers = {name: _outside_inference(b.detach()).clone() for name, b in net.named_buffers()}

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
        buffers = {name: _outside_inference(b.detach()).clone() for name, b in net.named_buffers()}
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
    def state_dict(self) -> dict[str, Any]:
        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {"fisher_sum": cpu(self.fisher_sum), "fisher_anchor": cpu(self.fisher_anchor),
                "anchor_energy": cpu(self.anchor_energy), "tasks": list(self.tasks)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fisher_sum = state_dict["fisher_sum"]
        self.fisher_anchor = state_dict["fisher_anchor"]
        self.anchor_energy = state_dict["anchor_energy"]
        self.tasks = [int(t) for t in state_dict["tasks"]]
        self._views = None
