"""The task sequence of a population as one LightningDataModule.

One ``fit`` runs every task: task ``t`` (0-based) owns epochs ``[t*E, (t+1)*E)`` and the
datamodule derives the current task from ``trainer.current_epoch`` each time Lightning reloads
the loaders (``reload_dataloaders_every_n_epochs=1``). It keeps no task counter, so a resumed
run lands in the right task and the stale extra ``train_dataloader()`` call Lightning makes on
resume is harmless.

A run trains a population of N >= 1 members (``seeds``; a plain run is a population of one):
member k sees the task sequence of its own seed. The base images are held once, as uint8 on the
device that trains; every member's tasks are index tensors (:mod:`cl_lightning.data.members`), and
a batch ``(x [N, B, C, H, W], y [N, B], task [N, B])`` is one index and, for permuted tasks, one
gather (see :mod:`cl_lightning.data.tasks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveInt
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from cl_lightning.data.members import (
    Batch,
    MemberBatches,
    MemberData,
    MemberEvalBatches,
    MemberSet,
    MemberTasks,
    epoch_orders,
    member_tasks,
)
from cl_lightning.data.sources import NUM_CLASSES, load_source
from cl_lightning.data.tasks import check_split
from cl_lightning.errors import ConfigError
from cl_lightning.seeding import run_seed

__all__ = ["Batch", "ContinualDataModule", "sequence_trainer_settings"]


def sequence_trainer_settings(num_tasks: int, epochs_per_task: int) -> dict[str, int]:
    """The Trainer arguments a task sequence needs, the one place that says them (the CLI links and
    defaults these, Python code passes ``ContinualDataModule.trainer_settings()``): one ``fit`` over
    every task, validation once per task (after its last epoch), the loaders rebuilt every epoch
    because the datamodule derives the task from the epoch, and no sanity check (it would
    evaluate an untrained model on task 1)."""
    return {
        "max_epochs": num_tasks * epochs_per_task,
        "check_val_every_n_epoch": epochs_per_task,
        "reload_dataloaders_every_n_epochs": 1,
        "num_sanity_val_steps": 0,
    }


class ContinualDataModule(LightningDataModule):
    """A sequence of ``num_tasks`` tasks built from one image dataset.

    Args:
        source: Dataset the tasks are built from: ``mnist``, ``fashion_mnist``, ``cifar100``
            (read by torchvision from ``root``), or ``digits`` (scikit-learn's 8x8 digits,
            embedded, offline).
        benchmark: ``permuted`` (task 1 identity, task t a seeded pixel permutation),
            ``rotated`` (task t rotated by (t-1)*degrees_per_task, nearest neighbour, fill 0) or
            ``split`` (task t = the next ``classes_per_task`` classes; task id given to the model).
        num_tasks: Number of tasks T.
        epochs_per_task: Epochs of training on each task (the CLI sets max_epochs = T * this).
        root: Folder holding the dataset files (``root/MNIST/raw``, ``root/FashionMNIST/raw``,
            ``root/cifar-100-python``).
        download: Let torchvision download missing files (needs internet).
        degrees_per_task: Rotation step of the rotated benchmark (paper: 9).
        classes_per_task: Classes per task of the split benchmark (paper: 5).
        class_order: Split benchmark class order: ``label`` (0-4, 5-9, ... as the paper) or
            ``shuffled`` (seeded).
        train_examples_per_task: Use a seeded random subset of this many training examples per
            task (None: all).
        test_examples_per_task: Same for the evaluation split (None: all).
        val_fraction: Hold out this fraction of the training set as a validation split and
            evaluate on it during ``fit``. 0 evaluates on the test split during ``fit``, as the
            paper's code did (it had no validation split).
        batch_size: Training batch size.
        eval_batch_size: Evaluation batch size. It matters only for networks that normalise with
            batch statistics at test time (the paper's CIFAR ResNet).
        shuffle: Shuffle training examples (seeded, per epoch). The research code did not
            shuffle rotated MNIST.
        joint: Train on the union of all tasks seen so far (the multitask upper bound).
        eval_future_tasks: Also evaluate tasks not trained yet (the upper triangle of the
            accuracy matrix, for forward transfer); costs T evaluations per task instead of t.
        seed: Seed of every random choice of the data; None uses the run's ``seed_everything``.
        seeds: The seeds of a population's members, trained together (one ``fit``); member k's
            tasks, subsets and batch order are those of the run with ``seed = seeds[k]``.
            Overrides ``seed``; None is the population of one ``[seed]``. The model must hold the
            same members (the command line links ``model.seeds`` to this).
        member_dirs: The folder each member writes its results into, one per seed (a population of
            two or more); each must hold no other run's results. Default: ``seed_<seed>`` inside
            the run folder. Needed when a seed repeats (members that differ in a setting only, as
            ``cl-lightning sweep`` packs them), since their default folders would coincide.
    """

    def __init__(
        self,
        source: Literal["mnist", "fashion_mnist", "cifar100", "digits"] = "digits",
        benchmark: Literal["permuted", "rotated", "split"] = "permuted",
        num_tasks: PositiveInt = 20,
        epochs_per_task: PositiveInt = 1,
        root: str = "data",
        download: bool = False,
        degrees_per_task: float = 9.0,
        classes_per_task: PositiveInt = 5,
        class_order: Literal["label", "shuffled"] = "label",
        train_examples_per_task: PositiveInt | None = None,
        test_examples_per_task: PositiveInt | None = None,
        val_fraction: NonNegativeFloat = 0.0,
        batch_size: PositiveInt = 64,
        eval_batch_size: PositiveInt = 1024,
        shuffle: bool = True,
        joint: bool = False,
        eval_future_tasks: bool = False,
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
        member_dirs: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if num_tasks < 1 or epochs_per_task < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ConfigError("num_tasks, epochs_per_task and batch sizes must be positive integers")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if seeds is not None and len(seeds) == 0:
            raise ConfigError("data.seeds is empty: give at least one seed (or null for the run's seed_everything)")
        check_member_dirs(seeds, member_dirs)
        if benchmark == "split" and source in NUM_CLASSES:  # early: before any file is read
            check_split(num_tasks, classes_per_task, NUM_CLASSES[source])
        self.save_hyperparameters()
        self.source = source
        self.benchmark = benchmark
        self.num_tasks = int(num_tasks)
        self.epochs_per_task = int(epochs_per_task)
        self.root = root
        self.download = download
        self.degrees_per_task = degrees_per_task
        self.classes_per_task = int(classes_per_task)
        self.class_order = class_order
        self.train_examples_per_task = train_examples_per_task
        self.test_examples_per_task = test_examples_per_task
        self.val_fraction = float(val_fraction)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.shuffle = shuffle
        self.joint = joint
        self.eval_future_tasks = eval_future_tasks
        self.seed = seed
        self.seed_list = None if seeds is None else [int(k) for k in seeds]
        self.member_dirs = None if member_dirs is None else [str(d) for d in member_dirs]
        #: Every member's task sequence (index tensors on the CPU), known once ``setup`` has run.
        self.tasks: MemberTasks | None = None
        self._data: MemberData | None = None
        self._checkpoint_tasks_seen: int | None = None  # of the checkpoint an evaluation restored

    # ----------------------------------------------------------------- task schedule
    def task_of_epoch(self, epoch: int) -> int:
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

    def is_task_start(self, epoch: int) -> bool:
        return epoch % self.epochs_per_task == 0

    def is_task_end(self, epoch: int) -> bool:
        return (epoch + 1) % self.epochs_per_task == 0

    def trainer_settings(self) -> dict[str, int]:
        """The Trainer arguments this task sequence needs (:func:`sequence_trainer_settings`)."""
        return sequence_trainer_settings(self.num_tasks, self.epochs_per_task)

    @property
    def current_task(self) -> int:
        """The task being trained, derived from the trainer's epoch (0 before fitting)."""
        trainer = self.trainer
        return self.task_of_epoch(trainer.current_epoch) if trainer is not None else 0

    # ----------------------------------------------------------------- data
    @override
    def setup(self, stage: str | None = None) -> None:
        if self.tasks is not None:  # idempotent: Lightning may call setup for several stages
            return
        seeds = self.seed_list if self.seed_list is not None else [run_seed(self.seed)]
        train = load_source(self.source, self.root, train=True, download=self.download)
        test = load_source(self.source, self.root, train=False, download=self.download)
        self._sources = (train, test)
        self.num_classes = train.num_classes
        self.input_shape = tuple(train.images.shape[1:])
        self.tasks = member_tasks(
            train, test, seeds, benchmark=self.benchmark, num_tasks=self.num_tasks,
            degrees_per_task=self.degrees_per_task, classes_per_task=self.classes_per_task,
            class_order=self.class_order, train_examples_per_task=self.train_examples_per_task,
            test_examples_per_task=self.test_examples_per_task, val_fraction=self.val_fraction,
        )

    @property
    def seeds(self) -> tuple[int, ...]:
        """The members' seeds; known before ``setup`` reads the data (the run's checks need them first)."""
        if self.tasks is not None:
            return self.tasks.seeds
        return tuple(self.seed_list) if self.seed_list is not None else (run_seed(self.seed),)

    @property
    def size(self) -> int:
        """N, the number of members (after ``setup``)."""
        return self._ready().size

    def _ready(self) -> MemberTasks:
        if self.tasks is None:
            self.setup()
        return self.tasks

    def task_set(self, task: int | list[int], split: Literal["train", "val", "test"] = "train") -> MemberSet:
        """Every member's examples of one task (or the union of several) from ``split``, on the device
        that trains (the trainer's; the CPU without one)."""
        tasks = self._ready()
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if self._data is None or self._data.device != device:
            train, test = self._sources
            self._data = None  # free the old device's copy first
            self._data = MemberData(tasks, train, test, device)
        return self._data.task_set(task, split)

    @property
    def class_mask(self) -> torch.Tensor | None:
        """``[N, T, num_classes]`` bool mask of each member's task classes (split benchmark), else None."""
        return self._ready().class_mask

    @property
    def eval_split(self) -> Literal["val", "test"]:
        """The split ``fit`` evaluates on after each task."""
        return "val" if self.val_fraction > 0 else "test"

    # ----------------------------------------------------------------- loaders
    @override
    def train_dataloader(self) -> MemberBatches:
        t = self.current_task
        dataset = self.task_set(list(range(t + 1)) if self.joint else t, "train")
        trainer = self.trainer
        # The epoch's order is derived from (seed, epoch), never from a stateful sampler, because
        # Lightning iterates the loader a different number of times in a resumed run.
        epoch = trainer.current_epoch if trainer is not None else 0
        order = epoch_orders(self.seeds, len(dataset), epoch, self.shuffle)
        return MemberBatches(dataset, order, self.batch_size, epoch, progress=self._batches_processed,
                             rank=trainer.global_rank if trainer is not None else 0,
                             world_size=trainer.world_size if trainer is not None else 1)

    # ----------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        """The members' seeds every task was derived from (a resumed run must derive the same tasks), and
        the number of tasks the model has seen (``validate`` evaluates those, its loop state not being restored)."""
        return {"seeds": list(self.seeds), "tasks_seen": self.current_task + 1}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Lightning restores this after `setup`, so both are known here.
        fitting = self.trainer is None or self.trainer.state.fn == TrainerFn.FITTING
        self.check_seeds(state, fitting)
        if not fitting:
            if "tasks_seen" not in state:
                rank_zero_warn("the checkpoint does not record how many tasks its model has seen (it was written by an "
                               "older cl-lightning): every task is evaluated")
            self._checkpoint_tasks_seen = int(state.get("tasks_seen", self.num_tasks))

    def check_seeds(self, state: dict[str, list[int]], fitting: bool) -> None:
        """Refuse a checkpoint (its datamodule ``state``) of other members: resuming (``fitting``) needs
        the same seeds; evaluating may take some members of a population's checkpoint."""
        saved = [int(k) for k in state.get("seeds", [state.get("seed")])]
        if saved == list(self.seeds) or (not fitting and set(self.seeds) <= set(saved)):
            return
        raise ConfigError(
            f"the checkpoint was written by a run with seeds {saved} but this run has seeds "
            f"{list(self.seeds)}: its permutations, subsets and memories would differ from the "
            f"checkpoint's. Resume with the run's own config.yaml (it has the seeds)."
        )

    def _batches_processed(self) -> int:
        """Training batches of the current epoch the loop has finished (saved for mid-epoch resume)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    @property
    def tasks_seen(self) -> int:
        """The tasks trained so far, the one in progress included: while fitting, from the trainer's epoch;
        when evaluating a checkpoint (``validate``), as the checkpoint records it."""
        trainer = self.trainer
        if trainer is not None and trainer.state.fn != TrainerFn.FITTING and self._checkpoint_tasks_seen is not None:
            return self._checkpoint_tasks_seen
        return self.current_task + 1

    @override
    def val_dataloader(self) -> list[MemberEvalBatches]:
        seen = self.num_tasks if self.eval_future_tasks else self.tasks_seen
        return [self._eval_loader(self.task_set(t, self.eval_split)) for t in range(seen)]

    @override
    def test_dataloader(self) -> list[MemberEvalBatches]:
        return [self._eval_loader(self.task_set(t, "test")) for t in range(self.num_tasks)]

    def _eval_loader(self, dataset: MemberSet) -> MemberEvalBatches:
        """An evaluation loader that, in a multi-process run, gives each process its own share of the
        examples with none repeated (``MemberEvalBatches``), so a reduced accuracy counts each once.

        The shares may differ by one example (and by one batch), which is safe here: evaluation runs
        no collective per batch, and ``TaskAccuracy`` sums correct/total counts over processes once
        per epoch.
        """
        shards = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        rank, world_size = (shards["rank"], shards["num_replicas"]) if shards else (0, 1)
        return MemberEvalBatches(dataset, self.eval_batch_size, rank=rank, world_size=world_size)


def check_member_dirs(seeds: Sequence[int] | None, member_dirs: Sequence[str] | None) -> None:
    """Refuse members that would write into one folder: a repeated seed without ``member_dirs``, or
    ``member_dirs`` that are not one distinct folder per member of a population of two or more."""
    if member_dirs is None:
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds {list(seeds)} repeat a seed: each member writes into its own folder seed_<n> unless "
                              "--member_dirs gives one folder per member (e.g. to train several settings on the same "
                              "seeds: --seeds [0,0] --model.lr [0.1,0.01] --member_dirs [lr0.1/seed_0,lr0.01/seed_0])")
        return
    if seeds is None or len(seeds) < 2:
        raise ConfigError("member_dirs is for a population of two or more members (--seeds); a plain run writes into its "
                          "run folder (--trainer.logger.init_args.save_dir / name / version)")
    if len(member_dirs) != len(seeds):
        raise ConfigError(f"member_dirs names {len(member_dirs)} folder(s) for {len(seeds)} members (seeds {list(seeds)}): "
                          "give one folder per member, in the order of the seeds")
    resolved = [Path(d).resolve() for d in member_dirs]
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"member_dirs {list(member_dirs)} name a folder twice: each member needs its own")
