"""The LightningModule shared by every method: a population of networks, cross-entropy, per-task
accuracy and the paper's per-task SGD. Continual-learning methods are callbacks and never branch in
here.

A run trains a population of N >= 1 members (a plain run is a population of one): stacked copies
of one network (:class:`~cl_lightning.models.population.Population`), each with its own seed and
its own settings of everything that changes no shape (learning rate and its per-task decay,
momentum, weight decay, dropout rate). Batches are ``[N, B, ...]``; the loss Lightning
backpropagates is the sum of the members' mean cross-entropies, so every member gets exactly its own
gradient, and :class:`~cl_lightning.models.member_sgd.MemberSGD` steps each with its own settings.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from cl_lightning.errors import CheckpointError, ConfigError
from cl_lightning.member_outputs import log_members
from cl_lightning.metrics.task_accuracy import TaskAccuracy, accuracy_key
from cl_lightning.models.member_settings import DropoutRate, PerMember, member_list, member_values, per_member_settings
from cl_lightning.models.member_sgd import MemberSGD, MemberTaskLR, member_view
from cl_lightning.models.nets import MLP, ResNet18
from cl_lightning.models.population import Population, fresh_copy, init_member, member_rows
from cl_lightning.seeding import run_seed

#: Logit given to classes outside the task (split benchmarks), as the research code (-10e10).
MASKED_LOGIT = -1e11
#: Training-mode forwards of one step get dropout masks from (member, site, STREAMS * step + stream):
#: the step's own forward is stream 0, a method's extra forward in the same step takes 1..STREAMS-1.
STREAMS = 4
#: The settings members may differ in that the optimizer applies (see ``ContinualModule``'s Args).
SGD_SETTINGS = ("lr", "momentum", "lr_decay", "lr_floor", "weight_decay")


def mask_logits(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Give the classes outside each example's task (``mask`` False) the logit ``MASKED_LOGIT``:
    zero probability and zero gradient. ``mask`` broadcasts against ``logits``; None: no mask."""
    return logits if mask is None else logits.masked_fill(~mask, MASKED_LOGIT)


class ContinualModule(LightningModule):
    """A population of networks + loss + per-task evaluation for a task sequence.

    Every setting below that takes a list takes one value per member (in the order of ``seeds``);
    a single value is every member's.

    Args:
        net: The network, ``cl_lightning.models.nets.MLP`` or ``...nets.ResNet18`` (the paper's); it
            maps images to logits over all classes. Typed with these two so that the command line
            offers them, not every ``torch.nn.Module``; a new network joins the union (or
            subclasses one of them). Each member is a copy of it with initial weights drawn from
            the member's seed alone.
        lr: SGD learning rate of task 1.
        momentum: SGD momentum. The momentum buffer is cleared at each task start, as the paper's
            code re-created the optimizer for every task.
        lr_decay: Per-task decay: task t trains with max(lr_floor, lr * lr_decay^(t-1)).
        lr_floor: Lowest learning rate of the per-task decay.
        weight_decay: SGD weight decay (the paper used none).
        dropout: Dropout rate of every dropout layer of the network, per member; None keeps the
            network's own.
        seeds: The members' seeds; None takes them from the datamodule (``data.seeds``, or its
            ``seed`` / ``seed_everything``). The command line links this to ``data.seeds``.
        population_member: In a member's own config.yaml (written by its population): its place k
            in the population, so that evaluating it with the population's checkpoint (``test``)
            takes member k's weights. None: the member of the same seed (ambiguous when a seed
            repeats). Ignored without such a checkpoint.
    """

    def __init__(
        self,
        net: MLP | ResNet18,
        lr: PerMember[PositiveFloat] = 0.1,
        momentum: PerMember[NonNegativeFloat] = 0.8,
        lr_decay: PerMember[PositiveFloat] = 1.0,
        lr_floor: PerMember[NonNegativeFloat] = 0.0005,
        weight_decay: PerMember[NonNegativeFloat] = 0.0,
        dropout: PerMember[DropoutRate] | None = None,
        seeds: Sequence[int] | None = None,
        population_member: NonNegativeInt | None = None,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters()
        if isinstance(self.hparams.get("net"), nn.Module):
            # Built in Python rather than from a config: the weights are in the state_dict and a
            # module object in the hparams would not load with `weights_only=True`. (LightningCLI
            # records the net's class_path/init_args here instead, which is what we keep.)
            del self.hparams["net"]
        # The network every member is a fresh copy of; kept out of the module's submodules (it is
        # never trained) so that it is not in the state_dict.
        object.__setattr__(self, "_template", net)
        for name, kind in per_member_settings(type(self)).items():
            if self.hparams[name] is not None:
                member_list(self.hparams[name], f"model.{name}", kind)
        self._build([int(seed) for seed in seeds] if seeds is not None else [run_seed(None)])
        self.val_accuracy: TaskAccuracy | None = None
        self.test_accuracy: TaskAccuracy | None = None
        #: The latest evaluation's ``[N, T]`` accuracies (%) per stage ("val", "test"), NaN for tasks
        #: not evaluated; combined over all processes.
        self.task_accuracy: dict[str, Tensor] = {}

    def _build(self, seeds: list[int]) -> None:
        """Make the population of ``seeds`` and check every per-member setting against its size."""
        n = len(seeds)
        if n == 0:
            raise ConfigError("model.seeds is empty: give at least one seed")
        hp = self.hparams
        #: Each member's dropout rate (``model.dropout``), or None: the network's own.
        self.dropout_rates = self._dropout_rates(hp.get("dropout"), n)
        self.population = Population([self._with_member_dropout(init_member(lambda: fresh_copy(self._template), seed), k)
                                      for k, seed in enumerate(seeds)], seeds)
        self.seeds = tuple(seeds)
        self.sgd = {name: member_values(hp[name], n, f"model.{name}") for name in SGD_SETTINGS}
        #: Members the divergence guard stopped: frozen (lr 0, no loss) for the rest of the run.
        self.register_buffer("failed", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("members", torch.arange(n), persistent=False)
        # Split benchmarks: [N, T, num_classes] mask of each member's task classes, set in `setup`
        # from the datamodule (it depends on the seeds). Non-persistent: it follows the module's device.
        self.register_buffer("class_mask", None, persistent=False)

    @property
    def size(self) -> int:
        """N, the number of members."""
        return self.population.size

    def member_net(self, k: int) -> nn.Module:
        """Member ``k`` as a plain network of the configured class (a copy of its weights and buffers,
        with its dropout rate): to export or analyse one member outside the population."""
        net = copy.deepcopy(self._template)
        wanted = net.state_dict()
        net.load_state_dict({name: value[k] for name, value in self.population.stacked.state_dict().items()
                             if name in wanted})
        return self._with_member_dropout(net, k).to(self.device)

    def _dropout_rates(self, dropout: float | Sequence[float] | None, n: int) -> Tensor | None:
        """``model.dropout`` as one rate per member, or None to keep the network's own. Refused when a
        rate is not a probability, or when the network has no dropout layer to set (the setting would
        silently do nothing)."""
        if dropout is None:
            return None
        if not any(isinstance(module, nn.Dropout) for module in self._template.modules()):
            raise ConfigError(f"model.dropout is {dropout} but the network {type(self._template).__name__} has no "
                              "dropout layer: remove model.dropout, or use a network built with dropout layers")
        return member_values(dropout, n, "model.dropout")

    def _with_member_dropout(self, net: nn.Module, k: int) -> nn.Module:
        """``net`` with member ``k``'s dropout rate in every dropout layer (when ``model.dropout`` is set)."""
        if self.dropout_rates is not None:
            for module in net.modules():
                if isinstance(module, nn.Dropout):
                    module.p = float(self.dropout_rates[k])
        return net

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Evaluate members of a population's checkpoint: a module of some of its seeds (a member's own
        config.yaml, with the population's checkpoint) takes their weights. Resuming needs the whole
        population: every method's state has all its members."""
        saved = list((checkpoint.get("hyper_parameters") or {}).get("seeds") or [])
        if not saved or saved == list(self.seeds):
            return
        if not set(self.seeds) <= set(saved):
            return  # not members of it: the datamodule's check of the seeds says so, naming both
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            raise CheckpointError(f"the checkpoint is of a population of seeds {saved}; resume the whole population "
                                  "with its own config.yaml (in the checkpoint's run folder), not one member's")
        checkpoint["state_dict"] = take_members(checkpoint["state_dict"], saved, self.seeds, self.hparams.get("population_member"))
        checkpoint["hyper_parameters"]["seeds"] = list(self.seeds)

    def __setattr__(self, name: str, value) -> None:
        # Lightning records the running hook's name before every hook call, about 45 times per
        # training step. It is a plain string, so skip nn.Module's parameter/buffer/submodule
        # bookkeeping, which made these assignments ~5 % of an MLP step at batch size 10.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ wiring
    @override
    def setup(self, stage: str) -> None:
        """Take the members and the task structure from the datamodule (derived from the seeds)."""
        dm = self.trainer.datamodule
        if list(dm.seeds) != list(self.seeds):
            if self.hparams.get("seeds") is not None or dm.size > 1:
                # (a population is never rebuilt here: under ddp_spawn the parent's module, which runs
                # no setup, would not fit the weights its processes send back)
                raise ConfigError(f"model.seeds {self.hparams.get('seeds')} differ from data.seeds {list(dm.seeds)}: the "
                                  "members must be the same (the command line links them; in Python pass the same list)")
            self._build(list(dm.seeds))  # the datamodule's seed (data.seed): nothing was trained yet
        self.hparams["seeds"] = list(self.seeds)  # a checkpoint rebuilds the same members
        self.class_mask = dm.class_mask
        self.val_accuracy = TaskAccuracy(dm.num_tasks, self.size)
        self.test_accuracy = TaskAccuracy(dm.num_tasks, self.size)

    @override
    def forward(self, x: Tensor, task: Tensor | None = None, stream: int = 0) -> Tensor:
        """Logits ``[N, B, C]`` of the members on their batches ``x`` ``[N, B, ...]``; on split
        benchmarks the classes outside each example's task (``task`` ``[N, B]``) are masked out.

        In training mode the dropout masks are keyed by (member seed, site, ``STREAMS * step +
        stream``): a method's extra training-mode forward in the same step passes its own ``stream``
        (1 .. ``STREAMS - 1``) for fresh masks.
        """
        logits = self.population(x, step=STREAMS * self.global_step + stream)
        return logits if task is None else mask_logits(logits, self.task_mask(task))

    def task_mask(self, task: Tensor) -> Tensor | None:
        """``[N, B, C]``: True for the classes of each example's task (``task`` ``[N, B]``), for its member
        (members may order the classes differently); None where every class is every task's (no masks)."""
        return None if self.class_mask is None else self.class_mask[self.members.unsqueeze(1), task]

    # ------------------------------------------------------------------ training
    def member_losses(self, batch: tuple[Tensor, Tensor, Tensor], stream: int = 0) -> Tensor:
        """``[N]``: each member's mean cross-entropy on its ``(x, y, task)`` batch."""
        return self._losses_and_logits(batch, stream)[0]

    def _losses_and_logits(self, batch: tuple[Tensor, Tensor, Tensor], stream: int) -> tuple[Tensor, Tensor]:
        """:meth:`member_losses` and the logits before the task's class mask, ``[N, B, C]``."""
        x, y, task = batch
        logits = self(x, stream=stream)
        losses = F.cross_entropy(mask_logits(logits, self.task_mask(task)).flatten(0, 1), y.flatten(), reduction="none")
        return losses.view_as(y).mean(dim=1), logits

    def loss(self, batch: tuple[Tensor, Tensor, Tensor], stream: int = 0) -> Tensor:
        """The sum of the members' mean cross-entropies: its gradient is each member's own gradient
        in the member's slice of the stacked parameters. Also used by methods that take gradients on
        other batches (A-GEM's reference gradient, ER's replay). A member the guard stopped adds
        nothing (its loss may be NaN)."""
        return total(self.member_losses(batch, stream), self.failed)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """The loss Lightning backpropagates, with what the callbacks read in ``on_train_batch_end``: each
        member's loss (the divergence guard) and the logits before the class mask (DER++ keeps them)."""
        losses, logits = self._losses_and_logits(batch, 0)
        # Only on the steps the logger writes (every `log_every_n_steps`): `self.log` costs about
        # as much as a whole MLP step at batch size 10, and the other steps' values are never shown.
        if (self.global_step + 1) % max(self.trainer.log_every_n_steps, 1) == 0:
            if self.size == 1:
                self.log("train/loss", losses[0].detach())
            else:  # each member's into its own logger (one read of the [N] losses)
                log_members(self.trainer, [{"train/loss": loss} for loss in losses.detach().tolist()], self.global_step)
        return {"loss": total(losses, self.failed), "member_losses": losses.detach(), "logits": logits.detach()}

    def task_lr(self, epoch: int) -> Tensor:
        """``[N]``: each member's learning rate in ``epoch``'s task (0 for a stopped member)."""
        dm = self.trainer.datamodule
        lr = MemberTaskLR(self.sgd["lr"], self.sgd["lr_decay"], self.sgd["lr_floor"], dm.epochs_per_task)(epoch)
        return lr.masked_fill(self.failed.cpu(), 0.0)

    @override
    def configure_optimizers(self) -> Optimizer:
        return MemberSGD(self.parameters(), lr=self.task_lr(self.current_epoch), momentum=self.sgd["momentum"],
                         weight_decay=self.sgd["weight_decay"])

    @override
    def on_train_epoch_start(self) -> None:
        # A fresh SGD per task, as the research code: clear the momentum buffers and set each
        # member's lr of the task. (Lightning does not re-run this hook when resuming mid-epoch; the
        # checkpoint's buffers and lr are kept then.)
        if self.trainer.datamodule.is_task_start(self.current_epoch):
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()
                optimizer.set_lr(self.task_lr(self.current_epoch))

    def stop_members(self, members: Tensor) -> None:
        """Freeze the members where ``members`` (``[N]`` bool) is True for the rest of the run: lr 0
        from now on and no loss. Their weights stay as they are; nothing of theirs reaches the others."""
        self.failed |= members.to(self.failed.device)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["lr"].masked_fill(self.failed.to(group["lr"].device), 0.0)

    @override
    def configure_gradient_clipping(self, optimizer: Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """``--trainer.gradient_clip_val`` per member: each member's gradient norm (over all of its
        parameters) is clipped on its own, so one member's gradients never scale another's."""
        if not gradient_clip_val:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch._foreach_clamp_min_(grads, -gradient_clip_val)
            torch._foreach_clamp_max_(grads, gradient_clip_val)
            return
        norms = torch.stack([g.flatten(1).pow(2).sum(dim=1) for g in grads]).sum(dim=0).sqrt()
        # torch.nn.utils.clip_grad_norm_'s coefficient, per member
        scale = (gradient_clip_val / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, [member_view(scale, g) for g in grads])

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, metric: TaskAccuracy, batch: tuple[Tensor, Tensor, Tensor]) -> None:
        x, y, task = batch
        metric.update(self(x, task).argmax(dim=2), y, task)

    @override
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(self.val_accuracy, batch)

    @override
    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(self.test_accuracy, batch)

    def _keep(self, metric: TaskAccuracy, stage: str) -> None:
        """Keep and log each member's accuracies of the evaluation that just ended."""
        # compute() combines all processes; a stopped member's accuracies are not results
        accuracy = metric.compute().cpu()
        self.task_accuracy[stage] = accuracy = accuracy.masked_fill(self.failed.cpu().unsqueeze(1), float("nan"))
        metric.reset()
        rows = [{accuracy_key(stage, t): acc for t, acc in enumerate(row) if not math.isnan(acc)} for row in accuracy.tolist()]
        if self.size == 1:
            for key, acc in rows[0].items():
                # The metric already combined all processes, so the mean over them is the value itself.
                self.log(key, acc, sync_dist=True)
        else:
            log_members(self.trainer, rows, self.global_step)

    @override
    def on_validation_epoch_end(self) -> None:
        self._keep(self.val_accuracy, "val")

    @override
    def on_test_epoch_end(self) -> None:
        self._keep(self.test_accuracy, "test")


def take_members(state_dict: dict[str, Tensor], saved: Sequence[int], seeds: Sequence[int],
                 member: int | None = None) -> dict[str, Tensor]:
    """The state dict of the members with ``seeds`` out of ``state_dict``, a module's whose members had
    the seeds ``saved`` (every population tensor has the members on dim 0); ``member``: the place of
    the one member wanted (see :func:`~cl_lightning.models.population.member_rows`)."""
    index = torch.tensor(member_rows(saved, seeds, member))
    return {key: value[index] if key.startswith("population.") or key == "failed" else value
            for key, value in state_dict.items()}


def total(losses: Tensor, failed: Tensor) -> Tensor:
    """The sum of the members' ``losses`` ``[N]`` without those of ``failed`` members (a NaN there
    must not reach the others, nor the logged loss)."""
    return torch.where(failed, torch.zeros_like(losses), losses).sum()
