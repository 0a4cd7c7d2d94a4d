"""A-GEM: the projection on real gradients, the memory batches, checkpoints, and real runs on digits."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from sequence_runs import assert_same_run, fit_permuted_digits, straight_and_resumed

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.methods.agem import AGEM, project_gradients
from cl_lightning.metrics.continual import average_accuracy, forgetting
from cl_lightning.models.module import ContinualModule
from cl_lightning.models.nets import MLP

NUM_TASKS = 5


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def loss_gradient(module, x, y):
    loss = F.cross_entropy(module(x), y)
    return torch.autograd.grad(loss, list(module.parameters()))


def hook_setup(digits, **agem_args):
    """A-GEM with task 1 in memory, a network, its optimizer, and a stand-in for the trainer."""
    torch.manual_seed(0)
    module = ContinualModule(MLP(64, [32], 10))  # no dropout: the reference gradient is reproducible
    agem = AGEM(**agem_args)
    agem.memory.add_task(digits, 0)
    trainer = SimpleNamespace(datamodule=digits, current_epoch=1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    return agem, module, trainer, optimizer


def run_hook(agem, module, trainer, optimizer, grads, batch_idx=0):
    """Put ``grads`` in ``.grad``, run the hook; returns the projected gradient and the step's g_ref."""
    params = list(module.parameters())
    for p, g in zip(params, grads):
        p.grad = g.clone()
    agem._batch_idx = batch_idx
    agem.on_before_optimizer_step(trainer, module, optimizer)
    batch = agem.memory_batch(trainer.datamodule, module.device, trainer.current_epoch, batch_idx)
    return flat([p.grad for p in params]), flat(agem.reference_gradient(module, params, batch))


def test_conflicting_gradient_is_projected(digits):
    agem, module, trainer, optimizer = hook_setup(digits)
    x, y, _ = agem.memory.batch(digits, 0)
    # the real gradient of learning the remembered examples with other labels conflicts with g_ref
    g = flat(loss_gradient(module, x, (y + 3) % 10))
    projected, reference = run_hook(agem, module, trainer, optimizer, loss_gradient(module, x, (y + 3) % 10))
    assert g @ reference < 0  # the premise: they conflict
    assert projected @ reference >= -1e-6 * projected.norm() * reference.norm()
    torch.testing.assert_close(projected, g - (g @ reference) / (reference @ reference) * reference)
    assert agem.steps == 1 and agem.projected.item() == 1


def test_agreeing_gradient_is_unchanged(digits):
    agem, module, trainer, optimizer = hook_setup(digits)
    x, y, _ = digits.task_dataset(0, "train").__getitems__(torch.arange(64))
    grads = loss_gradient(module, x, y)  # task 1's own loss on other examples: agrees with its memory
    projected, reference = run_hook(agem, module, trainer, optimizer, grads)
    assert flat(grads) @ reference > 0
    assert torch.equal(projected, flat(grads))
    assert agem.projected.item() == 0


def test_reference_gradient_uses_each_examples_task_mask():
    dm = ContinualDataModule(source="digits", benchmark="split", num_tasks=2, classes_per_task=5, seed=0)
    dm.setup()
    torch.manual_seed(0)
    module = ContinualModule(MLP(64, [16], 10))
    module.class_mask = dm.class_mask  # what ContinualModule.setup provides
    agem = AGEM()
    agem.memory.add_task(dm, 0)
    params = list(module.parameters())
    reference = agem.reference_gradient(module, params, agem.memory_batch(dm, module.device, 1, 0))
    out_bias = reference[-1]  # classes of task 2 are masked out for task 1's memory
    assert (out_bias[~dm.class_mask[0]] == 0).all() and (out_bias[dm.class_mask[0]] != 0).all()


def test_projection_function_handles_both_cases():
    torch.manual_seed(0)
    reference = [torch.randn(5, 3), torch.randn(4)]
    aligned = [r.clone() * 2 for r in reference]
    assert project_gradients(aligned, reference) > 0 and all(torch.equal(a, 2 * r) for a, r in zip(aligned, reference))
    opposed = [-r + 0.1 * torch.randn_like(r) for r in reference]
    project_gradients(opposed, reference)
    assert flat(opposed) @ flat(reference) == pytest.approx(0.0, abs=1e-5)


def test_memory_batches_are_seeded_per_step(digits):
    agem, module, trainer, optimizer = hook_setup(digits, memory_batch_size=4)
    a = agem.memory_batch(digits, module.device, 1, 0)
    b = agem.memory_batch(digits, module.device, 1, 0)
    c = agem.memory_batch(digits, module.device, 1, 1)
    assert len(a[1]) == 4 and all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    whole = AGEM(memory_batch_size=64)
    whole.memory.add_task(digits, 0)
    assert len(whole.memory_batch(digits, module.device, 1, 0)[1]) == 10  # smaller memory: all of it


def test_nothing_happens_without_memory(digits):
    _, module, trainer, optimizer = hook_setup(digits)
    grads = [torch.randn_like(p) for p in module.parameters()]
    for p, g in zip(module.parameters(), grads):
        p.grad = g.clone()
    AGEM().on_before_optimizer_step(trainer, module, optimizer)
    assert all(torch.equal(p.grad, g) for p, g in zip(module.parameters(), grads))


def test_state_survives_a_weights_only_round_trip(digits, tmp_path):
    agem, module, trainer, optimizer = hook_setup(digits, memory_batch_size=4)
    agem.memory.add_task(digits, 1)
    run_hook(agem, module, trainer, optimizer, [torch.randn_like(p) for p in module.parameters()])
    torch.save(agem.state_dict(), tmp_path / "agem.pt")
    restored = AGEM(memory_batch_size=4)
    restored.load_state_dict(torch.load(tmp_path / "agem.pt", weights_only=True))
    assert restored.memory.tasks == [0, 1] and restored.steps == agem.steps
    assert torch.equal(restored.projected, agem.projected)
    for u, v in zip(restored.memory_batch(digits, module.device, 1, 5), agem.memory_batch(digits, module.device, 1, 5)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("kwargs", [{"memory_batch_size": 0}, {"memory_per_class": 0}, {"memory_per_task": 0},
                                    {"memory_per_task": 10, "memory_per_class": 1}])
def test_bad_values_are_refused(kwargs):
    with pytest.raises(ValueError):
        AGEM(**kwargs)


def test_memory_defaults_to_one_example_per_class(digits):
    assert AGEM().memory.per_class == 1 and AGEM(memory_per_task=10).memory.per_task == 10


# ---------------------------------------------------------------------- real runs
AGEM_ARGS = {"memory_per_class": 1, "memory_batch_size": 64}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    naive, _ = fit_permuted_digits(tmp_path_factory.mktemp("naive"), lr=0.02)
    agem = AGEM(**AGEM_ARGS)
    with_agem, _ = fit_permuted_digits(tmp_path_factory.mktemp("agem"), [agem], lr=0.02)
    return naive, with_agem, agem


def test_agem_forgets_less_than_naive_sgd(runs):
    naive, with_agem, _ = runs
    last = NUM_TASKS - 1
    print(f"forgetting naive {forgetting(naive, last):.3f} agem {forgetting(with_agem, last):.3f}; "
          f"average accuracy naive {average_accuracy(naive, last):.1f} agem {average_accuracy(with_agem, last):.1f}")
    assert forgetting(with_agem, last) < forgetting(naive, last) - 0.05  # measured: 0.305 vs 0.400
    assert average_accuracy(with_agem, last) > average_accuracy(naive, last)


def test_memory_holds_one_example_per_class_of_every_task(runs):
    _, _, agem = runs
    assert agem.memory.tasks == list(range(NUM_TASKS))
    assert all(len(agem.memory.indices[t]) == 10 for t in range(NUM_TASKS))


def test_resume_between_tasks_gives_the_same_run(tmp_path):
    straight, resumed = straight_and_resumed(tmp_path, lambda: [AGEM(**AGEM_ARGS)], num_tasks=3, lr=0.02)
    assert_same_run(straight, resumed)
    [resumed_agem] = resumed[0]
    assert resumed_agem.memory.tasks == [0, 1, 2]
