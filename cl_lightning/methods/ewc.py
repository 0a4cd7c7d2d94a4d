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

The two Fisher estimators live in :mod:`~cl_lightning.methods.fisher`; this module is the penalty.
One penalty code serves both: the penalty is ``c/2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2``
with curvature scale ``c = lam`` (kirkpatrick) or ``2 lam`` (agem, one term). Its gradient,
``c * (F_sum * theta - sum_t F_t * theta*_t)``, needs only two flat vectors however many tasks
were seen (and one scalar, sum_t sum_i F_t,i theta*_t,i^2, for the penalty's value). It is
added to ``.grad`` in ``on_before_optimizer_step``: once per optimizer step (also under gradient
accumulation), after mixed precision unscaled the gradients and before gradient clipping, i.e.
exactly as if the penalty were part of the loss. The ``agem`` Fisher reads the same ``.grad``
before the penalty is added: the gradient of the (accumulated) batch-mean loss.

Population (docs/populations.md, the rules for methods): the network is a
:class:`~cl_lightning.models.population.Population` of N members stacked along dim 0, and every
piece of EWC's state has one row per member: the two flat vectors are ``[N, P]`` (row k in the
solo ``parameters_to_vector`` layout), the scalar an ``[N]`` vector; ``lam`` (and agem's
``fisher_decay``) may differ between members. Everything is elementwise or reduces along a row
(a member's min and max, its penalty), never over dim 0, and the penalty's gradient of member k is
member k's own ``c_k * (F_sum,k * theta_k - ...)``, so member k of a population is the population of
one with member k's seed and settings, and a NaN in one member reaches no other. The kirkpatrick
Fisher draws member k's examples and sampled labels from member k's seed with the solo run's keys
and takes its per-example gradients on member k's own data, all members in one vmapped call.
Each step's arithmetic is one IEEE rounding per elementwise operation (no fused multiply-add), so a
member's values do not depend on how many members share the kernels.

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
from jsonargparse.typing import NonNegativeFloat, PositiveInt
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.errors import ConfigError
from cl_lightning.methods.base import Method
from cl_lightning.methods.fisher import FisherKind, RunningFisher, example_fisher, fisher_indices, min_max, split_like
from cl_lightning.models.member_settings import FractionOpenBelow, PerMember
from cl_lightning.models.member_sgd import member_view

Variant = Literal["kirkpatrick", "agem"]


class EWC(Method):
    """Penalises moving the weights that mattered for earlier tasks (diagonal Fisher), per member.

    ``variant="kirkpatrick"`` keeps one Fisher and anchor per task and sums the penalties. At the
    end of every task the Fisher is estimated on ``fisher_samples`` of that task's training
    examples (member k's drawn from its seed, from its whole task dataset, so every process of a
    multi-process run uses the same examples), with the network in eval mode (dropout off). Each
    example contributes its own squared log-likelihood gradient (per-example gradients with
    ``torch.func.vmap``, over the members and their examples at once). With the research ResNet,
    whose BatchNorm always normalises with batch statistics, "per example" means each example
    normalised on its own.

    ``variant="agem"`` is the A-GEM code's EWC (module docstring): one anchor, the last task's
    weights; the Fisher a running average of squared mini-batch gradients during training,
    min-max normalised (per member) at the task's end. Costs a few elementwise operations on the
    ``[N, P]`` gradients per step.

    Args:
        lam: lambda, the penalty's strength, one value for every member or one per member:
            ``lam/2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2`` (kirkpatrick) or ``lam * sum_i
            F_i (theta_i - theta*_i)^2`` (agem, the A-GEM code's ``synap_stgth`` in its own form).
            SGD follows the penalty only while ``lr * c * max_i F_i < 2 (1 + momentum)`` with
            ``c = lam`` (kirkpatrick, F summed over tasks: it grows with every task) or ``2 lam``
            (agem, max F = 1); beyond, the stiffest weights oscillate with growing amplitude (a
            warning names the members at the task end where the limit is crossed).
        variant: ``kirkpatrick`` or ``agem`` (see above).
        fisher: (kirkpatrick) ``empirical``: squared gradients of the log-likelihood of the true
            labels; ``true``: of labels sampled from the model's own predictive distribution
            (seeded), which is the Fisher information proper.
        fisher_samples: (kirkpatrick) Training examples of the task the Fisher is estimated on,
            drawn without replacement from each member's seed; null uses the whole task.
        fisher_batch_size: (kirkpatrick) Examples per member and vectorised
            per-example-gradient call (memory: N times this many copies of the gradient).
        fisher_normalization: (kirkpatrick) ``none``: the Fisher as estimated; ``min_max``: each
            member's Fisher of each task rescaled to [0, 1] by its min and max over all
            parameters (agem always normalises).
        backend: (kirkpatrick) ``vmap`` (default, one batched call per chunk over members and
            examples) or ``loop`` (one call per example position, batched over the members only:
            less memory, and faster for convolutional networks on CPU, where ``vmap`` over the
            examples turns convolutions into grouped ones).
        fisher_decay: (agem) ``d`` of ``F <- (1 - d) F + d * mean of the window's squared
            gradients``: the weight of the newest window (the A-GEM code's ``fisher_ema_decay``,
            0.9), one value or one per member.
        fisher_update_every: (agem) optimizer steps per window (``fisher_update_after``: 10 in
            the A-GEM code's MNIST scripts, 50 in its CIFAR script), shared by the members.
    """

    def __init__(
        self,
        lam: PerMember[NonNegativeFloat] = 1.0,
        variant: Variant = "kirkpatrick",
        fisher: FisherKind = "empirical",
        fisher_samples: PositiveInt | None = 1024,
        fisher_batch_size: PositiveInt = 64,
        fisher_normalization: Literal["none", "min_max"] = "none",
        backend: Literal["vmap", "loop"] = "vmap",
        fisher_decay: PerMember[FractionOpenBelow] = 0.9,
        fisher_update_every: PositiveInt = 10,
    ) -> None:
        super().__init__(lam=lam, fisher_decay=fisher_decay)
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
        if fisher_update_every < 1:
            raise ConfigError(f"fisher_update_every must be a positive integer, got {fisher_update_every}")
        self._penalised = max(lam if isinstance(lam, list) else [lam]) > 0  # else the penalty adds nothing: skip it
        self.variant = variant
        self.fisher = fisher
        self.fisher_samples = fisher_samples
        self.fisher_batch_size = int(fisher_batch_size)
        self.fisher_normalization = fisher_normalization
        self.backend = backend
        self.fisher_update_every = int(fisher_update_every)
        # The penalty's state, one row per member: sum_t F_t, sum_t F_t * theta*_t ([N, P], the
        # layout of Population.flat()), sum_t sum_i F_t,i theta*_t,i^2 ([N] float64).
        self.fisher_sum: Tensor | None = None
        self.fisher_anchor: Tensor | None = None
        self.anchor_energy: Tensor | None = None
        self.tasks: list[int] = []
        self._views: list[tuple[Tensor, Tensor]] | None = None
        #: agem's running Fisher (its [N, P] average and window, the optimizer steps of the task).
        self.running = RunningFisher(self.fisher_update_every)

    # ------------------------------------------------------------------ per-member settings
    def curvature(self, n: int) -> Tensor:
        """``c`` of the penalty ``c/2 * sum_t F_t (theta - theta*_t)^2`` per member, ``[N]``
        float64: the penalty's second derivative per unit of Fisher (agem's ``lam * F d^2`` has no
        1/2)."""
        lam = self.settings(n)["lam"]
        return lam if self.variant == "kirkpatrick" else 2 * lam

    def decay(self, n: int) -> Tensor:
        """agem's ``fisher_decay`` per member, ``[N]`` float64."""
        return self.settings(n)["fisher_decay"]

    # ------------------------------------------------------------------ task events
    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule, task: int) -> None:
        if task in self.tasks:  # never count a task twice (e.g. a task end replayed by a resume)
            return
        theta = pl_module.population.flat()
        previous_penalty = self.penalty(theta)
        if self.variant == "kirkpatrick":
            fisher = self.estimate_fisher(pl_module, trainer.datamodule, task)
        else:
            fisher = self.running.close(theta)
        # Every process computed the same Fisher; the broadcast only guards against
        # floating-point drift between devices (once per task).
        fisher = trainer.strategy.broadcast(fisher, src=0)
        if self.variant == "agem":
            self.clear_penalty()  # one anchor: the new task's replaces the previous one
        self.add_task(fisher, theta)
        self.tasks.append(task)
        stiffness = self.curvature(len(theta)) * self.fisher_sum.amax(dim=1).cpu().double()
        self._check_stability(trainer, pl_module, stiffness)
        self._publish(trainer, pl_module, task, previous_penalty, fisher, stiffness)

    @staticmethod
    def _check_stability(trainer: Trainer, pl_module: LightningModule, stiffness: Tensor) -> None:
        """Warn when SGD cannot follow a member's penalty: along a weight with curvature c * F_i
        heavy-ball SGD is stable only while lr * c * F_i < 2 (1 + momentum); beyond, that weight
        oscillates with growing amplitude and the member diverges."""
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                lr = torch.as_tensor(group.get("lr", 0.0)).detach().cpu().double()
                momentum = torch.as_tensor(group.get("momentum", 0.0)).detach().cpu().double()
                unstable = (lr * stiffness >= 2 * (1 + momentum)).nonzero().flatten().tolist()
                if unstable:
                    seeds = [pl_module.seeds[k] for k in unstable]
                    worst = unstable[int(stiffness[unstable].argmax())]
                    lr_k, momentum_k = lr.expand_as(stiffness)[worst], momentum.expand_as(stiffness)[worst]
                    rank_zero_warn(
                        f"EWC: for the member(s) of seed(s) {seeds}, the penalty's curvature c * max(Fisher) (up to "
                        f"{stiffness[worst].item():.4g}, learning rate {lr_k.item():.4g}, momentum {momentum_k.item():.4g}) reaches SGD's "
                        f"stability limit lr * c * F < 2 (1 + momentum): the stiffest weights will oscillate and "
                        f"those members may diverge. Lower their `lam` or learning rate."
                    )
                    return

    # ------------------------------------------------------------------ the penalty
    def clear_penalty(self) -> None:
        """Forget every Fisher and anchor (agem keeps only the last task's)."""
        self.fisher_sum = self.fisher_anchor = self.anchor_energy = None
        self._views = None

    def add_task(self, fisher: Tensor, anchor: Tensor) -> None:
        """Accumulate one task's Fisher ``F_t`` and optimum ``theta*_t`` (``[N, P]``, row k member k's)."""
        if fisher.shape != anchor.shape or fisher.dim() != 2:
            raise ValueError(f"fisher and anchor must be [N, P] matrices of the same shape, got shapes "
                             f"{tuple(fisher.shape)} and {tuple(anchor.shape)}")
        dtype = torch.promote_types(anchor.dtype, torch.float32)
        fisher, anchor = fisher.detach().to(dtype), anchor.detach().to(device=fisher.device, dtype=dtype)
        # float64 on the CPU (once per task): some devices (MPS) have no float64.
        energy = (fisher.cpu().double() * anchor.cpu().double().square()).sum(dim=1)
        if self.fisher_sum is None:
            self.fisher_sum, self.fisher_anchor, self.anchor_energy = fisher.clone(), fisher * anchor, energy
        else:
            device = fisher.device
            self.fisher_sum = self.fisher_sum.to(device) + fisher
            self.fisher_anchor = self.fisher_anchor.to(device) + fisher * anchor
            self.anchor_energy = self.anchor_energy.cpu() + energy
        self._views = None

    def penalty(self, theta: Tensor) -> Tensor | None:
        """``c/2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2`` of each member at ``theta``
        ``[N, P]``: an ``[N]`` float64 tensor, None before the first task end. Computed in float64
        on the CPU (once per task: it syncs)."""
        if self.fisher_sum is None:
            return None
        theta = theta.detach().cpu().double()
        quadratic = (theta * self.fisher_sum.cpu().double() * theta).sum(dim=1)
        cross = (theta * self.fisher_anchor.cpu().double()).sum(dim=1)
        value = quadratic - 2 * cross + self.anchor_energy.cpu()
        return 0.5 * self.curvature(len(theta)) * value

    def _parameter_views(self, params: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Per-parameter ``[N, ...]`` views of the two ``[N, P]`` state tensors, on the parameters'
        device (built once after each change of the state: a checkpoint loads it on the CPU)."""
        device = params[0].device
        if self._views is None or self.fisher_sum.device != device:
            self.fisher_sum = self.fisher_sum.to(device)
            self.fisher_anchor = self.fisher_anchor.to(device)
            self.anchor_energy = self.anchor_energy.to("cpu")
            shape = (params[0].shape[0], sum(p[0].numel() for p in params))
            if tuple(self.fisher_sum.shape) != shape:
                raise ValueError(f"EWC holds a Fisher of shape {tuple(self.fisher_sum.shape)} (members, parameters) but the "
                                 f"population has {shape}: was the checkpoint made with another network or population?")
            self._views = list(zip(split_like(self.fisher_sum, params), split_like(self.fisher_anchor, params)))
        return self._views

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """agem: first track the loss gradient's square; then ``grad += c * (F_sum * theta -
        sum_t F_t * theta*_t)`` per member: in place, no host sync."""
        params = list(pl_module.population.stacked.parameters())
        if self.variant == "agem":
            self.track_gradient(params)
        if self.fisher_sum is None or not self._penalised:
            return
        curvature = self.on_device("curvature", params[0], self.curvature)
        with torch.no_grad():
            for p, (f, a) in zip(params, self._parameter_views(params)):
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(member_view(curvature, p) * (f * p - a))

    # ------------------------------------------------------------------ the Fisher (methods/fisher.py)
    def track_gradient(self, params: list[Tensor]) -> None:
        """agem: one optimizer step of the running Fisher (``.grad`` before the penalty), each member
        folding its window in with its own ``fisher_decay``."""
        self.running.track(
            params,
            keep=lambda like: self.on_device("fisher_keep", like, lambda n: 1 - self.decay(n)),
            gain=lambda like: self.on_device("fisher_gain", like, lambda n: self.decay(n) / self.fisher_update_every),
        )

    def fisher_indices(self, dm: ContinualDataModule, task: int) -> Tensor:
        """kirkpatrick: ``[N, m]`` positions in each member's training set of ``task`` of its Fisher's examples."""
        return fisher_indices(dm, task, self.fisher_samples)

    def estimate_fisher(self, pl_module: LightningModule, dm: ContinualDataModule, task: int) -> Tensor:
        """kirkpatrick: the diagonal Fisher of ``task`` at the current weights, ``[N, P]`` (normalised as
        ``fisher_normalization`` says)."""
        flat = example_fisher(pl_module, dm, task, self.fisher_indices(dm, task), self.fisher, self.fisher_batch_size,
                              self.backend)
        return min_max(flat) if self.fisher_normalization == "min_max" else flat

    # ------------------------------------------------------------------ reporting
    def _publish(
        self, trainer: Trainer, pl_module: LightningModule, task: int, previous_penalty: Tensor | None, fisher: Tensor,
        stiffness: Tensor,
    ) -> None:
        """Log each member's Fisher, stiffness and penalty of the task into the member's own logger
        (a stopped member's are not results)."""
        values = {"ewc/fisher_mean": fisher.mean(dim=1), "ewc/fisher_max": fisher.amax(dim=1), "ewc/stiffness": stiffness}
        if previous_penalty is not None:
            # The penalty of tasks 1..t-1 at theta*_t: how far training task t pulled the weights
            # from where the earlier tasks want them (the current task adds 0 at its optimum).
            values["ewc/penalty"] = previous_penalty
        self.log_members(trainer, pl_module, {name: value.double() for name, value in values.items()}, task + 1)

    # ------------------------------------------------------------------ checkpoint
    @override
    def method_state(self) -> dict[str, Any]:
        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {"fisher_sum": cpu(self.fisher_sum), "fisher_anchor": cpu(self.fisher_anchor),
                "anchor_energy": cpu(self.anchor_energy), "tasks": list(self.tasks),
                **self.running.state_dict()}

    @override
    def load_method_state(self, state: dict[str, Any]) -> None:
        self.fisher_sum = state["fisher_sum"]
        self.fisher_anchor = state["fisher_anchor"]
        self.anchor_energy = state["anchor_energy"]
        self.tasks = [int(t) for t in state["tasks"]]
        self._views = None
        self.running.load_state_dict(state)
