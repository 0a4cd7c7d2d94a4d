"""EWC: the penalty gradient against autograd, the Fisher, checkpoints, and real runs on digits."""

import pytest
import torch
from sequence_runs import assert_same_run, fit_permuted_digits, straight_and_resumed
from torch.nn.utils import parameters_to_vector

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.methods.ewc import EWC
from cl_lightning.metrics.continual import average_accuracy, forgetting
from cl_lightning.models.module import ContinualModule
from cl_lightning.models.nets import MLP

NUM_TASKS = 5


@pytest.fixture(scope="module")
def module(digits):
    torch.manual_seed(0)
    m = ContinualModule(MLP(64, [32], 10, dropout=0.5))
    return m


def naive_penalty(theta, lam, fishers, anchors):
    """lam/2 sum_t sum_i F_t,i (theta_i - theta*_t,i)^2, written out per task."""
    return lam / 2 * sum((f * (theta - a) ** 2).sum() for f, a in zip(fishers, anchors))


def test_added_gradient_is_the_penalty_gradient():
    torch.manual_seed(0)
    module = ContinualModule(MLP(64, [32, 16], 10))
    params = list(module.net.parameters())
    theta = parameters_to_vector(params).detach()
    fishers = [torch.rand_like(theta) ** 3 for _ in range(3)]  # non-negative, over orders of magnitude
    anchors = [theta + 0.1 * torch.randn_like(theta) for _ in range(3)]
    ewc = EWC(lam=7.0)
    for f, a in zip(fishers, anchors):
        ewc.add_task(f, a)
    # autograd of the naive per-task penalty, in float64
    leaf = theta.double().requires_grad_()
    (expected,) = torch.autograd.grad(
        naive_penalty(leaf, 7.0, [f.double() for f in fishers], [a.double() for a in anchors]), leaf)

    for p in params:
        p.grad = torch.zeros_like(p)
    ewc.on_before_optimizer_step(None, module, None)
    added = torch.cat([p.grad.flatten() for p in params]).double()
    assert (added - expected).norm() <= 1e-6 * expected.norm()

    # it is added to the loss gradient, which is otherwise untouched
    loss_grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, loss_grads):
        p.grad = g.clone()
    ewc.on_before_optimizer_step(None, module, None)
    torch.testing.assert_close(torch.cat([(p.grad - g).flatten() for p, g in zip(params, loss_grads)]).double(),
                               expected, rtol=1e-5, atol=1e-6)

    # the logged value is the penalty itself
    naive = naive_penalty(theta.double(), 7.0, [f.double() for f in fishers], [a.double() for a in anchors])
    assert ewc.penalty(theta) == pytest.approx(naive.item(), rel=1e-6)


def test_no_penalty_before_the_first_task_end(module):
    ewc = EWC(lam=10.0)
    for p in module.net.parameters():
        p.grad = torch.ones_like(p)
    ewc.on_before_optimizer_step(None, module, None)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in module.net.parameters())
    assert ewc.penalty(parameters_to_vector(module.net.parameters())) is None


@pytest.mark.parametrize("kind", ["empirical", "true"])
def test_fisher_is_non_negative_seeded_and_backend_independent(digits, module, kind):
    fisher = EWC(fisher=kind, fisher_samples=100, fisher_batch_size=32).estimate_fisher(module, digits, 0)
    again = EWC(fisher=kind, fisher_samples=100, fisher_batch_size=32).estimate_fisher(module, digits, 0)
    looped = EWC(fisher=kind, fisher_samples=100, backend="loop").estimate_fisher(module, digits, 0)
    assert fisher.shape == (sum(p.numel() for p in module.net.parameters()),)
    assert (fisher >= 0).all() and fisher.sum() > 0
    assert torch.equal(fisher, again)
    torch.testing.assert_close(fisher, looped)  # vmap and the plain per-example loop agree
    assert module.net.training  # eval mode only during the estimate (dropout off there)


def test_fisher_examples_come_from_the_seed(digits, module):
    ewc = EWC(fisher_samples=100)
    idx = ewc.fisher_indices(digits, 0)
    assert len(idx) == 100 and len(idx.unique()) == 100
    assert torch.equal(idx, ewc.fisher_indices(digits, 0))
    assert not torch.equal(idx, ewc.fisher_indices(digits, 1))
    other = ContinualDataModule(source="digits", benchmark="permuted", num_tasks=2, seed=1)
    other.setup()
    assert not torch.equal(idx, ewc.fisher_indices(other, 0))
    empirical = EWC(fisher_samples=100).estimate_fisher(module, digits, 0)
    true = EWC(fisher="true", fisher_samples=100).estimate_fisher(module, digits, 0)
    assert not torch.allclose(empirical, true)


def test_empirical_fisher_is_the_mean_squared_per_example_gradient(digits, module):
    ewc = EWC(fisher_samples=8)
    x, y, t = digits.task_dataset(0, "train").__getitems__(ewc.fisher_indices(digits, 0))
    module.net.eval()
    try:
        squares = []
        for i in range(8):
            loss = torch.nn.functional.cross_entropy(module.net(x[i : i + 1]), y[i : i + 1])
            squares.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(module.net.parameters()))]) ** 2)
    finally:
        module.net.train()
    torch.testing.assert_close(ewc.estimate_fisher(module, digits, 0), torch.stack(squares).mean(0))


def test_fisher_of_masked_classes_is_zero():
    # split benchmark: each example's logits are masked to its task's classes, so the output
    # weights of the other tasks' classes get no gradient and no importance
    dm = ContinualDataModule(source="digits", benchmark="split", num_tasks=2, classes_per_task=5, seed=0)
    dm.setup()
    torch.manual_seed(0)
    module = ContinualModule(MLP(64, [16], 10))
    module.class_mask = dm.class_mask  # what ContinualModule.setup provides
    fisher = EWC(fisher_samples=64).estimate_fisher(module, dm, 0)
    out_bias = fisher[-10:]
    task_classes = dm.class_mask[0]
    assert (out_bias[~task_classes] == 0).all() and (out_bias[task_classes] > 0).all()


def test_min_max_normalisation_spans_zero_to_one(digits, module):
    fisher = EWC(fisher_samples=50, fisher_normalization="min_max").estimate_fisher(module, digits, 0)
    assert fisher.min() == 0 and fisher.max() == pytest.approx(1.0)


def test_state_survives_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(0)
    module = ContinualModule(MLP(64, [32], 10))
    n = sum(p.numel() for p in module.net.parameters())
    ewc = EWC(lam=3.0)
    for _ in range(2):
        ewc.add_task(torch.rand(n), torch.randn(n))
    ewc.tasks = [0, 1]
    torch.save(ewc.state_dict(), tmp_path / "ewc.pt")
    restored = EWC(lam=3.0)
    restored.load_state_dict(torch.load(tmp_path / "ewc.pt", weights_only=True))
    assert restored.tasks == [0, 1]
    grads = []
    for method in (ewc, restored):
        for p in module.net.parameters():
            p.grad = torch.zeros_like(p)
        method.on_before_optimizer_step(None, module, None)
        grads.append(torch.cat([p.grad.flatten() for p in module.net.parameters()]))
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("kwargs", [{"lam": -1.0}, {"fisher": "diagonal"}, {"fisher_samples": 0},
                                    {"fisher_batch_size": 0}, {"fisher_normalization": "max"}, {"backend": "jit"}])
def test_bad_values_are_refused(kwargs):
    with pytest.raises(ValueError):
        EWC(**kwargs)


# ---------------------------------------------------------------------- real runs
LAM = 10.0  # lam*max(F) stays well inside SGD's stability limit here (100 diverges: see _check_stability)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    naive, _ = fit_permuted_digits(tmp_path_factory.mktemp("naive"))
    ewc = EWC(lam=LAM, fisher_samples=512)
    with_ewc, module = fit_permuted_digits(tmp_path_factory.mktemp("ewc"), [ewc])
    return naive, with_ewc, ewc, module


def test_ewc_forgets_less_than_naive_sgd(runs):
    naive, with_ewc, _, _ = runs
    last = NUM_TASKS - 1
    print(f"forgetting naive {forgetting(naive, last):.3f} ewc {forgetting(with_ewc, last):.3f}; "
          f"average accuracy naive {average_accuracy(naive, last):.1f} ewc {average_accuracy(with_ewc, last):.1f}")
    assert forgetting(with_ewc, last) < forgetting(naive, last) - 0.2  # measured: 0.233 vs 0.616
    assert average_accuracy(with_ewc, last) > average_accuracy(naive, last)


def test_every_task_is_accumulated_once(runs):
    _, _, ewc, module = runs
    assert ewc.tasks == list(range(NUM_TASKS))
    assert ewc.fisher_sum.shape == parameters_to_vector(module.net.parameters()).shape
    assert (ewc.fisher_sum >= 0).all()


def test_resume_between_tasks_gives_the_same_run(tmp_path):
    straight, resumed = straight_and_resumed(tmp_path, lambda: [EWC(lam=LAM, fisher_samples=128)], num_tasks=3)
    assert_same_run(straight, resumed)
    [straight_ewc], [resumed_ewc] = straight[0], resumed[0]
    assert resumed_ewc.tasks == [0, 1, 2]
    assert torch.equal(resumed_ewc.fisher_sum.cpu(), straight_ewc.fisher_sum.cpu())
    assert torch.equal(resumed_ewc.fisher_anchor.cpu(), straight_ewc.fisher_anchor.cpu())
