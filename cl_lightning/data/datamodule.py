"""The task sequence as one LightningDataModule.

One ``fit`` runs every task: task ``t`` (0-based) owns epochs ``[t*E, (t+1)*E)`` and the
datamodule derives the current task from ``trainer.current_epoch`` each time Lightning reloads
the loaders (``reload_dataloaders_every_n_epochs=1``). It keeps no task counter, so a resumed
run lands in the right task and the stale extra ``train_dataloader()`` call Lightning makes on
resume is harmless.

Data stays in memory as tensors; :class:`TaskDataset` serves whole batches with one indexing
operation (``__getitems__``), and the permuted/rotated task transforms are pixel gathers applied
to the batch (see :mod:`cl_lightning.data.tasks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveInt
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from cl_lightning.data.sources import NUM_CLASSES, ImageSet, load_source
from cl_lightning.data.tasks import apply_pixel_map, apply_pixel_maps, check_split, permutation_maps, rotation_maps, split_classes
from cl_lightning.errors import ConfigError
from cl_lightning.seeding import generator, run_seed

Batch = tuple[Tensor, Tensor, Tensor]


class TaskDataset(Dataset):
    """Examples ``(x, y, task_id)`` of one or several tasks, served a whole batch at a time.

    Each item is a pair (base example, task). ``x`` is the base image scaled to [0, 1] and
    passed through the task's pixel map, if the benchmark has one.
    """

    def __init__(
        self, base: ImageSet, base_index: Tensor, task: Tensor, pixel_maps: Tensor | None, only_task: int | None = None
    ) -> None:
        self.base = base
        self.base_index = base_index
        self.task = task
        self.pixel_maps = pixel_maps
        # Every example of one task (an evaluation set, a task's training data): each batch goes
        # through that one map, without an index per pixel.
        self.only_map = pixel_maps[only_task] if pixel_maps is not None and only_task is not None else None

    def __len__(self) -> int:
        return len(self.base_index)

    def __getitems__(self, indices: list[int] | Tensor) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        base_index, task = self.base_index[idx], self.task[idx]
        images = self.base.images[base_index]
        if self.only_map is not None:
            images = apply_pixel_map(images, self.only_map)
        elif self.pixel_maps is not None:
            images = apply_pixel_maps(images, self.pixel_maps[task])
        return images.float().div_(self.base.max_value), self.base.targets[base_index], task

    def __getitem__(self, index: int) -> Batch:
        x, y, t = self.__getitems__([index])
        return x[0], y[0], t[0]

    def materialize(self, device: torch.device | None = None) -> TaskDataset:
        """The same examples with the pixel maps applied once, kept as uint8 (on ``device``).

        Training then costs one index per batch instead of a gather through the task's map;
        uint8 keeps a 60k-example task at 47 MB (the multitask union of 20 tasks under 1 GB).
        """
        images = self.base.images[self.base_index]
        if self.only_map is not None:
            images = apply_pixel_map(images, self.only_map)
        elif self.pixel_maps is not None:  # the multitask union: each task's rows through its own map
            for task in self.task.unique().tolist():
                rows = (self.task == task).nonzero().squeeze(1)
                images[rows] = apply_pixel_map(images[rows], self.pixel_maps[task])
        base = ImageSet(images.to(device), self.base.targets[self.base_index].to(device),
                        self.base.max_value, self.base.num_classes)
        index = torch.arange(len(self), device=device)
        return TaskDataset(base, index, self.task.to(device), None)


class TaskBatches:
    """One epoch of training batches: Lightning takes any sized iterable as a train loader.

    Leaner than a ``DataLoader`` (no sampler, fetcher or collate): batch ``i`` is one slice of
    the epoch's order and one index into the materialised task. Under DDP each process takes
    its own interleaved share of the order (padded by wrap-around to equal shares, as
    ``DistributedSampler``), so every process steps the same number of equal-sized batches.

    It is resumable mid-epoch through Lightning's stateful-loader protocol: the checkpoint
    records how many batches the loop has processed (``progress``), and a loader restored with
    that state starts after them.
    """

    def __init__(self, dataset: TaskDataset, order: Tensor, batch_size: int, epoch: int,
                 progress: Callable[[], int], rank: int = 0, world_size: int = 1) -> None:
        if world_size > 1:
            padded = torch.cat([order, order[: (-len(order)) % world_size]])
            order = padded[rank::world_size]
        self.dataset, self.order, self.batch_size, self.epoch = dataset, order.to(dataset.task.device), batch_size, epoch
        self.progress = progress
        self._skip = 0

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        skip, self._skip = self._skip, 0  # a restored position applies to the first pass only
        for start in range(skip * self.batch_size, len(self.order), self.batch_size):
            yield self.dataset.__getitems__(self.order[start:start + self.batch_size])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.progress()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["epoch"] == self.epoch:  # the stale loader Lightning builds on resume ignores it
            self._skip = state["batches"]


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


def _whole_batch(batch: Batch) -> Batch:
    """``collate_fn`` for :class:`TaskDataset`: ``__getitems__`` already returns the batch."""
    return batch


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
    ) -> None:
        super().__init__()
        if num_tasks < 1 or epochs_per_task < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ConfigError("num_tasks, epochs_per_task and batch sizes must be positive integers")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
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
        # The seed every random choice of the data derives from: ``seed``, or the run's
        # ``seed_everything`` when None; known once ``setup`` has run.
        self.resolved_seed: int | None = None
        self._pools: dict[str, list[Tensor]] | None = None
        self._training_data: tuple[tuple[int, ...], TaskDataset] | None = None

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
        if self._pools is not None:  # idempotent: Lightning may call setup for several stages
            return
        seed = run_seed(self.seed)
        self.resolved_seed = seed
        train = load_source(self.source, self.root, train=True, download=self.download)
        test = load_source(self.source, self.root, train=False, download=self.download)
        self.sets = {"train": train, "val": train, "test": test}
        self.num_classes = train.num_classes
        self.input_shape = tuple(train.images.shape[1:])
        _, h, w = self.input_shape

        self.pixel_maps: Tensor | None = None
        self.task_classes: Tensor | None = None
        if self.benchmark == "permuted":
            self.pixel_maps = permutation_maps(self.num_tasks, h * w, generator(seed, "permutations"))
        elif self.benchmark == "rotated":
            self.pixel_maps = rotation_maps(self.num_tasks, h, w, self.degrees_per_task)
        else:
            shuffled = self.class_order == "shuffled"
            self.task_classes = split_classes(
                self.num_tasks, self.classes_per_task, self.num_classes,
                generator(seed, "class_order") if shuffled else None,
            )

        # One split of the base training set into train/val, shared by all tasks.
        order = torch.randperm(len(train.targets), generator=generator(seed, "val_split"))
        n_val = int(round(self.val_fraction * len(order)))
        if self.val_fraction > 0 and not 0 < n_val < len(order):
            raise ConfigError(f"val_fraction {self.val_fraction} of {len(order)} training examples leaves "
                              f"{n_val} for validation and {len(order) - n_val} for training; both need some")
        base = {"train": order[n_val:].sort().values, "val": order[:n_val].sort().values,
                "test": torch.arange(len(test.targets))}
        limits = {"train": self.train_examples_per_task, "val": self.test_examples_per_task,
                  "test": self.test_examples_per_task}
        self._pools = {
            split: [self._task_pool(split, base[split], t, limits[split]) for t in range(self.num_tasks)]
            for split in ("train", "val", "test")
        }
        for t, pool in enumerate(self._pools["train"]):
            if len(pool) == 0:
                raise ConfigError(f"task {t + 1} has no training examples; check the data settings")
        self._check_subset_sizes(base)

    def _check_subset_sizes(self, base: dict[str, Tensor]) -> None:
        """Refuse ``*_examples_per_task`` larger than a task: a run silently trained or evaluated on
        fewer examples than its config says would be reported as something it is not (and on split
        benchmarks the tasks would differ in size)."""
        checks = [("train", "train_examples_per_task", "training", self.train_examples_per_task),
                  ("test", "test_examples_per_task", "test", self.test_examples_per_task)]
        if self.val_fraction > 0:
            checks.append(("val", "test_examples_per_task", "validation", self.test_examples_per_task))
        for split, option, label, limit in checks:
            if limit is None:
                continue
            for t in range(self.num_tasks):
                available = len(self._task_pool(split, base[split], t, None))
                if limit > available:
                    raise ConfigError(
                        f"data.{option} is {limit} but task {t + 1} has only {available} {label} examples "
                        f"({self.source}, {self.benchmark}); set it to at most {available}, or to null to "
                        "use all of them."
                    )

    def _task_pool(self, split: str, candidates: Tensor, task: int, limit: int | None) -> Tensor:
        """Base indices of ``task``'s examples in ``split``: its classes, then a seeded subset."""
        if self.task_classes is not None:
            targets = self.sets[split].targets[candidates]
            candidates = candidates[torch.isin(targets, self.task_classes[task])]
        if limit is not None and limit < len(candidates):
            pick = torch.randperm(len(candidates), generator=generator(self.resolved_seed, "subset", split, task))
            candidates = candidates[pick[:limit].sort().values]
        return candidates

    def task_dataset(self, task: int | list[int], split: Literal["train", "val", "test"] = "train",
                     order: Tensor | None = None) -> TaskDataset:
        """Examples of one task (or the union of several) from ``split``, optionally reordered."""
        if self._pools is None:
            self.setup()
        tasks = [task] if isinstance(task, int) else task
        base_index = torch.cat([self._pools[split][t] for t in tasks])
        task_ids = torch.cat([torch.full((len(self._pools[split][t]),), t) for t in tasks])
        if order is not None:
            base_index, task_ids = base_index[order], task_ids[order]
        return TaskDataset(self.sets[split], base_index, task_ids, self.pixel_maps, tasks[0] if len(tasks) == 1 else None)

    @property
    def class_mask(self) -> Tensor | None:
        """``(T, num_classes)`` bool mask of each task's classes (split benchmark), else None."""
        if self.task_classes is None:
            return None
        mask = torch.zeros(self.num_tasks, self.num_classes, dtype=torch.bool)
        mask.scatter_(1, self.task_classes, True)
        return mask

    @property
    def eval_split(self) -> Literal["val", "test"]:
        """The split ``fit`` evaluates on after each task."""
        return "val" if self.val_fraction > 0 else "test"

    # ----------------------------------------------------------------- loaders
    @override
    def train_dataloader(self) -> TaskBatches:
        t = self.current_task
        tasks = tuple(range(t + 1)) if self.joint else (t,)
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else None
        if self._training_data is None or self._training_data[0] != tasks:  # once per task, not per epoch
            self._training_data = None  # free the previous task first
            self._training_data = (tasks, self.task_dataset(list(tasks), "train").materialize(device))
        dataset = self._training_data[1]
        # The epoch's order is derived from (seed, epoch), never from a stateful sampler, because
        # Lightning iterates the loader a different number of times in a resumed run.
        epoch = trainer.current_epoch if trainer is not None else 0
        order = (torch.randperm(len(dataset), generator=generator(self.resolved_seed, "shuffle", epoch))
                 if self.shuffle else torch.arange(len(dataset)))
        return TaskBatches(dataset, order, self.batch_size, epoch, progress=self._batches_processed,
                           rank=trainer.global_rank if trainer is not None else 0,
                           world_size=trainer.world_size if trainer is not None else 1)

    # ----------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict[str, int]:
        """The seed every task was derived from: a resumed run must derive the same tasks."""
        return {"seed": self.resolved_seed}

    @override
    def load_state_dict(self, state: dict[str, int]) -> None:
        # Lightning restores this after `setup`, so both seeds are known here.
        if state["seed"] != self.resolved_seed:
            raise ConfigError(
                f"the checkpoint was written by a run with seed {state['seed']} but this run has seed "
                f"{self.resolved_seed}: its permutations, subsets and memories would differ from the "
                f"checkpoint's. Resume with --seed_everything {state['seed']} (the run's config.yaml has it)."
            )

    def _batches_processed(self) -> int:
        """Training batches of the current epoch the loop has finished (saved for mid-epoch resume)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    @override
    def val_dataloader(self) -> list[DataLoader]:
        seen = self.num_tasks if self.eval_future_tasks else self.current_task + 1
        return [self._eval_loader(self.task_dataset(t, self.eval_split)) for t in range(seen)]

    @override
    def test_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(self.task_dataset(t, "test")) for t in range(self.num_tasks)]

    def _eval_loader(self, dataset: TaskDataset) -> DataLoader:
        """An evaluation loader that, in a multi-process run, gives each process its own share of the
        examples with none repeated.

        Lightning's default ``DistributedSampler`` pads every share to the same length with
        duplicates, so a set whose size is not a multiple of the number of processes would count
        some examples twice and the reduced accuracy would differ from a one-process evaluation.
        The shares may then differ by one example (and by one batch), which is safe here:
        evaluation runs no collective per batch, and ``TaskAccuracy`` sums correct/total counts
        over processes once per epoch.
        """
        shards = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        sampler = None
        if shards is not None and shards["num_replicas"] > 1:
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=shards["num_replicas"], rank=shards["rank"],
                                                   shuffle=False)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, shuffle=False,
                          collate_fn=_whole_batch, generator=torch.Generator())

