"""cl_lightning.data.datamodule: the task sequence of a population as one LightningDataModule, on
real (fake) files.

Every property is checked on the population of one (member 0 of ``seed=...``), and where it is
cheap, on member k of a population of 3 seeds against the population of one with seed k.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torchvision.transforms.functional import InterpolationMode, rotate

from cl_lightning.data.datamodule import Batch, ContinualDataModule
from cl_lightning.data.members import MemberBatches, MemberEvalBatches, MemberSet
from cl_lightning.data.sources import load_source
from cl_lightning.data.tasks import rotation_maps
from cl_lightning.errors import ConfigError


def _dm(root: Path | None = None, **kwargs) -> ContinualDataModule:
    """A set-up datamodule; ``seed`` defaults to 0 so no test depends on the environment
    (``seeds``, when given, overrides it)."""
    kwargs.setdefault("seed", 0)
    if root is not None:
        kwargs["root"] = str(root)
    dm = ContinualDataModule(**kwargs)
    dm.setup()
    return dm


def _all(dataset: MemberSet) -> Batch:
    """Every example of every member of ``dataset`` in one batch: ``[N, n, ...]``."""
    return dataset.batch(0, len(dataset))


def _member(dataset: MemberSet, k: int = 0) -> Batch:
    """Member ``k``'s examples of ``dataset``, as a solo run held them: ``x [n, C, H, W]``, ``y [n]``, ``task [n]``."""
    x, y, task = _all(dataset)
    return x[k], y[k], task[k]


def _trainer_at_epoch(tmp_path: Path, epoch: int) -> Trainer:
    """A real Trainer whose ``current_epoch`` is ``epoch`` (as after ``epoch`` finished epochs of fit).

    ``current_epoch`` has no setter; it reads the fit loop's completed-epoch counter, which is
    what Lightning itself advances.
    """
    trainer = Trainer(
        default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )
    trainer.fit_loop.epoch_progress.current.completed = epoch
    assert trainer.current_epoch == epoch
    return trainer


@pytest.fixture(scope="module")
def mnist_base(mnist_root: Path) -> dict[str, object]:
    return {"train": load_source("mnist", mnist_root, train=True), "test": load_source("mnist", mnist_root, train=False)}


# --------------------------------------------------------------------------- permuted / rotated MNIST


@pytest.mark.parametrize("benchmark_name", ["permuted", "rotated"])
def test_mnist_train_batches(mnist_root: Path, benchmark_name: str) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark=benchmark_name, num_tasks=3, batch_size=32)
    assert dm.trainer is None and dm.current_task == 0
    assert dm.seeds == (0,) and dm.size == 1
    assert dm.input_shape == (1, 28, 28) and dm.num_classes == 10
    maps = dm.tasks.member_pixel_maps(0)
    assert maps is not None and maps.shape == (3, 784)
    # permuted: each member's own maps; rotated: one set of maps, shared by the members
    assert dm.tasks.pixel_maps.shape == ((1, 3, 784) if benchmark_name == "permuted" else (3, 784))
    assert dm.class_mask is None
    loader = dm.train_dataloader()
    assert isinstance(loader, MemberBatches)
    batches = list(loader)
    assert len(batches) == len(loader) == 600 // 32 + 1
    for x, y, task in batches:
        assert x.dtype == torch.float32 and x.shape[0] == 1 and x.shape[2:] == (1, 28, 28)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert y.dtype == torch.int64 and task.dtype == torch.int64
        assert y.shape == task.shape == x.shape[:2]
        assert torch.all(task == 0)
    assert batches[0][0].shape[1] == 32 and batches[-1][0].shape[1] == 600 % 32
    ys = torch.cat([y[0] for _, y, _ in batches])
    assert torch.bincount(ys, minlength=10).tolist() == [60] * 10  # every training example once
    # a population of 3: the same batches, one row per member, each member seeing every example once
    pop = _dm(mnist_root, source="mnist", benchmark=benchmark_name, num_tasks=3, batch_size=32, seeds=[0, 1, 2])
    assert pop.seeds == (0, 1, 2) and pop.size == 3
    pop_batches = list(pop.train_dataloader())
    assert len(pop_batches) == 600 // 32 + 1
    assert pop_batches[0][0].shape == (3, 32, 1, 28, 28) and pop_batches[-1][0].shape == (3, 600 % 32, 1, 28, 28)
    pop_ys = torch.cat([y for _, y, _ in pop_batches], dim=1)
    for k in range(3):
        assert torch.bincount(pop_ys[k], minlength=10).tolist() == [60] * 10, k


def test_permuted_task_datasets_are_base_images_through_the_maps(mnist_root: Path, mnist_base: dict) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=4)
    pop = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=4, seeds=[0, 4, 9])
    base = mnist_base["test"]
    base_x = base.images.float() / 255
    for run, members in ((dm, 1), (pop, 3)):
        for k in range(members):
            maps = run.tasks.member_pixel_maps(k)
            assert torch.equal(maps[0], torch.arange(784))
            for t in range(4):
                x, y, task = _member(run.task_set(t, "test"), k)
                assert len(x) == 200
                assert torch.equal(y, base.targets)
                assert torch.all(task == t)
                perm = maps[t]
                expected = base_x.flatten(2)[:, :, perm].view(200, 1, 28, 28)  # out[i] = in[perm[i]]
                assert torch.equal(x, expected), (members, k, t)
                if t > 0:
                    assert not torch.equal(x, base_x)
            assert torch.equal(_member(run.task_set(0, "test"), k)[0], base_x)
    # member 0 of the population is the population of one with seed 0
    assert torch.equal(pop.tasks.member_pixel_maps(0), dm.tasks.member_pixel_maps(0))


def test_permuted_maps_are_seeded(mnist_root: Path) -> None:
    a = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=3, seed=5)
    b = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=3, seed=5)
    c = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=3, seed=6)
    d = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=3, seed=7)
    assert torch.equal(a.tasks.pixel_maps, b.tasks.pixel_maps)
    assert not torch.equal(a.tasks.member_pixel_maps(0)[1:], c.tasks.member_pixel_maps(0)[1:])
    # member k of a population has the permutations of the population of one with seed k
    pop = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=3, seeds=[5, 6, 7])
    assert pop.tasks.pixel_maps.shape == (3, 3, 784)
    for k, solo in enumerate((a, c, d)):
        assert torch.equal(pop.tasks.member_pixel_maps(k), solo.tasks.member_pixel_maps(0)), k
    assert not torch.equal(pop.tasks.pixel_maps[0, 1:], pop.tasks.pixel_maps[1, 1:])
    assert not torch.equal(pop.tasks.pixel_maps[1, 1:], pop.tasks.pixel_maps[2, 1:])


@pytest.fixture(scope="module")
def rotated20(mnist_root: Path) -> ContinualDataModule:
    return _dm(mnist_root, source="mnist", benchmark="rotated", num_tasks=20, degrees_per_task=9.0)


@pytest.fixture(scope="module")
def rotated20_population(mnist_root: Path) -> ContinualDataModule:
    return _dm(mnist_root, source="mnist", benchmark="rotated", num_tasks=20, degrees_per_task=9.0, seeds=[0, 1, 2])


@pytest.mark.parametrize(
    "task",
    [1, 2, 3, 4, 5, 10, 15, 19],
)
def test_rotated_task_equals_torchvision_rotate(rotated20: ContinualDataModule, rotated20_population: ContinualDataModule,
                                                mnist_base: dict, task: int) -> None:
    base = mnist_base["test"]
    angle = task * 9.0  # 0-based task t is the paper's task t+1: rotated by ((t+1)-1) * 9
    expected = rotate(base.images, angle, interpolation=InterpolationMode.NEAREST, fill=0).float() / 255
    for run, members in ((rotated20, 1), (rotated20_population, 3)):
        for k in range(members):
            x, y, t = _member(run.task_set(task, "test"), k)
            assert torch.equal(y, base.targets) and torch.all(t == task)
            assert torch.equal(x, expected), f"member {k} of {members}: {int((x != expected).flatten(1).any(1).sum())} images differ"


def test_rotated_maps_are_the_rotation_maps(rotated20: ContinualDataModule,
                                            rotated20_population: ContinualDataModule) -> None:
    assert torch.equal(rotated20.tasks.member_pixel_maps(0)[0], torch.arange(784))
    assert torch.equal(rotated20.tasks.pixel_maps, rotation_maps(20, 28, 28, 9.0))
    assert torch.equal(rotated20.tasks.member_pixel_maps(0), rotation_maps(20, 28, 28, 9.0))
    # no seed changes a rotation: the population holds the maps once, shared by every member
    assert torch.equal(rotated20_population.tasks.pixel_maps, rotation_maps(20, 28, 28, 9.0))
    for k in range(3):
        assert torch.equal(rotated20_population.tasks.member_pixel_maps(k), rotation_maps(20, 28, 28, 9.0))


def test_rotated_first_task_is_unrotated(mnist_root: Path, mnist_base: dict) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="rotated", num_tasks=3, degrees_per_task=30.0)
    x, _, _ = _member(dm.task_set(0, "train"))
    assert torch.equal(x, mnist_base["train"].images.float() / 255)


def test_fashion_mnist_gz_source(fashion_root: Path) -> None:
    dm = _dm(fashion_root, source="fashion_mnist", benchmark="permuted", num_tasks=2, batch_size=100)
    x, y, t = next(iter(dm.train_dataloader()))
    assert x.shape == (1, 100, 1, 28, 28) and torch.all(t == 0)
    assert len(dm.task_set(1, "test")) == 200


# --------------------------------------------------------------------------- split CIFAR-100


def test_split_cifar100_label_order(cifar_root: Path) -> None:
    dm = _dm(cifar_root, source="cifar100", benchmark="split", num_tasks=20, classes_per_task=5)
    assert dm.input_shape == (3, 32, 32) and dm.num_classes == 100
    assert dm.tasks.pixel_maps is None and dm.tasks.member_pixel_maps(0) is None
    assert dm.tasks.task_classes.shape == (1, 20, 5)
    assert torch.equal(dm.tasks.task_classes[0], torch.arange(100).view(20, 5))
    assert dm.class_mask.shape == (1, 20, 100) and dm.class_mask.dtype == torch.bool
    mask = dm.class_mask[0]
    assert mask.sum(1).tolist() == [5] * 20
    base_train = load_source("cifar100", cifar_root, train=True)
    every_task = list(range(20))
    for split, per_class in (("train", 20), ("test", 5)):
        union = dm.task_set(every_task, split)  # tasks 0..19 one after the other
        assert union.base_index.shape == (1, 100 * per_class)
        x, y, task = _member(union)
        assert len(y) == 100 * per_class
        for t in range(20):
            classes = list(range(5 * t, 5 * t + 5))
            assert torch.nonzero(mask[t]).flatten().tolist() == classes
            yt = y[task == t]
            assert len(yt) == 5 * per_class and len(dm.task_set(t, split)) == 5 * per_class
            assert sorted(yt.unique().tolist()) == classes, (t, split)
            assert torch.bincount(yt, minlength=100)[classes].tolist() == [per_class] * 5  # all of them
        assert torch.all(mask[task, y])
        if split == "train":  # split tasks are not transformed: x is the stored image scaled to [0, 1]
            assert x.shape == (2000, 3, 32, 32)
            assert torch.equal(x, base_train.images[union.base_index[0]].float() / 255)


def test_split_cifar100_shuffled_order_is_seeded(cifar_root: Path) -> None:
    kwargs = dict(source="cifar100", benchmark="split", num_tasks=20, classes_per_task=5, class_order="shuffled")
    a = _dm(cifar_root, seed=1, **kwargs)
    b = _dm(cifar_root, seed=1, **kwargs)
    c = _dm(cifar_root, seed=2, **kwargs)
    classes = a.tasks.task_classes[0]
    assert torch.equal(classes, b.tasks.task_classes[0])
    assert not torch.equal(classes, c.tasks.task_classes[0])
    assert not torch.equal(classes, torch.arange(100).view(20, 5))
    assert torch.equal(classes.flatten().sort().values, torch.arange(100))
    assert torch.equal(a.class_mask[0].sum(0), torch.ones(100, dtype=torch.long))  # each class in one task
    for t in (0, 7, 19):
        _, y, _ = _member(a.task_set(t, "test"))
        assert set(y.tolist()) == set(classes[t].tolist())
    # member k of a population has the class order of the population of one with seed k
    d = _dm(cifar_root, seed=3, **kwargs)
    pop = _dm(cifar_root, seeds=[1, 2, 3], **kwargs)
    assert pop.tasks.task_classes.shape == (3, 20, 5) and pop.class_mask.shape == (3, 20, 100)
    for k, solo in enumerate((a, c, d)):
        assert torch.equal(pop.tasks.task_classes[k], solo.tasks.task_classes[0]), k
        assert torch.equal(pop.class_mask[k], solo.class_mask[0]), k
        for t in (0, 7, 19):
            _, y, _ = _member(pop.task_set(t, "test"), k)
            assert set(y.tolist()) == set(pop.tasks.task_classes[k, t].tolist()), (k, t)


def test_split_cifar100_too_many_tasks(cifar_root: Path) -> None:
    # refused when the datamodule is built, before any file is read
    with pytest.raises(ValueError, match=r"21 tasks x 5 classes per task needs 105 classes but the dataset has 100"):
        ContinualDataModule(source="cifar100", root=str(cifar_root), benchmark="split", num_tasks=21, classes_per_task=5,
                            seed=0)


# --------------------------------------------------------------------------- subsets


def test_examples_per_task_subsets(mnist_root: Path) -> None:
    kwargs = dict(source="mnist", benchmark="permuted", num_tasks=3,
                  train_examples_per_task=50, test_examples_per_task=20)
    a = _dm(mnist_root, seed=3, **kwargs)
    b = _dm(mnist_root, seed=3, **kwargs)
    c = _dm(mnist_root, seed=4, **kwargs)
    d = _dm(mnist_root, seed=5, **kwargs)
    pop = _dm(mnist_root, seeds=[3, 4, 5], **kwargs)
    for split, size, total in (("train", 50, 600), ("test", 20, 200)):
        pools = [a.task_set(t, split).base_index[0] for t in range(3)]
        for t, pool in enumerate(pools):
            assert a.task_set(t, split).base_index.shape == (1, size)
            assert len(pool) == size
            assert len(pool.unique()) == size and int(pool.min()) >= 0 and int(pool.max()) < total
            assert torch.equal(pool, b.task_set(t, split).base_index[0])  # same seed, same subset
            assert not torch.equal(pool, c.task_set(t, split).base_index[0])  # other seed
            # member k of a population: the subset of the population of one with seed k
            members = pop.task_set(t, split).base_index
            assert members.shape == (3, size)
            for k, solo in enumerate((a, c, d)):
                assert torch.equal(members[k], solo.task_set(t, split).base_index[0]), (split, t, k)
        assert not torch.equal(pools[0], pools[1]) and not torch.equal(pools[1], pools[2])
    x, y, t = next(iter(a.train_dataloader()))
    assert x.shape == (1, 50, 1, 28, 28)
    assert len(a.train_dataloader().dataset) == 50


def test_examples_per_task_larger_than_the_pool_is_refused(cifar_root: Path) -> None:
    """Not clamped: the run would otherwise be reported with more examples per task than it used."""
    with pytest.raises(ValueError, match=r"data.test_examples_per_task is 1000 but task 1 has only 25 test examples.*"
                                         r"at most 25, or to null"):
        _dm(cifar_root, source="cifar100", benchmark="split", num_tasks=4, train_examples_per_task=60,
            test_examples_per_task=1000)
    dm = _dm(cifar_root, source="cifar100", benchmark="split", num_tasks=4, train_examples_per_task=100,
             test_examples_per_task=25)  # exactly all of them is fine
    assert [len(dm.task_set(t, "train")) for t in range(4)] == [100] * 4
    assert [len(dm.task_set(t, "test")) for t in range(4)] == [25] * 4


# --------------------------------------------------------------------------- validation split


def test_val_fraction_splits_the_training_set(mnist_root: Path, mnist_base: dict) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=2, val_fraction=0.25)
    assert dm.eval_split == "val"
    for t in range(2):
        train = dm.task_set(t, "train").base_index[0]
        val = dm.task_set(t, "val").base_index[0]
        assert len(val) == 150 and len(train) == 450
        assert not set(train.tolist()) & set(val.tolist())
        assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(600))
    # val items are training images, seen through the task's map
    x, y, task = _member(dm.task_set(1, "val"))
    base = mnist_base["train"]
    val_index = dm.task_set(1, "val").base_index[0]
    assert torch.equal(y, base.targets[val_index])
    assert torch.all(task == 1)
    perm = dm.tasks.member_pixel_maps(0)[1]
    assert torch.equal(x, (base.images[val_index].float() / 255).flatten(2)[:, :, perm].view(150, 1, 28, 28))
    loaders = dm.val_dataloader()
    assert len(loaders) == 1 and isinstance(loaders[0], MemberEvalBatches) and len(loaders[0].dataset) == 150
    # seeded
    again = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=2, val_fraction=0.25)
    assert torch.equal(again.task_set(0, "val").base_index, dm.task_set(0, "val").base_index)
    other = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=2, val_fraction=0.25, seed=9)
    assert not torch.equal(other.task_set(0, "val").base_index, dm.task_set(0, "val").base_index)
    # member k of a population: the validation split of the population of one with seed k
    third = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=2, val_fraction=0.25, seed=5)
    pop = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=2, val_fraction=0.25, seeds=[9, 0, 5])
    for t in range(2):
        for split in ("train", "val"):
            members = pop.task_set(t, split).base_index
            assert members.shape == (3, 150 if split == "val" else 450)
            for k, solo in enumerate((other, dm, third)):
                assert torch.equal(members[k], solo.task_set(t, split).base_index[0]), (t, split, k)


def test_val_fraction_zero_evaluates_on_test(mnist_root: Path) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=2, val_fraction=0.0)
    assert dm.eval_split == "test"
    assert len(dm.task_set(0, "train")) == 600
    loaders = dm.val_dataloader()
    assert len(loaders) == 1 and len(loaders[0].dataset) == 200


@pytest.mark.parametrize("bad", [1.0, -0.1])
def test_val_fraction_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        ContinualDataModule(val_fraction=bad)


# --------------------------------------------------------------------------- joint training


def test_joint_task_dataset_is_the_union(mnist_root: Path) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=4, joint=True,
             train_examples_per_task=40)
    pop = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=4, joint=True,
              train_examples_per_task=40, seeds=[0, 1, 2])
    for run, members in ((dm, 1), (pop, 3)):
        union = run.task_set([0, 1, 2], "train")
        sizes = [len(run.task_set(t, "train")) for t in range(3)]
        assert len(union) == sum(sizes) == 120
        assert union.base_index.shape == (members, 120)
        for k in range(members):
            x, y, task = _member(union, k)
            assert torch.bincount(task, minlength=4).tolist() == [40, 40, 40, 0]
            start = 0
            for t in range(3):  # each part is exactly task t's dataset
                xt, yt, _ = _member(run.task_set(t, "train"), k)
                assert torch.equal(x[start : start + 40], xt) and torch.equal(y[start : start + 40], yt), (members, k, t)
                start += 40


@pytest.mark.parametrize("seeds", [None, [0, 1, 2]])
@pytest.mark.parametrize("joint", [True, False])
def test_train_dataloader_follows_the_trainer_epoch(mnist_root: Path, tmp_path: Path, joint: bool,
                                                    seeds: list[int] | None) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=4, epochs_per_task=2,
             joint=joint, batch_size=256, seeds=seeds)
    dm.trainer = _trainer_at_epoch(tmp_path, 5)  # epochs 4, 5 are task index 2
    assert dm.current_task == 2
    tasks = torch.cat([t for _, _, t in dm.train_dataloader()], dim=1)
    assert tasks.shape[0] == dm.size == (1 if seeds is None else 3)
    for k in range(dm.size):
        if joint:
            assert torch.bincount(tasks[k], minlength=4).tolist() == [600, 600, 600, 0]
        else:
            assert torch.bincount(tasks[k], minlength=4).tolist() == [0, 0, 600, 0]
    assert len(dm.val_dataloader()) == 3  # tasks seen so far


# --------------------------------------------------------------------------- shuffling


def test_shuffle_order_is_a_function_of_seed_and_epoch(mnist_root: Path, tmp_path: Path) -> None:
    kwargs = dict(source="mnist", benchmark="permuted", num_tasks=2, epochs_per_task=3, batch_size=200)
    a, b, c = _dm(mnist_root, **kwargs), _dm(mnist_root, **kwargs), _dm(mnist_root, seed=1, **kwargs)
    d, pop = _dm(mnist_root, seed=2, **kwargs), _dm(mnist_root, seeds=[0, 1, 2], **kwargs)
    first_a, first_b, first_c, first_d, first_pop = (next(iter(m.train_dataloader())) for m in (a, b, c, d, pop))
    for u, v in zip(first_a, first_b):
        assert torch.equal(u, v)
    assert not torch.equal(first_a[1], first_c[1])
    # member k of a population takes the batches of the population of one with seed k
    for k, first in enumerate((first_a, first_c, first_d)):
        for u, v in zip(first_pop, first):
            assert torch.equal(u[k], v[0]), k
    # iterating a loader again (as Lightning does on resume) does not change the order
    loader = a.train_dataloader()
    assert torch.equal(torch.cat([y for _, y, _ in loader], dim=1), torch.cat([y for _, y, _ in loader], dim=1))
    loader = pop.train_dataloader()
    assert torch.equal(torch.cat([y for _, y, _ in loader], dim=1), torch.cat([y for _, y, _ in loader], dim=1))
    # another epoch of the same task: another order, the same for every datamodule with the seed
    for m in (a, b, c, d, pop):
        m.trainer = _trainer_at_epoch(tmp_path, 1)
    epoch1_a, epoch1_b = next(iter(a.train_dataloader())), next(iter(b.train_dataloader()))
    assert torch.equal(epoch1_a[0], epoch1_b[0]) and torch.equal(epoch1_a[1], epoch1_b[1])
    assert not torch.equal(epoch1_a[1], first_a[1])
    assert torch.all(epoch1_a[2] == 0)
    epoch1_pop = next(iter(pop.train_dataloader()))
    for k, solo in enumerate((a, c, d)):
        epoch1 = next(iter(solo.train_dataloader()))
        for u, v in zip(epoch1_pop, epoch1):
            assert torch.equal(u[k], v[0]), k
        assert not torch.equal(epoch1_pop[1][k], first_pop[1][k]), k


def test_no_shuffle_gives_dataset_order(mnist_root: Path, mnist_base: dict) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="rotated", num_tasks=2, shuffle=False, batch_size=200)
    x, y, t = next(iter(dm.train_dataloader()))
    base = mnist_base["train"]
    assert torch.equal(y[0], base.targets[:200])
    assert torch.equal(x[0], base.images[:200].float() / 255)  # task 1 of rotated: unrotated
    ys = torch.cat([y[0] for _, y, _ in dm.train_dataloader()])
    assert torch.equal(ys, base.targets)
    # every member of a population: the dataset order too, whatever its seed
    pop = _dm(mnist_root, source="mnist", benchmark="rotated", num_tasks=2, shuffle=False, batch_size=200, seeds=[0, 1, 2])
    x, y, _ = next(iter(pop.train_dataloader()))
    ys = torch.cat([y for _, y, _ in pop.train_dataloader()], dim=1)
    for k in range(3):
        assert torch.equal(y[k], base.targets[:200]) and torch.equal(x[k], base.images[:200].float() / 255), k
        assert torch.equal(ys[k], base.targets), k


# --------------------------------------------------------------------------- seed


@pytest.fixture
def _restore_global_rng(monkeypatch: pytest.MonkeyPatch):
    """Undo what ``seed_everything`` changes: its environment variables and the global RNGs."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # recorded, so restored (or removed) afterwards
    monkeypatch.setenv("PL_SEED_WORKERS", "0")
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.random.set_rng_state(states[2])


@pytest.mark.usefixtures("_restore_global_rng")
def test_seed_none_uses_seed_everything() -> None:
    seed_everything(123)
    dm = _dm(source="digits", benchmark="permuted", num_tasks=3, seed=None)
    explicit = _dm(source="digits", benchmark="permuted", num_tasks=3, seed=123)
    other = _dm(source="digits", benchmark="permuted", num_tasks=3, seed=124)
    assert dm.seeds == explicit.seeds == (123,)
    assert torch.equal(dm.tasks.pixel_maps, explicit.tasks.pixel_maps)
    assert not torch.equal(dm.tasks.pixel_maps, other.tasks.pixel_maps)
    for u, v in zip(next(iter(dm.train_dataloader())), next(iter(explicit.train_dataloader()))):
        assert torch.equal(u, v)


def test_seed_none_reads_pl_global_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "77")
    dm = _dm(source="digits", benchmark="permuted", num_tasks=2, seed=None)
    assert dm.seeds == (77,)
    assert torch.equal(dm.tasks.pixel_maps, _dm(source="digits", benchmark="permuted", num_tasks=2, seed=77).tasks.pixel_maps)


def test_seed_none_without_seed_everything_warns_and_uses_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    dm = ContinualDataModule(source="digits", benchmark="permuted", num_tasks=2, seed=None)
    with pytest.warns(UserWarning, match="No seed set"):
        dm.setup()
    assert dm.seeds == (0,)
    assert torch.equal(dm.tasks.pixel_maps, _dm(source="digits", benchmark="permuted", num_tasks=2, seed=0).tasks.pixel_maps)


def test_seeds_override_seed_and_seed_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "77")
    pop = _dm(source="digits", benchmark="permuted", num_tasks=2, seed=5, seeds=[3, 4, 8])
    assert pop.seeds == (3, 4, 8) and pop.size == 3
    assert _dm(source="digits", benchmark="permuted", num_tasks=2, seed=None, seeds=[4]).seeds == (4,)
    for k, seed in enumerate((3, 4, 8)):
        solo = _dm(source="digits", benchmark="permuted", num_tasks=2, seed=seed)
        assert torch.equal(pop.tasks.member_pixel_maps(k), solo.tasks.member_pixel_maps(0)), k


def test_checkpoint_state_is_the_seeds_and_tasks_seen() -> None:
    pop = _dm(source="digits", benchmark="permuted", num_tasks=2, seeds=[3, 4, 8])
    assert pop.state_dict() == {"seeds": [3, 4, 8], "tasks_seen": 1}
    pop.load_state_dict({"seeds": [3, 4, 8]})  # the run's own seeds: accepted
    with pytest.raises(ConfigError, match=r"written by a run with seeds \[3, 4, 9\] but this run has seeds \[3, 4, 8\]"):
        pop.load_state_dict({"seeds": [3, 4, 9]})
    solo = _dm(source="digits", benchmark="permuted", num_tasks=2, seed=3)
    assert solo.state_dict() == {"seeds": [3], "tasks_seen": 1}
    with pytest.raises(ConfigError, match=r"seeds \[3, 4, 8\] but this run has seeds \[3\]"):
        solo.load_state_dict(pop.state_dict())


# --------------------------------------------------------------------------- digits


def test_digits_source_offline() -> None:
    dm = _dm(source="digits", benchmark="permuted", num_tasks=3, batch_size=16)
    assert dm.input_shape == (1, 8, 8) and dm.num_classes == 10
    assert dm.tasks.pixel_maps.shape == (1, 3, 64) and dm.tasks.member_pixel_maps(0).shape == (3, 64)
    assert torch.equal(dm.tasks.member_pixel_maps(0)[0], torch.arange(64))
    x, y, t = next(iter(dm.train_dataloader()))
    assert x.shape == (1, 16, 1, 8, 8) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    n_train, n_test = len(dm.task_set(0, "train")), len(dm.task_set(0, "test"))
    assert n_train + n_test == 1797
    full = _member(dm.task_set(0, "train"))[0]
    assert float(full.max()) == 1.0  # digits' 0..16 scaled by 16


def test_digits_rotated_and_split() -> None:
    rot = _dm(source="digits", benchmark="rotated", num_tasks=3, degrees_per_task=90.0)
    assert rot.tasks.pixel_maps.shape == (3, 64) and rot.tasks.member_pixel_maps(0).shape == (3, 64)
    split = _dm(source="digits", benchmark="split", num_tasks=5, classes_per_task=2)
    assert split.class_mask.shape == (1, 5, 10)
    _, y, _ = _member(split.task_set(4, "test"))
    assert set(y.tolist()) == {8, 9}


# --------------------------------------------------------------------------- schedule


def test_schedule_helpers() -> None:
    dm = ContinualDataModule(num_tasks=4, epochs_per_task=3, seed=0)  # no setup needed
    assert [dm.task_of_epoch(e) for e in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert dm.task_of_epoch(12) == 3 and dm.task_of_epoch(100) == 3  # clamped to the last task
    assert [e for e in range(12) if dm.is_task_start(e)] == [0, 3, 6, 9]
    assert [e for e in range(12) if dm.is_task_end(e)] == [2, 5, 8, 11]
    assert dm.current_task == 0
    assert dm.tasks is None  # the schedule set nothing up


def test_invalid_sizes_raise() -> None:
    with pytest.raises(ValueError, match="positive"):
        ContinualDataModule(num_tasks=0)
    with pytest.raises(ValueError, match="positive"):
        ContinualDataModule(epochs_per_task=0)
    with pytest.raises(ConfigError, match="data.seeds is empty"):
        ContinualDataModule(seeds=[])


# --------------------------------------------------------------------------- evaluation loaders


@pytest.mark.parametrize("seeds", [None, [0, 1, 2]])
def test_test_dataloader_one_loader_per_task(mnist_root: Path, seeds: list[int] | None) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=4, eval_batch_size=128, seeds=seeds)
    loaders = dm.test_dataloader()
    assert len(loaders) == 4
    for i, loader in enumerate(loaders):
        assert isinstance(loader, MemberEvalBatches)
        count = 0
        xs = []
        for x, y, t in loader:
            assert x.shape[0] == dm.size and x.shape[1] <= 128 and x.shape[2:] == (1, 28, 28)
            assert torch.all(t == i), i
            count += y.shape[1]
            xs.append(x)
        assert count == 200
        # the task's examples in pool order: member k's batches are its whole task, in order
        assert torch.equal(torch.cat(xs, dim=1), _all(dm.task_set(i, "test"))[0]), i


def test_val_dataloader_tasks_seen_or_all(mnist_root: Path) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=4)
    assert len(dm.val_dataloader()) == 1  # before fitting: task 0 only
    future = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=4, eval_future_tasks=True)
    loaders = future.val_dataloader()
    assert len(loaders) == 4
    for i, loader in enumerate(loaders):
        assert all(torch.all(t == i) for _, _, t in loader)


def test_setup_is_idempotent(mnist_root: Path) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=2)
    tasks = dm.tasks
    maps, pools = tasks.pixel_maps, tasks.pools
    dm.setup("test")
    assert dm.tasks is tasks and dm.tasks.pixel_maps is maps and dm.tasks.pools is pools


def test_task_set_sets_up_lazily(mnist_root: Path) -> None:
    dm = ContinualDataModule(source="mnist", root=str(mnist_root), benchmark="permuted", num_tasks=2, seed=0)
    assert dm.tasks is None
    x, y, t = dm.task_set(1, "test").batch(3, 4)  # one example
    assert x.shape == (1, 1, 1, 28, 28) and y.shape == (1, 1) and int(t) == 1
    assert dm.tasks is not None and dm.seeds == (0,)


@pytest.mark.parametrize("fraction", [0.0001, 0.99999, 1.0])
def test_val_fraction_that_leaves_a_split_empty_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        _dm(source="digits", benchmark="permuted", num_tasks=2, val_fraction=fraction)
