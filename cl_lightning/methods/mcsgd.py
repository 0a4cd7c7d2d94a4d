"""MC-SGD: Mode-Connectivity SGD (Mirzadeh et al., "Linear Mode Connectivity in Multitask and
Continual Learning", ICLR 2021), as a callback.

Notation of the paper: w_hat_t is the "continual" solution of plain SGD on task t; w_bar_t is
the MC-SGD solution, the model that is kept and evaluated. After task t >= 2 (t is 1-based in
the paper, 0-based in the code), MC-SGD looks for a w_bar_t such that the loss stays low
along two line segments:

- line A, from w_bar_{t-1} to w_bar_t, on the episodic memory of tasks 1..t (the previous
  tasks' solution must stay connected);
- line B, from w_hat_t to w_bar_t, on a fixed subset of task t's training data (the new
  task's solution must stay connected).

It starts at w_bar_{t-1} + alpha0 (w_hat_t - w_bar_{t-1}) and runs ``epochs`` of SGD (fresh
optimizer, momentum, no decay). The research code ran two versions of that SGD (``steps``):

- ``minibatch`` (CL-LinearModeConnectivity 137c219 on, ``core/train_methods.py``
  ``train_task_LMC_offline``; Permuted MNIST and Split CIFAR-100): step i of an epoch sums the
  line gradients of memory batch i (one task's memory) and subset batch i while both exist,
  then whichever remains;
- ``full_batch`` (177f216, ``core/train_methods.py`` lines 77-85; Rotated MNIST): one step per
  epoch on the line gradients over the whole memory plus the whole subset, each line's loss
  the sum over its batches of the batch-mean loss divided by the line's number of examples
  (``core/mode_connectivity.py:get_clf_loss``).

Dropout is off. The line gradient is :class:`~cl_lightning.methods.line_gradient.LineGradient`.

Population (docs/populations.md, the rules for methods): the network is a
:class:`~cl_lightning.models.population.Population` of N members stacked along dim 0, and every
piece of MC-SGD's state has one row per member: w_hat_t and w_bar_t are ``[N, P]`` (row k in the
solo ``parameters_to_vector`` layout), the w_hat accuracy matrix ``[N, T, T]``, the episodic memory
and the current task's subset are member k's own draws from its seed (the solo run's keys
``episodic_memory``, ``mcsgd_memory_order``, ``mcsgd_subset``; the shuffle of a class-balanced
subset has its own key, ``mcsgd_subset_order``). Each consolidation step takes every member's line
gradients in vmapped calls over the members and steps every member with its own ``alpha0``, ``lr``
and ``momentum`` (:class:`~cl_lightning.models.member_sgd.MemberSGD`). Nothing reduces over the
members, so member k is the population of one with member k's seed and
settings, and a NaN in one member reaches no other.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from typing_extensions import override

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.data.members import Batch
from cl_lightning.errors import ConfigError
from cl_lightning.evaluation.evaluate import task_accuracies
from cl_lightning.methods.base import Method
from cl_lightning.methods.line_gradient import LineGradient
from cl_lightning.methods.memory import DrawOptions, EpisodicMemory, ExampleDraw
from cl_lightning.metrics.continual import average_accuracy
from cl_lightning.models.member_settings import PerMember
from cl_lightning.models.member_sgd import MemberSGD
from cl_lightning.models.params import eval_mode
from cl_lightning.models.population import Population
from cl_lightning.rundir import solution_path, write_matrix
from cl_lightning.seeding import generator

SUBSET_OPTIONS = DrawOptions("MC-SGD's subset of the current task", "line B needs examples of the current task",
                             "subset_size", "subset_per_class", "subset_replacement")

Steps = Literal["minibatch", "full_batch"]

#: One optimizer step of the consolidation: (line, batch index, the batch's share of the step's
#: examples on that line) for each batch whose line gradient the step sums.
Step = list[tuple[Literal["memory", "subset"], int, float]]

#: ``(x [N, B, ...], y [N, B], logit mask [N, B, C] or None)``: a batch as the line gradient takes it.
LineBatch = tuple[Tensor, Tensor, Tensor | None]


class MCSGD(Method):
    """Consolidates each task's solution with the previous ones along linear paths, per member.

    ``alpha0``, ``lr`` and ``momentum`` take one value for every member or a list with one value
    per member (in the order of the seeds); the other settings are shared.

    Args:
        alpha0: Start of the consolidation on the segment w_bar_{t-1} -> w_hat_t (research
            code: 0.1 rotated MNIST, 0.25 permuted MNIST, 0.01 split CIFAR-100), in [0, 1].
        num_segments: K; the line gradient is taken at the K+1 points j/K, j = 0..K.
        lr: Learning rate of the consolidation SGD.
        momentum: Momentum of the consolidation SGD (a fresh optimizer per task).
        batch_size: Batch size over the current task's subset (line B).
        epochs: Passes of the consolidation over memory and subset (research code: 1).
        steps: ``minibatch``: one SGD step per memory/subset batch pair, the research code from
            137c219 on (Permuted MNIST, Split CIFAR-100). ``full_batch``: one SGD step per epoch
            on the whole memory and the whole subset, each line's loss divided by its number of
            examples, as at 177f216 (``core/train_methods.py`` lines 77-85), the commit of the
            Rotated-MNIST configuration. With ``epochs: 1`` that is a single step, so
            ``momentum`` has no effect there.
        memory_per_task: Episodic memory examples drawn per task (research code: 10 on MNIST).
        memory_per_class: Examples per class instead (research code: 1 on CIFAR-100); set
            ``memory_per_task: null`` with it.
        memory_replacement: Draw ``memory_per_task`` with replacement, as the research code did
            on MNIST (duplicates possible).
        subset_size: Examples of the current task's training data used by line B, drawn
            uniformly (research code: 200 rotated MNIST at 177f216, 400 from 137c219; 2000
            permuted MNIST).
        subset_per_class: Examples per class of the current task instead, without replacement,
            in a seeded shuffled order (research code: 100 on Split CIFAR-100); set
            ``subset_size: null`` with it.
        subset_replacement: Draw ``subset_size`` with replacement (research code: MNIST yes).
        weighting: ``reference``: the research code's gradient, K+1-j times point j's gradient
            divided by the batch size (``.grad`` was never zeroed); ``uniform``: the mean over
            the points. They need different learning rates.
        next_task_start: Where SGD on the next task starts: ``w_hat`` (w_hat_{t-1}, the research
            code that produced the paper's numbers) or ``w_bar`` (w_bar_{t-1}, the authors'
            later CL-Gym library). They are different algorithms.
        backend: Line-gradient computation: ``auto``, ``vmap``, ``loop`` or ``affine`` (see
            :class:`~cl_lightning.methods.line_gradient.LineGradient`).
        evaluate_w_hat: Also evaluate w_hat_t on the tasks seen so far (a naive-SGD baseline for
            free when ``next_task_start`` is ``w_hat``); written as ``w_hat_accuracy_matrix`` into
            each member's folder.
        save_solutions: Save w_hat_t and w_bar_t of every task as flat parameter vectors,
            ``solutions/w_hat_XX.pt`` and ``w_bar_XX.pt`` (XX = task, 1-based) in each member's
            folder, for the linear-path analysis (``cl-lightning path --solutions``). Costs 2 x T x
            the model's size on disk per member (1 MB per vector for the MNIST MLP, 4.4 MB for the
            CIFAR ResNet).
    """

    def __init__(
        self,
        alpha0: PerMember[ClosedUnitInterval] = 0.1,
        num_segments: PositiveInt = 5,
        lr: PerMember[PositiveFloat] = 0.01,
        momentum: PerMember[NonNegativeFloat] = 0.8,
        batch_size: PositiveInt = 64,
        epochs: PositiveInt = 1,
        steps: Steps = "minibatch",
        memory_per_task: PositiveInt | None = 10,
        memory_per_class: PositiveInt | None = None,
        memory_replacement: bool = True,
        subset_size: PositiveInt | None = 400,
        subset_per_class: PositiveInt | None = None,
        subset_replacement: bool = True,
        weighting: Literal["reference", "uniform"] = "reference",
        next_task_start: Literal["w_hat", "w_bar"] = "w_hat",
        backend: Literal["auto", "vmap", "loop", "affine"] = "auto",
        evaluate_w_hat: bool = True,
        save_solutions: bool = False,
    ) -> None:
        super().__init__(alpha0=alpha0, lr=lr, momentum=momentum)
        self.num_segments = int(num_segments)
        self.batch_size = int(batch_size)
        self.epochs = int(epochs)
        if steps not in get_args(Steps):
            raise ConfigError(f"steps must be one of {get_args(Steps)}, got {steps!r}")
        self.steps = steps
        self.memory = EpisodicMemory(memory_per_task, memory_per_class, memory_replacement)
        self.subset = ExampleDraw(subset_size, subset_per_class, subset_replacement, SUBSET_OPTIONS)
        self.weighting = weighting
        self.next_task_start = next_task_start
        self.backend = backend
        self.evaluate_w_hat = evaluate_w_hat
        self.save_solutions = save_solutions
        # One row per member ([N, P]: the layout of Population.flat(); [N, T, T]).
        self.w_bar: Tensor | None = None
        self.w_hat: Tensor | None = None
        self.w_hat_matrix: Tensor | None = None
        self.line: LineGradient | None = None

    @override
    def setup_population(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        n = dm.num_tasks
        self.memory.check(dm)
        self.subset.check(dm)
        self.w_hat_matrix = torch.full((dm.size, n, n), float("nan"), dtype=torch.float64)
        self.line_gradient(pl_module.population)  # checks the backend against the network now
        self.folders = self.member_dirs(trainer)

    def line_gradient(self, population: Population) -> LineGradient:
        """The line gradient of ``population`` (made again if the module rebuilt its population after
        this callback's ``setup``, as ``ContinualModule.setup`` does for the datamodule's seeds)."""
        if self.line is None or self.line.population is not population:
            self.line = LineGradient(population, self.num_segments, self.weighting, self.backend)
        return self.line

    # ------------------------------------------------------------------ task events
    @override
    def on_task_start(self, trainer: Trainer, pl_module: LightningModule, task: int) -> None:
        if task > 0 and self.next_task_start == "w_hat":
            pl_module.population.load_flat(self.w_hat.to(pl_module.device))

    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule, task: int) -> None:
        dm: ContinualDataModule = trainer.datamodule
        population = pl_module.population
        w_hat = population.flat()
        self.memory.add_task(dm, task)
        if task == 0:
            w_bar, losses = w_hat.clone(), {}
        else:
            w_bar, losses = self.consolidate(dm, pl_module, task, self.w_bar.to(w_hat.device), w_hat)
            # Every process computed the same consolidation from the same memory and subset;
            # the broadcast only guards against floating-point drift between devices.
            w_bar = trainer.strategy.broadcast(w_bar, src=0)
        self.w_hat, self.w_bar = w_hat, w_bar
        if self.evaluate_w_hat:
            self.w_hat_matrix[:, task, : task + 1] = task_accuracies(pl_module, dm, list(range(task + 1)), dm.eval_split)
        population.load_flat(w_bar)
        self._publish(trainer, pl_module, task, losses, (w_hat - w_bar).norm(dim=1).cpu().double())
        if self.save_solutions:
            self._save_solutions(pl_module, task)

    # ------------------------------------------------------------------ consolidation
    def consolidate(
        self, dm: ContinualDataModule, pl_module: LightningModule, task: int, w_bar_prev: Tensor, w_hat: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """w_bar_t ``[N, P]`` from w_bar_{t-1} and w_hat_t (``[N, P]``, row k member k's); returns it with
        each member's mean line losses (``[N]`` float64 each)."""
        line = self.line_gradient(pl_module.population)
        lines = {
            "memory": (w_bar_prev, [self._line_batch(b, pl_module) for b in self._memory_batches(dm, task)]),
            "subset": (w_hat, [self._line_batch(b, pl_module) for b in self._subset_batches(dm, task)]),
        }
        alpha0, lr, momentum = self.settings(dm.size).values()
        w = nn.Parameter(w_bar_prev + alpha0.to(w_hat).unsqueeze(1) * (w_hat - w_bar_prev))
        optimizer = MemberSGD([w], lr=lr, momentum=momentum)
        loss_sums = {name: torch.zeros(dm.size, device=w.device) for name in lines}
        plan = self._step_plan({name: [b[1].shape[1] for b in batches] for name, (_, batches) in lines.items()})
        with eval_mode(pl_module.population), torch.inference_mode(False), torch.enable_grad():
            for _ in range(self.epochs):
                for step in plan:
                    grad = torch.zeros_like(w)
                    for name, i, share in step:
                        start, batches = lines[name]
                        g, point_losses = line(start, w.detach(), *batches[i], share=share)
                        grad += g
                        loss_sums[name] += point_losses.mean(dim=1)
                    w.grad = grad
                    optimizer.step()
        losses = {f"line_loss_{name}": (loss_sums[name] / (self.epochs * len(batches))).cpu().double()
                  for name, (_, batches) in lines.items()}
        return w.detach().clone(), losses

    def _step_plan(self, batch_sizes: dict[str, list[int]]) -> list[Step]:
        """The optimizer steps of one consolidation epoch, given each line's batch sizes.

        ``minibatch``: step i takes batch i of each line that has one, each at share 1 (its own
        batch-mean loss). ``full_batch``: one step over every batch of both lines, each batch
        at its share of its line's examples, so that a line's loss is the sum of its batch-mean
        losses divided by its number of examples, as at 177f216.
        """
        if self.steps == "full_batch":
            return [[(name, i, size / sum(sizes)) for name, sizes in batch_sizes.items() for i, size in enumerate(sizes)]]
        longest = max(len(sizes) for sizes in batch_sizes.values())
        return [[(name, i, 1.0) for name, sizes in batch_sizes.items() if i < len(sizes)] for i in range(longest)]

    def _memory_batches(self, dm: ContinualDataModule, task: int) -> list[Batch]:
        """One batch per task 1..t from each member's episodic memory, ``[N, m, ...]`` each, in a
        seeded order per member: batch i of member k holds the memory of task ``order_k[i]``."""
        tasks = list(range(task + 1))
        orders = torch.stack([torch.randperm(task + 1, generator=generator(seed, "mcsgd_memory_order", task))
                              for seed in dm.seeds])
        x, y, task_ids = self.memory.batch(dm, tasks)  # every member's memory of tasks 1..t, task after task
        sizes = torch.tensor([self.memory.indices[t].shape[1] for t in tasks])
        offsets = sizes.cumsum(0) - sizes
        rows = torch.arange(dm.size, device=y.device).unsqueeze(1)
        batches = []
        for i in range(task + 1):
            chosen = orders[:, i]
            if (sizes[chosen] != sizes[chosen[0]]).any():
                raise ConfigError(
                    f"the episodic memory holds {sizes.tolist()} examples of tasks 1..{task + 1}: the members "
                    "consolidate with one task's memory per batch in their own orders, so a population needs "
                    "memories of equal size; set memory_per_task (or run these seeds separately)")
            positions = (offsets[chosen].unsqueeze(1) + torch.arange(int(sizes[chosen[0]]))).to(y.device)
            batches.append((x[rows, positions], y[rows, positions], task_ids[rows, positions]))
        return batches

    def _subset_batches(self, dm: ContinualDataModule, task: int) -> list[Batch]:
        """Each member's fixed subset of task t's training data, in batches ``[N, batch_size, ...]``."""
        dataset = dm.task_set(task, "train")
        subset = dataset.select(self._subset_index(dm, task).to(dataset.base_index.device))
        return [subset.batch(start, start + self.batch_size) for start in range(0, len(subset), self.batch_size)]

    def _subset_index(self, dm: ContinualDataModule, task: int) -> Tensor:
        """``[N, s]``: row k holds the positions of member k's subset in its training data of task t,
        drawn from its seed and the task.

        A class-balanced subset is shuffled (each member in its own seeded order), so that its
        batches mix classes as the research code's did (a shuffling DataLoader, materialised once).
        """
        index = self.subset.draw(dm.task_set(task, "train"), dm.seeds, ("mcsgd_subset", task), task)
        if self.subset.per_class is not None:
            orders = torch.stack([torch.randperm(index.shape[1], generator=generator(seed, "mcsgd_subset_order", task))
                                  for seed in dm.seeds])
            index = index.gather(1, orders)
        return index

    @staticmethod
    def _line_batch(batch: Batch, pl_module: LightningModule) -> LineBatch:
        """``(x, y, logit_mask)`` for :class:`LineGradient` on the module's device; the mask keeps each
        example's task classes of its member (split benchmarks)."""
        x, y, task_ids = (v.to(pl_module.device) for v in batch)
        return x, y, pl_module.task_mask(task_ids)

    # ------------------------------------------------------------------ reporting
    def _publish(self, trainer: Trainer, pl_module: LightningModule, task: int, losses: dict[str, Tensor],
                 distance: Tensor) -> None:
        """Log each member's consolidation and write its w_hat row, once the task is known not to have
        diverged: the members that diverged are stopped here (``stop_diverged``) rather than at the
        validation that follows, so that a member stopped by a divergence (or a run whose every member
        diverged) leaves no w_hat row that looks like a result."""
        failed = self.stop_diverged(trainer, pl_module)
        self.w_hat_matrix[failed, task] = float("nan")  # a stopped member's rows are not results
        values = {f"mcsgd/{name}": value for name, value in losses.items()} | {"mcsgd/distance_w_hat_w_bar": distance}
        if self.evaluate_w_hat:
            values |= {f"mcsgd/w_hat_acc/task_{i + 1:02d}": self.w_hat_matrix[:, task, i] for i in range(task + 1)}
            values["mcsgd/w_hat_average_accuracy"] = [average_accuracy(matrix, task) for matrix in self.w_hat_matrix]
            self._write_matrices(trainer, task, failed.tolist())
        self.log_members(trainer, pl_module, values, task + 1)

    @rank_zero_only
    def _write_matrices(self, trainer: Trainer, task: int, failed: list[bool]) -> None:
        """Each running member's w_hat accuracy matrix into its folder."""
        for k, folder in enumerate(self.folders):
            if not failed[k]:
                write_matrix(folder, "w_hat_accuracy_matrix", self.w_hat_matrix[k], task, trainer.datamodule.eval_split)

    @rank_zero_only
    def _save_solutions(self, pl_module: LightningModule, task: int) -> None:
        """Each running member's w_hat_t and w_bar_t (flat, 1-D: a plain run's solution files) in its folder."""
        failed = pl_module.failed.tolist()
        for k, folder in enumerate(self.folders):
            if failed[k]:
                continue
            for kind, vectors in (("w_hat", self.w_hat), ("w_bar", self.w_bar)):
                path = solution_path(folder, kind, task)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(vectors[k].cpu().clone(), path)

    # ------------------------------------------------------------------ checkpoint
    @override
    def method_state(self) -> dict[str, Any]:
        return {"w_bar": self.w_bar, "w_hat": self.w_hat, "w_hat_matrix": self.w_hat_matrix,
                "memory": self.memory.state_dict()}

    @override
    def load_method_state(self, state: dict[str, Any]) -> None:
        self.w_bar, self.w_hat = state["w_bar"], state["w_hat"]
        self.w_hat_matrix = state["w_hat_matrix"]
        self.memory.load_state_dict(state["memory"])
