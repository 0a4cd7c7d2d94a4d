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
    assert x.shape == (10, 1, 8, 8) and torch.all(task == 2)
    # the memory batch is exactly task 3's training examples at those indices (permuted pixels)
    expected = digits.task_dataset(2, "train").__getitems__(a.indices[2])
    assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])


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
    assert sorted(y.tolist()) == list(range(10))
    assert task.tolist() == [0] * 5 + [1] * 5


def test_without_replacement_no_duplicates(digits):
    memory = EpisodicMemory(per_task=200)
    memory.add_task(digits, 0)
    assert len(memory.indices[0].unique()) == 200


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
        ExampleDraw(10_000, options=options).draw(digits.task_dataset(0, "train"), torch.Generator(), 0)


def test_per_class_draw_takes_exactly_k_of_each_class_without_duplicates():
    dm = ContinualDataModule(source="digits", benchmark="split", num_tasks=2, classes_per_task=5, seed=0)
    dm.setup()
    dataset = dm.task_dataset(1, "train")
    index = ExampleDraw(per_class=20).draw(dataset, torch.Generator().manual_seed(0), 1)
    assert len(index.unique()) == len(index) == 100
    assert dataset.base.targets[dataset.base_index][index].bincount().tolist() == [0] * 5 + [20] * 5
    with pytest.raises(ValueError, match="class 5 of task 2 has .*; lower `memory_per_class`"):
        ExampleDraw(per_class=1000).draw(dataset, torch.Generator(), 1)
