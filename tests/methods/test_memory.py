import pytest
import torch

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.methods.memory import DrawOptions, EpisodicMemory, ExampleDraw


def permuted_digits(seed: int) -> ContinualDataModule:
    """As the ``digits`` fixture with another seed."""
    return ContinualDataModule(source="digits", benchmark="permuted", num_tasks=3, seed=seed)


def test_per_task_memory_is_seeded_and_task_transformed(digits):
    a, b, c = EpisodicMemory(per_task=10, replacement=True), EpisodicMemory(per_task=10, replacement=True), EpisodicMemory(per_task=10)
    other_seed = permuted_digits(seed=1)
    for t in range(3):
        a.add_task(digits, t)
        b.add_task(digits, t)
        c.add_task(other_seed, t)
    assert all(torch.equal(a.indices[t], b.indices[t]) for t in range(3))
    assert not all(torch.equal(a.indices[t], c.indices[t]) for t in range(3))
    x, y, task = a.batch(digits, 2)
    assert a.indices[2].shape == (1, 10) and x.shape == (1, 10, 1, 8, 8) and torch.all(task == 2)
    # the memory batch is exactly task 3's training examples at those positions (permuted pixels)
    examples = digits.task_set(2, "train")
    expected = [examples.batch(int(i), int(i) + 1) for i in a.indices[2][0]]
    assert torch.equal(x, torch.cat([e[0] for e in expected], dim=1)) and torch.equal(y, torch.cat([e[1] for e in expected], dim=1))


@pytest.mark.parametrize("sizes", [{"per_task": 10, "replacement": True}, {"per_task": 10}, {"per_class": 2}])
def test_member_k_holds_the_memory_of_the_population_of_one_with_seed_k(sizes):
    benchmark = "split" if "per_class" in sizes else "permuted"
    population = ContinualDataModule(source="digits", benchmark=benchmark, num_tasks=2, seeds=[4, 0, 9])
    memory = EpisodicMemory(**sizes)
    for t in range(2):
        memory.add_task(population, t)
    batch = memory.batch(population, [0, 1])
    for k, seed in enumerate([4, 0, 9]):
        solo_dm = ContinualDataModule(source="digits", benchmark=benchmark, num_tasks=2, seeds=[seed])
        solo = EpisodicMemory(**sizes)
        for t in range(2):
            solo.add_task(solo_dm, t)
            assert torch.equal(memory.indices[t][k], solo.indices[t][0])
        for part, solo_part in zip(batch, solo.batch(solo_dm, [0, 1])):
            assert torch.equal(part[k], solo_part[0])


def test_adding_a_task_twice_keeps_the_first_draw(digits):
    memory = EpisodicMemory(per_task=5)
    memory.add_task(digits, 0)
    first = memory.indices[0].clone()
    memory.add_task(permuted_digits(seed=123), 0)
    assert torch.equal(memory.indices[0], first)


def test_per_class_memory_holds_exactly_one_per_class():
    dm = ContinualDataModule(source="digits", benchmark="split", num_tasks=2, classes_per_task=5, seed=0)
    dm.setup()
    memory = EpisodicMemory(per_class=1)
    for t in range(2):
        memory.add_task(dm, t)
    _, y, task = memory.batch(dm, [0, 1])
    assert sorted(y[0].tolist()) == list(range(10))
    assert task[0].tolist() == [0] * 5 + [1] * 5


def test_without_replacement_no_duplicates(digits):
    memory = EpisodicMemory(per_task=200)
    memory.add_task(digits, 0)
    assert len(memory.indices[0][0].unique()) == 200


@pytest.mark.parametrize("kwargs", [{"per_task": 0}, {}, {"per_task": 1, "per_class": 1}])
def test_bad_sizes_are_refused(kwargs):
    with pytest.raises(ValueError, match="memory"):
        EpisodicMemory(**kwargs)


def test_state_round_trip(digits):
    memory = EpisodicMemory(per_task=4)
    memory.add_task(digits, 1)
    restored = EpisodicMemory(per_task=4)
    restored.load_state_dict(memory.state_dict())
    assert restored.tasks == [1] and torch.equal(restored.indices[1], memory.indices[1])


def test_errors_name_the_settings_of_the_draw(digits):
    options = DrawOptions("the subset", "it needs examples", "subset_size", "subset_per_class", "subset_replacement")
    with pytest.raises(ValueError, match="the subset needs a size: set exactly one of `subset_size` or `subset_per_class`"):
        ExampleDraw(None, None, options=options)
    with pytest.raises(ValueError, match="lower `subset_size` or set `subset_replacement: true`"):
        ExampleDraw(10_000, options=options).draw(digits.task_set(0, "train"), digits.seeds, ("key",), 0)


def test_per_class_draw_takes_exactly_k_of_each_class_without_duplicates():
    dm = ContinualDataModule(source="digits", benchmark="split", num_tasks=2, classes_per_task=5, seed=0)
    dm.setup()
    dataset = dm.task_set(1, "train")
    index = ExampleDraw(per_class=20).draw(dataset, dm.seeds, ("key",), 1)[0]
    assert len(index.unique()) == len(index) == 100
    assert dataset.base.targets[dataset.base_index[0]][index].bincount().tolist() == [0] * 5 + [20] * 5
    with pytest.raises(ValueError, match="class 5 of task 2 has .*; lower `memory_per_class`"):
        ExampleDraw(per_class=1000).draw(dataset, dm.seeds, ("key",), 1)
