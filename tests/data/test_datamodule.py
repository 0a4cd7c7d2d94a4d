"""cl_lightning.data.datamodule: the task sequence as one LightningDataModule, on real (fake) files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torchvision.transforms.functional import InterpolationMode, rotate

from cl_lightning.data.datamodule import ContinualDataModule, TaskDataset
from cl_lightning.data.sources import load_source
from cl_lightning.data.tasks import rotation_maps


def _dm(root: Path | None = None, **kwargs) -> ContinualDataModule:
    """A set-up datamodule; ``seed`` defaults to 0 so no test depends on the environment."""
    kwargs.setdefault("seed", 0)
    if root is not None:
        kwargs["root"] = str(root)
    dm = ContinualDataModule(**kwargs)
    dm.setup()
    return dm


def _all(dataset: TaskDataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every item of ``dataset`` in one batch."""
    return dataset.__getitems__(list(range(len(dataset))))


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
    assert dm.input_shape == (1, 28, 28) and dm.num_classes == 10
    assert dm.pixel_maps is not None and dm.pixel_maps.shape == (3, 784)
    assert dm.class_mask is None
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == 600 // 32 + 1
    for x, y, task in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert y.dtype == torch.int64 and task.dtype == torch.int64
        assert torch.all(task == 0)
    assert batches[0][0].shape[0] == 32 and batches[-1][0].shape[0] == 600 % 32
    ys = torch.cat([y for _, y, _ in batches])
    assert torch.bincount(ys, minlength=10).tolist() == [60] * 10  # every training example once


def test_permuted_task_datasets_are_base_images_through_the_maps(mnist_root: Path, mnist_base: dict) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=4)
    base = mnist_base["test"]
    base_x = base.images.float() / 255
    assert torch.equal(dm.pixel_maps[0], torch.arange(784))
    for t in range(4):
        x, y, task = _all(dm.task_dataset(t, "test"))
        assert len(x) == 200
        assert torch.equal(y, base.targets)
        assert torch.all(task == t)
        perm = dm.pixel_maps[t]
        expected = base_x.flatten(2)[:, :, perm].view(200, 1, 28, 28)  # out[i] = in[perm[i]]
        assert torch.equal(x, expected), t
        if t > 0:
            assert not torch.equal(x, base_x)
    assert torch.equal(_all(dm.task_dataset(0, "test"))[0], base_x)


def test_permuted_maps_are_seeded(mnist_root: Path) -> None:
    a = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=3, seed=5)
    b = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=3, seed=5)
    c = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=3, seed=6)
    assert torch.equal(a.pixel_maps, b.pixel_maps)
    assert not torch.equal(a.pixel_maps[1:], c.pixel_maps[1:])


@pytest.fixture(scope="module")
def rotated20(mnist_root: Path) -> ContinualDataModule:
    return _dm(mnist_root, source="mnist", benchmark="rotated", num_tasks=20, degrees_per_task=9.0)


@pytest.mark.parametrize(
    "task",
    [1, 2, 3, 4, 5, 10, 15, 19],
)
def test_rotated_task_equals_torchvision_rotate(rotated20: ContinualDataModule, mnist_base: dict, task: int) -> None:
    x, y, t = _all(rotated20.task_dataset(task, "test"))
    base = mnist_base["test"]
    assert torch.equal(y, base.targets) and torch.all(t == task)
    angle = task * 9.0  # 0-based task t is the paper's task t+1: rotated by ((t+1)-1) * 9
    expected = rotate(base.images, angle, interpolation=InterpolationMode.NEAREST, fill=0).float() / 255
    assert torch.equal(x, expected), f"{int((x != expected).flatten(1).any(1).sum())} images differ"


def test_rotated_maps_are_the_rotation_maps(rotated20: ContinualDataModule) -> None:
    assert torch.equal(rotated20.pixel_maps[0], torch.arange(784))
    assert torch.equal(rotated20.pixel_maps, rotation_maps(20, 28, 28, 9.0))


def test_rotated_first_task_is_unrotated(mnist_root: Path, mnist_base: dict) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="rotated", num_tasks=3, degrees_per_task=30.0)
    x, _, _ = _all(dm.task_dataset(0, "train"))
    assert torch.equal(x, mnist_base["train"].images.float() / 255)


def test_fashion_mnist_gz_source(fashion_root: Path) -> None:
    dm = _dm(fashion_root, source="fashion_mnist", benchmark="permuted", num_tasks=2, batch_size=100)
    x, y, t = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 28, 28) and torch.all(t == 0)
    assert len(dm.task_dataset(1, "test")) == 200


# --------------------------------------------------------------------------- split CIFAR-100


def test_split_cifar100_label_order(cifar_root: Path) -> None:
    dm = _dm(cifar_root, source="cifar100", benchmark="split", num_tasks=20, classes_per_task=5)
    assert dm.input_shape == (3, 32, 32) and dm.num_classes == 100
    assert dm.pixel_maps is None
    assert torch.equal(dm.task_classes, torch.arange(100).view(20, 5))
    mask = dm.class_mask
    assert mask.shape == (20, 100) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [5] * 20
    base_train = load_source("cifar100", cifar_root, train=True)
    every_task = list(range(20))
    for split, per_class in (("train", 20), ("test", 5)):
        union = dm.task_dataset(every_task, split)  # tasks 0..19 one after the other
        x, y, task = _all(union)
        assert len(y) == 100 * per_class
        for t in range(20):
            classes = list(range(5 * t, 5 * t + 5))
            assert torch.nonzero(mask[t]).flatten().tolist() == classes
            yt = y[task == t]
            assert len(yt) == 5 * per_class and len(dm.task_dataset(t, split)) == 5 * per_class
            assert sorted(yt.unique().tolist()) == classes, (t, split)
            assert torch.bincount(yt, minlength=100)[classes].tolist() == [per_class] * 5  # all of them
        assert torch.all(mask[task, y])
        if split == "train":  # split tasks are not transformed: x is the stored image scaled to [0, 1]
            assert x.shape == (2000, 3, 32, 32)
            assert torch.equal(x, base_train.images[union.base_index].float() / 255)


def test_split_cifar100_shuffled_order_is_seeded(cifar_root: Path) -> None:
    kwargs = dict(source="cifar100", benchmark="split", num_tasks=20, classes_per_task=5, class_order="shuffled")
    a = _dm(cifar_root, seed=1, **kwargs)
    b = _dm(cifar_root, seed=1, **kwargs)
    c = _dm(cifar_root, seed=2, **kwargs)
    assert torch.equal(a.task_classes, b.task_classes)
    assert not torch.equal(a.task_classes, c.task_classes)
    assert not torch.equal(a.task_classes, torch.arange(100).view(20, 5))
    assert torch.equal(a.task_classes.flatten().sort().values, torch.arange(100))
    assert torch.equal(a.class_mask.sum(0), torch.ones(100, dtype=torch.long))  # each class in one task
    for t in (0, 7, 19):
        _, y, _ = _all(a.task_dataset(t, "test"))
        assert set(y.tolist()) == set(a.task_classes[t].tolist())


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
    for split, size, total in (("train", 50, 600), ("test", 20, 200)):
        pools = [a.task_dataset(t, split).base_index for t in range(3)]
        for t, pool in enumerate(pools):
            assert len(pool) == size
            assert len(pool.unique()) == size and int(pool.min()) >= 0 and int(pool.max()) < total
            assert torch.equal(pool, b.task_dataset(t, split).base_index)  # same seed, same subset
            assert not torch.equal(pool, c.task_dataset(t, split).base_index)  # other seed
        assert not torch.equal(pools[0], pools[1]) and not torch.equal(pools[1], pools[2])
    x, y, t = next(iter(a.train_dataloader()))
    assert len(a.train_dataloader().dataset) == 50


def test_examples_per_task_larger_than_the_pool_is_refused(cifar_root: Path) -> None:
    """Not clamped: the run would otherwise be reported with more examples per task than it used."""
    with pytest.raises(ValueError, match=r"data.test_examples_per_task is 1000 but task 1 has only 25 test examples.*"
                                         r"at most 25, or to null"):
        _dm(cifar_root, source="cifar100", benchmark="split", num_tasks=4, train_examples_per_task=60,
            test_examples_per_task=1000)
    dm = _dm(cifar_root, source="cifar100", benchmark="split", num_tasks=4, train_examples_per_task=100,
             test_examples_per_task=25)  # exactly all of them is fine
    assert [len(dm.task_dataset(t, "train")) for t in range(4)] == [100] * 4
    assert [len(dm.task_dataset(t, "test")) for t in range(4)] == [25] * 4


# --------------------------------------------------------------------------- validation split


def test_val_fraction_splits_the_training_set(mnist_root: Path) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=2, val_fraction=0.25)
    assert dm.eval_split == "val"
    for t in range(2):
        train = dm.task_dataset(t, "train").base_index
        val = dm.task_dataset(t, "val").base_index
        assert len(val) == 150 and len(train) == 450
        assert not set(train.tolist()) & set(val.tolist())
        assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(600))
    # val items are training images, seen through the task's map
    x, y, task = _all(dm.task_dataset(1, "val"))
    base = load_source("mnist", mnist_root, train=True)
    assert torch.equal(y, base.targets[dm.task_dataset(1, "val").base_index])
    assert torch.all(task == 1)
    loaders = dm.val_dataloader()
    assert len(loaders) == 1 and len(loaders[0].dataset) == 150
    # seeded
    again = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=2, val_fraction=0.25)
    assert torch.equal(again.task_dataset(0, "val").base_index, dm.task_dataset(0, "val").base_index)
    other = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=2, val_fraction=0.25, seed=9)
    assert not torch.equal(other.task_dataset(0, "val").base_index, dm.task_dataset(0, "val").base_index)


def test_val_fraction_zero_evaluates_on_test(mnist_root: Path) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=2, val_fraction=0.0)
    assert dm.eval_split == "test"
    assert len(dm.task_dataset(0, "train")) == 600
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
    union = dm.task_dataset([0, 1, 2], "train")
    sizes = [len(dm.task_dataset(t, "train")) for t in range(3)]
    assert len(union) == sum(sizes) == 120
    x, y, task = _all(union)
    assert torch.bincount(task, minlength=4).tolist() == [40, 40, 40, 0]
    start = 0
    for t in range(3):  # each part is exactly task t's dataset
        xt, yt, _ = _all(dm.task_dataset(t, "train"))
        assert torch.equal(x[start : start + 40], xt) and torch.equal(y[start : start + 40], yt)
        start += 40


@pytest.mark.parametrize("joint", [True, False])
def test_train_dataloader_follows_the_trainer_epoch(mnist_root: Path, tmp_path: Path, joint: bool) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=4, epochs_per_task=2,
             joint=joint, batch_size=256)
    dm.trainer = _trainer_at_epoch(tmp_path, 5)  # epochs 4, 5 are task index 2
    assert dm.current_task == 2
    tasks = torch.cat([t for _, _, t in dm.train_dataloader()])
    if joint:
        assert torch.bincount(tasks, minlength=4).tolist() == [600, 600, 600, 0]
    else:
        assert torch.bincount(tasks, minlength=4).tolist() == [0, 0, 600, 0]
    assert len(dm.val_dataloader()) == 3  # tasks seen so far


# --------------------------------------------------------------------------- shuffling


def test_shuffle_order_is_a_function_of_seed_and_epoch(mnist_root: Path, tmp_path: Path) -> None:
    kwargs = dict(source="mnist", benchmark="permuted", num_tasks=2, epochs_per_task=3, batch_size=200)
    a, b, c = _dm(mnist_root, **kwargs), _dm(mnist_root, **kwargs), _dm(mnist_root, seed=1, **kwargs)
    first_a, first_b, first_c = (next(iter(d.train_dataloader())) for d in (a, b, c))
    for u, v in zip(first_a, first_b):
        assert torch.equal(u, v)
    assert not torch.equal(first_a[1], first_c[1])
    # iterating a loader again (as Lightning does on resume) does not change the order
    loader = a.train_dataloader()
    assert torch.equal(torch.cat([y for _, y, _ in loader]), torch.cat([y for _, y, _ in loader]))
    # another epoch of the same task: another order, the same for every datamodule with the seed
    a.trainer = _trainer_at_epoch(tmp_path, 1)
    b.trainer = _trainer_at_epoch(tmp_path, 1)
    epoch1_a, epoch1_b = next(iter(a.train_dataloader())), next(iter(b.train_dataloader()))
    assert torch.equal(epoch1_a[0], epoch1_b[0]) and torch.equal(epoch1_a[1], epoch1_b[1])
    assert not torch.equal(epoch1_a[1], first_a[1])
    assert torch.all(epoch1_a[2] == 0)


def test_no_shuffle_gives_dataset_order(mnist_root: Path, mnist_base: dict) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="rotated", num_tasks=2, shuffle=False, batch_size=200)
    x, y, t = next(iter(dm.train_dataloader()))
    base = mnist_base["train"]
    assert torch.equal(y, base.targets[:200])
    assert torch.equal(x, base.images[:200].float() / 255)  # task 1 of rotated: unrotated
    ys = torch.cat([y for _, y, _ in dm.train_dataloader()])
    assert torch.equal(ys, base.targets)


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
    assert torch.equal(dm.pixel_maps, explicit.pixel_maps)
    assert not torch.equal(dm.pixel_maps, other.pixel_maps)
    for u, v in zip(next(iter(dm.train_dataloader())), next(iter(explicit.train_dataloader()))):
        assert torch.equal(u, v)


def test_seed_none_reads_pl_global_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "77")
    dm = _dm(source="digits", benchmark="permuted", num_tasks=2, seed=None)
    assert torch.equal(dm.pixel_maps, _dm(source="digits", benchmark="permuted", num_tasks=2, seed=77).pixel_maps)


def test_seed_none_without_seed_everything_warns_and_uses_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    dm = ContinualDataModule(source="digits", benchmark="permuted", num_tasks=2, seed=None)
    with pytest.warns(UserWarning, match="No seed set"):
        dm.setup()
    assert torch.equal(dm.pixel_maps, _dm(source="digits", benchmark="permuted", num_tasks=2, seed=0).pixel_maps)


# --------------------------------------------------------------------------- digits


def test_digits_source_offline() -> None:
    dm = _dm(source="digits", benchmark="permuted", num_tasks=3, batch_size=16)
    assert dm.input_shape == (1, 8, 8) and dm.num_classes == 10
    assert dm.pixel_maps.shape == (3, 64)
    assert torch.equal(dm.pixel_maps[0], torch.arange(64))
    x, y, t = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    n_train, n_test = len(dm.task_dataset(0, "train")), len(dm.task_dataset(0, "test"))
    assert n_train + n_test == 1797
    full = _all(dm.task_dataset(0, "train"))[0]
    assert float(full.max()) == 1.0  # digits' 0..16 scaled by 16


def test_digits_rotated_and_split() -> None:
    rot = _dm(source="digits", benchmark="rotated", num_tasks=3, degrees_per_task=90.0)
    assert rot.pixel_maps.shape == (3, 64)
    split = _dm(source="digits", benchmark="split", num_tasks=5, classes_per_task=2)
    assert split.class_mask.shape == (5, 10)
    _, y, _ = _all(split.task_dataset(4, "test"))
    assert set(y.tolist()) == {8, 9}


# --------------------------------------------------------------------------- schedule


def test_schedule_helpers() -> None:
    dm = ContinualDataModule(num_tasks=4, epochs_per_task=3, seed=0)  # no setup needed
    assert [dm.task_of_epoch(e) for e in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert dm.task_of_epoch(12) == 3 and dm.task_of_epoch(100) == 3  # clamped to the last task
    assert [e for e in range(12) if dm.is_task_start(e)] == [0, 3, 6, 9]
    assert [e for e in range(12) if dm.is_task_end(e)] == [2, 5, 8, 11]
    assert dm.current_task == 0


def test_invalid_sizes_raise() -> None:
    with pytest.raises(ValueError, match="positive"):
        ContinualDataModule(num_tasks=0)
    with pytest.raises(ValueError, match="positive"):
        ContinualDataModule(epochs_per_task=0)


# --------------------------------------------------------------------------- evaluation loaders


def test_test_dataloader_one_loader_per_task(mnist_root: Path) -> None:
    dm = _dm(mnist_root, source="mnist", benchmark="permuted", num_tasks=4, eval_batch_size=128)
    loaders = dm.test_dataloader()
    assert len(loaders) == 4
    for i, loader in enumerate(loaders):
        count = 0
        for x, y, t in loader:
            assert x.shape[0] <= 128 and x.shape[1:] == (1, 28, 28)
            assert torch.all(t == i), i
            count += len(y)
        assert count == 200


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
    maps, pools = dm.pixel_maps, dm._pools
    dm.setup("test")
    assert dm.pixel_maps is maps and dm._pools is pools


def test_task_dataset_sets_up_lazily(mnist_root: Path) -> None:
    dm = ContinualDataModule(source="mnist", root=str(mnist_root), benchmark="permuted", num_tasks=2, seed=0)
    x, y, t = dm.task_dataset(1, "test")[3]  # __getitem__ also works, one item
    assert x.shape == (1, 28, 28) and y.dim() == 0 and int(t) == 1


@pytest.mark.parametrize("fraction", [0.0001, 0.99999, 1.0])
def test_val_fraction_that_leaves_a_split_empty_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        _dm(source="digits", benchmark="permuted", num_tasks=2, val_fraction=fraction)
