"""cl_lightning.data.members: member k of a population sees bitwise the data of the population of one
with seed k (the plain run).

Every comparison is against ``ContinualDataModule(seeds=[s_k])`` on the same fake files: its pixel
maps, class masks, pools, training batches and evaluation batches.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.data.members import MemberBatches, MemberData, MemberEvalBatches, epoch_orders, member_tasks
from cl_lightning.data.sources import ImageSet, load_source
from cl_lightning.errors import ConfigError

SEEDS = [3, 11, 7]
#: Settings member_tasks and the datamodule share; the rest are the datamodule's alone.
TASK_SETTINGS = ("benchmark", "num_tasks", "degrees_per_task", "classes_per_task", "class_order",
                 "train_examples_per_task", "test_examples_per_task", "val_fraction")


def _at_epoch(dm: ContinualDataModule, epoch: int, rank: int = 0, world_size: int = 1, processed: int = 0) -> None:
    """Give ``dm`` a stand-in trainer with exactly what its loaders read: the epoch, the DDP place
    (a real single-device Trainer cannot pretend to be rank 2 of 3) and the batches processed."""
    current = SimpleNamespace(processed=processed)
    dm.trainer = SimpleNamespace(
        current_epoch=epoch, global_rank=rank, world_size=world_size,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        distributed_sampler_kwargs={"num_replicas": world_size, "rank": rank},
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=current))),
    )


def _solo_runs(root: Path, source: str, seeds: list[int], **settings) -> list[ContinualDataModule]:
    runs = []
    for seed in seeds:
        dm = ContinualDataModule(source=source, root=str(root), seeds=[seed], **settings)
        dm.setup()
        runs.append(dm)
    return runs


def _population(sets: dict[str, ImageSet], seeds: list[int], **settings) -> MemberData:
    tasks = member_tasks(sets["train"], sets["test"], seeds, **{k: v for k, v in settings.items() if k in TASK_SETTINGS})
    return MemberData(tasks, sets["train"], sets["test"])


def _train_batches(data: MemberData, tasks: list[int], epoch: int, batch_size: int, shuffle: bool = True,
                   rank: int = 0, world_size: int = 1, progress: int = 0) -> MemberBatches:
    dataset = data.task_set(tasks, "train")
    order = epoch_orders(data.tasks.seeds, len(dataset), epoch, shuffle)
    return MemberBatches(dataset, order, batch_size, epoch, lambda: progress, rank, world_size)


def _same(a: Tensor, b: Tensor) -> bool:
    """Bitwise equal, dtype and shape included."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _assert_member_batches(member: list, solo: list, k: int) -> None:
    """Member ``k``'s rows of the population's batches are the population of one's batches, bitwise."""
    assert len(member) == len(solo) > 0
    for i, (batch, solo_batch) in enumerate(zip(member, solo)):
        for part, solo_part in zip(batch, solo_batch):
            assert part.shape[0] == len(SEEDS) and solo_part.shape[0] == 1
            assert _same(part[k], solo_part[0]), (k, i)


@pytest.fixture(scope="module")
def mnist_sets(mnist_root: Path) -> dict[str, ImageSet]:
    return {"train": load_source("mnist", mnist_root, train=True), "test": load_source("mnist", mnist_root, train=False)}


# --------------------------------------------------------------------------- member k = solo run with seed k

CASES = {
    "permuted": dict(benchmark="permuted", val_fraction=0.2, train_examples_per_task=100, test_examples_per_task=40),
    "permuted-multitask": dict(benchmark="permuted", joint=True),
    "rotated": dict(benchmark="rotated", degrees_per_task=30.0, val_fraction=0.2),
    "rotated-multitask-unshuffled": dict(benchmark="rotated", degrees_per_task=30.0, joint=True, shuffle=False,
                                         train_examples_per_task=90),
    "split": dict(benchmark="split", class_order="shuffled", val_fraction=0.1, train_examples_per_task=70,
                  test_examples_per_task=5),
}


@pytest.mark.parametrize("case", CASES)
def test_member_k_sees_the_solo_run_of_seed_k(case: str, mnist_root: Path, mnist_sets: dict, cifar_root: Path) -> None:
    settings = dict(num_tasks=3, epochs_per_task=2, batch_size=32, eval_batch_size=16, eval_future_tasks=True, **CASES[case])
    if settings["benchmark"] == "split":  # split CIFAR-100, as the paper: 5 shuffled classes per task
        root, source = cifar_root, "cifar100"
        sets = {"train": load_source(source, root, train=True), "test": load_source(source, root, train=False)}
    else:
        root, source, sets = mnist_root, "mnist", mnist_sets
    solo = _solo_runs(root, source, SEEDS, **settings)
    data = _population(sets, SEEDS, **settings)
    tasks = data.tasks
    epoch = 3  # the second epoch of task 1: the multitask set is tasks 0 and 1
    trained = [0, 1] if settings.get("joint") else [1]
    batches = list(_train_batches(data, trained, epoch, 32, settings.get("shuffle", True)))
    evals = {split: [list(MemberEvalBatches(data.task_set(t, split), 16)) for t in range(3)] for split in ("val", "test")}
    for k, dm in enumerate(solo):
        maps, solo_maps = tasks.member_pixel_maps(k), dm.tasks.member_pixel_maps(0)
        assert (maps is None and solo_maps is None) or _same(maps, solo_maps)
        if settings["benchmark"] == "split":
            assert _same(tasks.task_classes[k], dm.tasks.task_classes[0]) and _same(tasks.class_mask[k], dm.class_mask[0])
        for split in ("train", "val", "test"):
            for t in range(3):
                assert _same(tasks.pools[split][t][k], dm.task_set(t, split).base_index[0]), (split, t)
        _at_epoch(dm, epoch)
        _assert_member_batches(batches, list(dm.train_dataloader()), k)
        solo_evals = {"val": dm.val_dataloader(), "test": dm.test_dataloader()}
        for split in ("val", "test"):
            if split == "val" and not settings.get("val_fraction"):
                continue
            for t in range(3):
                _assert_member_batches(evals[split][t], list(solo_evals[split][t]), k)
    if settings["benchmark"] == "rotated":  # the rotation maps are shared, not repeated per member
        assert tasks.pixel_maps.shape == (3, 784)
    if settings["benchmark"] == "permuted":
        assert tasks.pixel_maps.shape == (3, 3, 784)


def test_first_epoch_of_the_first_task(mnist_root: Path, mnist_sets: dict) -> None:
    """What Lightning loads before fitting (no trainer yet: epoch 0, task 0)."""
    settings = dict(benchmark="permuted", num_tasks=2, batch_size=64)
    solo = _solo_runs(mnist_root, "mnist", SEEDS, **settings)
    batches = list(_train_batches(_population(mnist_sets, SEEDS, **settings), [0], 0, 64))
    for k, dm in enumerate(solo):
        _assert_member_batches(batches, list(dm.train_dataloader()), k)


# --------------------------------------------------------------------------- members are independent


def test_changing_one_members_seed_leaves_the_others_data(mnist_sets: dict) -> None:
    settings = dict(benchmark="permuted", num_tasks=3, val_fraction=0.2, train_examples_per_task=100)
    a = _population(mnist_sets, [3, 11, 7], **settings)
    b = _population(mnist_sets, [3, 11, 8], **settings)
    assert torch.equal(a.tasks.pixel_maps[:2], b.tasks.pixel_maps[:2])
    assert not torch.equal(a.tasks.pixel_maps[2, 1:], b.tasks.pixel_maps[2, 1:])
    for split in ("train", "val"):
        for t in range(3):
            assert torch.equal(a.tasks.pools[split][t][:2], b.tasks.pools[split][t][:2])
            assert not torch.equal(a.tasks.pools[split][t][2], b.tasks.pools[split][t][2])
    for batch_a, batch_b in zip(_train_batches(a, [1], 2, 50), _train_batches(b, [1], 2, 50)):
        for part_a, part_b in zip(batch_a, batch_b):
            assert torch.equal(part_a[:2], part_b[:2])
        assert not torch.equal(batch_a[0][2], batch_b[0][2])


# --------------------------------------------------------------------------- one copy of the base images


@pytest.mark.parametrize("benchmark", ["permuted", "rotated"])
def test_base_images_are_stored_once(mnist_sets: dict, benchmark: str) -> None:
    data = _population(mnist_sets, SEEDS, benchmark=benchmark, num_tasks=3, val_fraction=0.2)
    train = mnist_sets["train"].images
    assert data.sets["train"].images.data_ptr() == train.data_ptr()  # on the CPU: not even one copy
    assert data.sets["val"] is data.sets["train"]
    n = len(data.tasks.pools["train"][0][0])
    for batches in (_train_batches(data, [2], 5, 32), _train_batches(data, [0, 1, 2], 5, 32),
                    MemberEvalBatches(data.task_set(1, "val"), 16)):
        held = vars(batches.dataset)
        assert held["base"].images is data.sets["train"].images
        # besides the base images only indices and maps: nothing holds a member's task images
        assert all(value.dtype == torch.int64 and value.dim() in (2, 3) for value in held.values() if isinstance(value, Tensor))
        assert held["base_index"].shape[0] == 3 and held["base_index"].shape[1] in (n, 3 * n, len(data.tasks.pools["val"][1][0]))
        assert held["pixel_maps"].data_ptr() == data.pixel_maps.data_ptr()
    # tasks without a subset share one pool tensor instead of holding T copies
    assert data.tasks.pools["train"][0] is data.tasks.pools["train"][2]


# --------------------------------------------------------------------------- DDP shares


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_shares_match_task_batches(mnist_root: Path, mnist_sets: dict, world_size: int) -> None:
    """100 training and 40 test examples: neither divides by 3, so shares are padded (training) or off by one."""
    settings = dict(benchmark="permuted", num_tasks=2, epochs_per_task=1, batch_size=16, eval_batch_size=8,
                    train_examples_per_task=100, test_examples_per_task=40)
    solo = _solo_runs(mnist_root, "mnist", SEEDS, **settings)
    data = _population(mnist_sets, SEEDS, **settings)
    for rank in range(world_size):
        batches = list(_train_batches(data, [1], 1, 16, rank=rank, world_size=world_size))
        evals = list(MemberEvalBatches(data.task_set(1, "test"), 8, rank, world_size))
        for k, dm in enumerate(solo):
            _at_epoch(dm, 1, rank, world_size)
            _assert_member_batches(batches, list(dm.train_dataloader()), k)
            _assert_member_batches(evals, list(dm.test_dataloader()[1]), k)


# --------------------------------------------------------------------------- mid-epoch resume


def test_resume_mid_epoch_yields_the_remaining_batches(mnist_root: Path, mnist_sets: dict) -> None:
    settings = dict(benchmark="rotated", num_tasks=2, epochs_per_task=2, batch_size=64)
    data = _population(mnist_sets, SEEDS, **settings)
    whole = list(_train_batches(data, [1], 3, 64))
    assert len(whole) == 10
    loader = _train_batches(data, [1], 3, 64, progress=4)
    assert loader.state_dict() == {"epoch": 3, "batches": 4}
    loader.load_state_dict({"epoch": 3, "batches": 4})
    rest = list(loader)
    assert len(rest) == 6
    for got, expected in zip(rest, whole[4:]):
        assert all(torch.equal(u, v) for u, v in zip(got, expected))
    assert len(list(loader)) == 10  # the restored position applies to the first pass only
    stale = _train_batches(data, [1], 3, 64)
    stale.load_state_dict({"epoch": 2, "batches": 4})  # another epoch's state: ignored
    assert len(list(stale)) == 10
    for k, dm in enumerate(_solo_runs(mnist_root, "mnist", SEEDS, **settings)):  # as a solo run resumes
        _at_epoch(dm, 3)
        solo = dm.train_dataloader()
        solo.load_state_dict({"epoch": 3, "batches": 4})
        _assert_member_batches(rest, list(solo), k)


# --------------------------------------------------------------------------- refused settings


def test_tasks_of_unequal_size_are_refused_with_the_fix() -> None:
    """Digits' classes differ in size (139-146 training images), so shuffled split tasks differ per seed."""
    sets = {"train": load_source("digits", "", train=True), "test": load_source("digits", "", train=False)}
    settings = dict(benchmark="split", num_tasks=5, classes_per_task=2, class_order="shuffled")
    with pytest.raises(ConfigError, match=r"task 1 has a different number of training examples .*seed 0: \d+, seed 1: \d+.*"
                                          r"Set data.train_examples_per_task to at most 281 .*or run these seeds separately"):
        member_tasks(sets["train"], sets["test"], [0, 1, 2], **settings)
    with pytest.raises(ConfigError, match=r"different number of test examples.*data.test_examples_per_task to at most 71"):
        member_tasks(sets["train"], sets["test"], [0, 1, 2], train_examples_per_task=281, **settings)
    tasks = member_tasks(sets["train"], sets["test"], [0, 1, 2], train_examples_per_task=281, test_examples_per_task=71,
                         **settings)
    assert [tuple(pool.shape) for pool in tasks.pools["train"]] == [(3, 281)] * 5
    assert tasks.class_mask.shape == (3, 5, 10) and torch.equal(tasks.class_mask.sum(2), torch.full((3, 5), 2))


def test_subset_larger_than_a_task_is_refused(mnist_sets: dict) -> None:
    with pytest.raises(ConfigError, match=r"data.train_examples_per_task is 500 but task 1 has only 480 training examples "
                                          r"for seed 3.*at most 480"):
        member_tasks(mnist_sets["train"], mnist_sets["test"], SEEDS, benchmark="permuted", num_tasks=2, val_fraction=0.2,
                     train_examples_per_task=500)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("benchmark", ["permuted", "rotated"])
def test_batches_on_the_accelerator_equal_the_cpu_batches(mnist_sets: dict, benchmark: str) -> None:
    """Gathers and the uint8 -> [0, 1] scaling are exact, so the device changes no bit."""
    tasks = member_tasks(mnist_sets["train"], mnist_sets["test"], SEEDS, benchmark=benchmark, num_tasks=3, val_fraction=0.2)
    cpu = MemberData(tasks, mnist_sets["train"], mnist_sets["test"])
    cuda = MemberData(tasks, mnist_sets["train"], mnist_sets["test"], torch.device("cuda"))
    for tasks_trained in ([1], [0, 1, 2]):
        for got, expected in zip(_train_batches(cuda, tasks_trained, 2, 64), _train_batches(cpu, tasks_trained, 2, 64)):
            assert all(_same(u.cpu(), v) for u, v in zip(got, expected))
    for got, expected in zip(MemberEvalBatches(cuda.task_set(2, "val"), 50), MemberEvalBatches(cpu.task_set(2, "val"), 50)):
        assert all(_same(u.cpu(), v) for u, v in zip(got, expected))
