"""A-GEM per member: the projection on real gradients, the memory batches, checkpoints, and real runs
on digits, where member k of a population is the population of one with its seed."""

from types import SimpleNamespace

import pytest
import torch
from sequence_runs import assert_same_run, fit_permuted_digits, straight_and_resumed

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.methods.agem import AGEM, member_dot, memory_positions, project_gradients
from cl_lightning.metrics.continual import average_accuracy, forgetting
from cl_lightning.models.member_random import member_keys
from cl_lightning.models.member_sgd import MemberSGD
from cl_lightning.models.module import ContinualModule
from cl_lightning.models.nets import MLP

NUM_TASKS = 5
SEEDS = [0, 5, 9]


def row(tensors, k):
    """Member ``k``'s flat vector of a list of ``[N, ...]`` tensors."""
    return torch.cat([t[k].flatten() for t in tensors])


def gradients(module, batch):
    """Each member's gradient of its mean loss on its rows of ``batch`` (``[N, ...]`` per parameter)."""
    return torch.autograd.grad(module.loss(batch), list(module.parameters()))


@pytest.fixture(scope="module")
def population_digits():
    """Three permuted 8x8-digits tasks for the members ``SEEDS``, set up (offline). Shared: do not modify it."""
    dm = ContinualDataModule(source="digits", benchmark="permuted", num_tasks=3, seeds=SEEDS)
    dm.setup()
    return dm


def hook_setup(dm, dropout=0.0, **agem_args):
    """A-GEM with task 1 in memory, a population, its optimizer, and a stand-in for the trainer."""
    module = ContinualModule(MLP(64, [32], 10, dropout=dropout), seeds=list(dm.seeds))
    module.class_mask = dm.class_mask  # what ContinualModule.setup provides
    agem = AGEM(**agem_args)
    agem.memory.add_task(dm, 0)
    trainer = SimpleNamespace(datamodule=dm, current_epoch=1)
    optimizer = MemberSGD(module.parameters(), lr=0.1)
    return agem, module, trainer, optimizer


def run_hook(agem, module, trainer, optimizer, grads, batch_idx=0):
    """Put ``grads`` in ``.grad``, run the hook; returns the projected gradients and the step's g_ref."""
    params = list(module.parameters())
    for p, g in zip(params, grads):
        p.grad = g.clone()
    agem._batch_idx = batch_idx
    agem.on_before_optimizer_step(trainer, module, optimizer)
    batch = agem.memory_batch(trainer.datamodule, module.device, trainer.current_epoch, batch_idx)
    return [p.grad for p in params], agem.reference_gradient(module, params, batch)


# ---------------------------------------------------------------------- the projection on real gradients
def test_conflicting_gradient_is_projected_per_member(population_digits):
    dm = population_digits
    agem, module, trainer, optimizer = hook_setup(dm)
    # a step that ascends the memory loss (minus its gradient), plus task 1's real gradient on other
    # examples so that it is not parallel to g_ref: conflicts with g_ref, and is projected
    ascent, other = gradients(module, agem.memory.batch(dm, 0)), gradients(module, dm.task_set(0).batch(0, 64))
    g = [0.5 * o - a for a, o in zip(ascent, other)]
    projected, reference = run_hook(agem, module, trainer, optimizer, g)
    for k in range(len(SEEDS)):
        g_k, p_k, r_k = row(g, k), row(projected, k), row(reference, k)
        assert g_k @ r_k < 0  # the premise: they conflict
        assert p_k @ r_k >= -1e-6 * p_k.norm() * r_k.norm()  # the property: no increase of the memory loss
        torch.testing.assert_close(p_k, g_k - (g_k @ r_k) / (r_k @ r_k) * r_k)
    assert agem.steps == 1 and agem.projected.tolist() == [1, 1, 1]


def test_agreeing_gradient_is_unchanged(population_digits):
    dm = population_digits
    agem, module, trainer, optimizer = hook_setup(dm)
    grads = gradients(module, dm.task_set(0).batch(0, 64))  # task 1's loss on other examples: agrees with its memory
    projected, reference = run_hook(agem, module, trainer, optimizer, grads)
    assert (member_dot(grads, reference) > 0).all()
    assert all(torch.equal(p, g) for p, g in zip(projected, grads))
    assert agem.projected.tolist() == [0, 0, 0]


def test_only_the_conflicting_member_is_projected(population_digits):
    dm = population_digits
    agem, module, trainer, optimizer = hook_setup(dm)
    agreeing = gradients(module, agem.memory.batch(dm, 0))
    conflicting = [-g for g in agreeing]
    mixed = [torch.cat([a[:1], c[1:2], a[2:]]) for a, c in zip(agreeing, conflicting)]  # member 1 conflicts
    projected, _ = run_hook(agem, module, trainer, optimizer, mixed)
    assert agem.projected.tolist() == [0, 1, 0]
    assert all(torch.equal(p[0], m[0]) and torch.equal(p[2], m[2]) for p, m in zip(projected, mixed))
    assert not torch.equal(row(projected, 1), row(mixed, 1))


def test_reference_gradient_uses_each_examples_task_mask():
    dm = ContinualDataModule(source="digits", benchmark="split", num_tasks=2, classes_per_task=5, class_order="shuffled",
                             train_examples_per_task=700, test_examples_per_task=150, seeds=[0, 1])
    dm.setup()
    module = ContinualModule(MLP(64, [16], 10), seeds=[0, 1])
    module.class_mask = dm.class_mask  # what ContinualModule.setup provides
    agem = AGEM()
    agem.memory.add_task(dm, 0)
    params = list(module.parameters())
    reference = agem.reference_gradient(module, params, agem.memory_batch(dm, module.device, 1, 0))
    out_bias = reference[-1]  # [N, C]: each member's classes outside its task 1 are masked out
    mask = dm.class_mask[:, 0]
    assert not torch.equal(mask[0], mask[1])  # the members' task 1 differ
    assert (out_bias[~mask] == 0).all() and (out_bias[mask] != 0).all()


def test_reference_forward_has_dropout_masks_of_its_own(population_digits):
    """Training mode with dropout, like the step's forward, but stream 1: other masks than the step's."""
    agem, module, trainer, _ = hook_setup(population_digits, dropout=0.5)
    params = list(module.parameters())
    batch = agem.memory_batch(population_digits, module.device, 1, 0)
    reference = agem.reference_gradient(module, params, batch)
    own = torch.autograd.grad(module.loss(batch, stream=1), params)
    step = torch.autograd.grad(module.loss(batch), params)
    assert all(torch.equal(r, o) for r, o in zip(reference, own))
    assert not torch.equal(row(reference, 0), row(step, 0))


# ---------------------------------------------------------------------- the projection's math per member
SHAPES = [(5, 3), (4,)]


def random_members(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=g) for shape in SHAPES]


def test_projection_function_handles_both_cases_per_member():
    reference, noise = random_members(3, 0), random_members(3, 1)
    grads = [torch.stack([2 * r[0], -r[1] + 0.1 * e[1], -r[2] + 0.1 * e[2]]) for r, e in zip(reference, noise)]
    before = [g.clone() for g in grads]
    dot = project_gradients(grads, reference)
    assert dot.shape == (3,) and dot[0] > 0 and (dot[1:] < 0).all()
    assert all(torch.equal(g[0], b[0]) for g, b in zip(grads, before))  # member 0 agrees: unchanged
    for k in (1, 2):
        assert row(grads, k) @ row(reference, k) == pytest.approx(0.0, abs=1e-5)


def test_member_k_is_projected_as_a_population_of_one():
    reference, grads = random_members(3, 2), random_members(3, 3)
    alone = [[g[k : k + 1].clone() for g in grads] for k in range(3)]
    dots = project_gradients(grads, reference)
    for k in range(3):
        assert torch.equal(project_gradients(alone[k], [r[k : k + 1] for r in reference]), dots[k : k + 1])
        assert all(torch.equal(a[0], g[k]) for a, g in zip(alone[k], grads))


def test_a_nan_member_reaches_no_other():
    reference, grads = random_members(3, 4), random_members(3, 5)
    clean = [g.clone() for g in grads]
    project_gradients(clean, reference)
    grads[0][1, 2, 1] = float("nan")
    reference[1][1, 0] = float("nan")
    project_gradients(grads, reference)
    assert all(torch.equal(g[0], c[0]) and torch.equal(g[2], c[2]) for g, c in zip(grads, clean))


def test_dot_products_run_over_each_members_own_parameters():
    a, b = random_members(4, 6), random_members(4, 7)
    dot = member_dot(a, b)
    for k in range(4):
        torch.testing.assert_close(dot[k], row(a, k) @ row(b, k))


# ---------------------------------------------------------------------- memory batches, state, settings
def keys(seeds):
    return member_keys(seeds, "agem_memory_batch")


def test_memory_positions_come_from_each_members_seed_and_step():
    rows = memory_positions(keys(SEEDS), 30, 8, epoch=2, batch_idx=5)
    assert rows.shape == (3, 8)
    for k, seed in enumerate(SEEDS):
        assert torch.equal(rows[k], memory_positions(keys([seed]), 30, 8, 2, 5)[0])
        assert len(rows[k].unique()) == 8  # without replacement
    assert not torch.equal(rows[0], rows[1])
    assert not torch.equal(rows, memory_positions(keys(SEEDS), 30, 8, 2, 6))
    assert not torch.equal(rows, memory_positions(keys(SEEDS), 30, 8, 3, 5))


def test_memory_positions_are_uniform():
    """Each position of a memory of 10 is drawn into a batch of 3 with probability 3/10 (many members)."""
    rows = memory_positions(keys(range(4000)), 10, 3, epoch=0, batch_idx=0)
    frequency = torch.bincount(rows.flatten(), minlength=10).double() / 4000
    assert torch.allclose(frequency, torch.full((10,), 0.3, dtype=torch.float64), atol=0.03)  # ~4 standard errors


def test_memory_batches_are_seeded_per_member_and_step(population_digits):
    dm = population_digits
    agem, module, _, _ = hook_setup(dm, memory_batch_size=4)
    a = agem.memory_batch(dm, module.device, 1, 0)
    b = agem.memory_batch(dm, module.device, 1, 0)
    c = agem.memory_batch(dm, module.device, 1, 1)
    assert a[0].shape[:2] == (3, 4) and all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    whole_x, whole_y, _ = agem.memory.batch(dm, 0)
    index = memory_positions(keys(SEEDS), 10, 4, 1, 0)
    for k in range(3):  # member k's rows of its own memory
        assert torch.equal(a[0][k], whole_x[k, index[k]]) and torch.equal(a[1][k], whole_y[k, index[k]])
    whole = AGEM(memory_batch_size=64)
    whole.memory.add_task(dm, 0)
    assert whole.memory_batch(dm, module.device, 1, 0)[1].shape == (3, 10)  # smaller memory: all of it


def test_nothing_happens_without_memory(population_digits):
    _, module, trainer, optimizer = hook_setup(population_digits)
    grads = [torch.randn_like(p) for p in module.parameters()]
    for p, g in zip(module.parameters(), grads):
        p.grad = g.clone()
    AGEM().on_before_optimizer_step(trainer, module, optimizer)
    assert all(torch.equal(p.grad, g) for p, g in zip(module.parameters(), grads))


def test_state_survives_a_weights_only_round_trip(population_digits, tmp_path):
    dm = population_digits
    agem, module, trainer, optimizer = hook_setup(dm, memory_batch_size=4)
    agem.memory.add_task(dm, 1)
    run_hook(agem, module, trainer, optimizer, [torch.randn_like(p) for p in module.parameters()])
    torch.save(agem.state_dict(), tmp_path / "agem.pt")
    restored = AGEM(memory_batch_size=4)
    restored.load_state_dict(torch.load(tmp_path / "agem.pt", weights_only=True))
    restored.setup(trainer, module, "fit")  # a state loaded before `setup` is applied there
    assert restored.memory.tasks == [0, 1] and restored.steps == agem.steps
    assert torch.equal(restored.projected, agem.projected)
    for u, v in zip(restored.memory_batch(dm, module.device, 1, 5), agem.memory_batch(dm, module.device, 1, 5)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("kwargs", [{"memory_batch_size": 0}, {"memory_per_class": 0}, {"memory_per_task": 0},
                                    {"memory_per_task": 10, "memory_per_class": 1}])
def test_bad_values_are_refused(kwargs):
    with pytest.raises(ValueError):
        AGEM(**kwargs)


def test_memory_defaults_to_one_example_per_class():
    assert AGEM().memory.per_class == 1 and AGEM(memory_per_task=10).memory.per_task == 10


# ---------------------------------------------------------------------- real runs
AGEM_ARGS = {"memory_per_class": 1, "memory_batch_size": 64}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Naive SGD and A-GEM, each a population of the members ``SEEDS``."""
    naive, _ = fit_permuted_digits(tmp_path_factory.mktemp("naive"), lr=0.02, seeds=SEEDS)
    agem = AGEM(**AGEM_ARGS)
    with_agem, _ = fit_permuted_digits(tmp_path_factory.mktemp("agem"), [agem], lr=0.02, seeds=SEEDS)
    return naive, with_agem, agem


@pytest.mark.slow
def test_agem_forgets_less_than_naive_sgd_in_every_member(runs):
    naive, with_agem, _ = runs
    last = NUM_TASKS - 1
    for k in range(len(SEEDS)):
        print(f"member {k}: forgetting naive {forgetting(naive[k], last):.3f} agem {forgetting(with_agem[k], last):.3f}; "
              f"average accuracy naive {average_accuracy(naive[k], last):.1f} agem {average_accuracy(with_agem[k], last):.1f}")
        # measured: 0.442 vs 0.342, 0.490 vs 0.416, 0.440 vs 0.338
        assert forgetting(with_agem[k], last) < forgetting(naive[k], last) - 0.03
        assert average_accuracy(with_agem[k], last) > average_accuracy(naive[k], last)


@pytest.mark.slow
def test_memory_holds_one_example_per_class_of_every_task(runs):
    _, _, agem = runs
    assert agem.memory.tasks == list(range(NUM_TASKS))
    assert all(agem.memory.indices[t].shape == (len(SEEDS), 10) for t in range(NUM_TASKS))


# Dropout on, so that the reference forward's own masks (stream 1) are part of what must match.
MEMBER_RUN = {"num_tasks": 3, "hidden": (32,), "dropout": 0.2, "lr": 0.02}


def agem_run(tmp_path, seeds):
    """A-GEM with a memory batch smaller than the memory (so the per-step draws matter) on ``seeds``."""
    agem = AGEM(memory_per_class=2, memory_batch_size=16)
    matrix, module = fit_permuted_digits(tmp_path, [agem], seeds=seeds, **MEMBER_RUN)
    return matrix, module.population.flat(), agem


@pytest.fixture(scope="module")
def population_run(tmp_path_factory):
    return agem_run(tmp_path_factory.mktemp("population"), SEEDS)


@pytest.mark.slow
@pytest.mark.parametrize("k", range(len(SEEDS)))
def test_member_k_is_the_population_of_one_with_its_seed(population_run, tmp_path, k):
    """Bitwise on the CPU: weights, accuracy matrix, memory and projection counts."""
    matrix, weights, agem = population_run
    alone_matrix, alone_weights, alone = agem_run(tmp_path, [SEEDS[k]])
    assert torch.equal(weights[k], alone_weights[0])
    assert torch.equal(matrix[k].nan_to_num(-1), alone_matrix[0].nan_to_num(-1))
    assert all(torch.equal(agem.memory.indices[t][k], alone.memory.indices[t][0]) for t in agem.memory.tasks)
    assert agem.projected[k] == alone.projected[0] and agem.steps == alone.steps


@pytest.mark.slow
def test_changing_member_2s_seed_leaves_member_1_unchanged(population_run, tmp_path):
    _, weights, agem = population_run
    _, other_weights, other = agem_run(tmp_path, [SEEDS[0], SEEDS[1], 11])
    assert torch.equal(weights[:2], other_weights[:2])
    assert not torch.equal(weights[2], other_weights[2])
    assert agem.projected[:2].tolist() == other.projected[:2].tolist()


@pytest.mark.slow
def test_resume_between_tasks_gives_the_same_run(tmp_path):
    straight, resumed = straight_and_resumed(tmp_path, lambda: [AGEM(**AGEM_ARGS)], num_tasks=3, lr=0.02, seeds=[0, 4])
    assert_same_run(straight, resumed)
    [resumed_agem] = resumed[0]
    assert resumed_agem.memory.tasks == [0, 1, 2]
