"""EWC on a population: member k's penalty, Fisher and running Fisher are those of the population of
one with member k's seed and settings (bitwise on CPU for the MLP), and no member's values reach
another's.

First the pieces, driven directly (the module and datamodule of a population, no Trainer); then
whole runs (member k of three against its run alone, a changed member 2, a resume) and a
population from the command line.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from cli_runs import tiny_run_args
from sequence_runs import assert_same_run, fit_permuted_digits, straight_and_resumed
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

from cl_lightning.cli.lightning_cli import cli_main
from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.methods.ewc import EWC
from cl_lightning.methods.fisher import min_max
from cl_lightning.models.member_sgd import MemberSGD
from cl_lightning.models.module import ContinualModule
from cl_lightning.models.nets import MLP

SEEDS = [0, 1, 2]
LAMS = [1.0, 7.0, 30.0]


def members(seeds: list[int], benchmark: str = "permuted", dropout: float = 0.5, **data) -> tuple[ContinualDataModule, ContinualModule]:
    """The datamodule and module of a population with ``seeds`` on permuted (or split) digits."""
    dm = ContinualDataModule(source="digits", benchmark=benchmark, num_tasks=2, seeds=seeds, **data)
    dm.setup()
    module = ContinualModule(MLP(64, [32], 10, dropout=dropout), seeds=seeds)
    module.class_mask = dm.class_mask  # what ContinualModule.setup provides
    return dm, module


def params_of(module) -> list[Tensor]:
    return list(module.population.stacked.parameters())


def added_gradient(ewc: EWC, module, loss_grads: list[Tensor] | None = None) -> Tensor:
    """``[N, P]``: what EWC's hook leaves in ``.grad`` (zero or ``loss_grads`` before it)."""
    params = params_of(module)
    for i, p in enumerate(params):
        p.grad = torch.zeros_like(p) if loss_grads is None else loss_grads[i].clone()
    ewc.on_before_optimizer_step(None, module, None)
    return torch.cat([p.grad.flatten(1) for p in params], dim=1)


def penalty_state(n: int, size: int, tasks: int = 3, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``tasks`` (Fisher, anchor) pairs ``[n, size]``: Fishers over orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, size, generator=g) ** 3, 0.1 * torch.randn(n, size, generator=g)) for _ in range(tasks)]


# ---------------------------------------------------------------------- the penalty
def test_each_member_gets_the_gradient_of_its_own_penalty() -> None:
    dm, module = members(SEEDS)
    theta = module.population.flat()
    ewc = EWC(lam=LAMS)
    state = penalty_state(3, theta.shape[1])
    for f, a in state:
        ewc.add_task(f, theta + a)
    # autograd of the sum over members of lam_k/2 sum_t F_t,k (theta_k - theta*_t,k)^2, in float64
    leaf = theta.double().requires_grad_()
    lam = torch.tensor(LAMS, dtype=torch.float64).unsqueeze(1)
    per_member = sum((lam / 2 * f.double() * (leaf - (theta + a).double()) ** 2).sum(1) for f, a in state)
    (expected,) = torch.autograd.grad(per_member.sum(), leaf)
    added = added_gradient(ewc, module).double()
    for k in range(3):
        assert (added[k] - expected[k]).norm() <= 1e-6 * expected[k].norm()
    torch.testing.assert_close(ewc.penalty(theta), per_member.detach(), rtol=1e-6, atol=0)
    # added to the loss gradient, which is otherwise untouched
    loss_grads = [torch.randn_like(p) for p in params_of(module)]
    moved = added_gradient(ewc, module, loss_grads) - torch.cat([g.flatten(1) for g in loss_grads], dim=1)
    torch.testing.assert_close(moved.double(), expected, rtol=1e-5, atol=1e-6)


def test_member_k_penalty_is_the_population_of_one_bitwise() -> None:
    _, module = members(SEEDS)
    theta = module.population.flat()
    state = penalty_state(3, theta.shape[1])
    ewc = EWC(lam=LAMS)
    for f, a in state:
        ewc.add_task(f, theta + a)
    added = added_gradient(ewc, module)
    penalty = ewc.penalty(theta)
    for k, seed in enumerate(SEEDS):
        _, alone = members([seed])
        solo = EWC(lam=LAMS[k])
        for f, a in state:
            solo.add_task(f[k : k + 1], theta[k : k + 1] + a[k : k + 1])
        assert torch.equal(alone.population.flat()[0], theta[k])
        assert torch.equal(added_gradient(solo, alone)[0], added[k])
        assert solo.penalty(theta[k : k + 1]).item() == pytest.approx(penalty[k].item(), rel=1e-12)


def test_a_nan_member_leaves_the_others_penalty_gradient() -> None:
    _, module = members(SEEDS)
    theta = module.population.flat()
    ewc = EWC(lam=LAMS)
    for f, a in penalty_state(3, theta.shape[1]):
        ewc.add_task(f, theta + a)
    clean = added_gradient(ewc, module)
    with torch.no_grad():
        broken = theta.clone()
        broken[2] = float("nan")
        module.population.load_flat(broken)
    dirty = added_gradient(ewc, module)
    assert torch.equal(dirty[:2], clean[:2]) and dirty[2].isnan().all()
    assert ewc.penalty(broken)[:2].isfinite().all()


def test_a_member_with_lam_zero_gets_no_penalty() -> None:
    _, module = members(SEEDS)
    theta = module.population.flat()
    ewc = EWC(lam=[0.0, 7.0, 0.0])
    for f, a in penalty_state(3, theta.shape[1]):
        ewc.add_task(f, theta + a)
    added = added_gradient(ewc, module)
    assert not added[0].any() and added[1].any() and not added[2].any()


def test_the_stability_warning_names_the_members_past_sgds_limit() -> None:
    # member k is unstable when lr_k * c_k * max F_k >= 2 (1 + momentum_k): here member 1 only
    _, module = members(SEEDS)
    optimizer = MemberSGD(module.population.parameters(), lr=torch.tensor([0.1, 0.1, 0.01]), momentum=0.0)
    trainer = SimpleNamespace(optimizers=[optimizer])
    stiffness = torch.tensor([10.0, 30.0, 100.0], dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"seed\(s\) \[1\].*up to 30,"):
        EWC._check_stability(trainer, module, stiffness)


class RecordingLogger:
    """Stands in for a member's logger: keeps what it was given."""

    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((metrics, step))


def test_each_members_fisher_and_penalty_go_to_its_own_logger() -> None:
    dm, module = members(SEEDS)
    loggers = [RecordingLogger() for _ in SEEDS]
    trainer = SimpleNamespace(datamodule=dm, optimizers=[], strategy=SimpleNamespace(broadcast=lambda value, src: value),
                              _member_loggers=loggers)  # what member_outputs.member_loggers made for the run
    ewc = EWC(lam=LAMS, fisher_samples=64)
    ewc.on_task_end(trainer, module, 0)
    module.failed[1] = True  # a member the guard stopped logs nothing more
    with torch.no_grad():
        module.population.load_flat(module.population.flat() + 0.01)
    penalty = ewc.penalty(module.population.flat())  # of task 1's Fisher, at the weights task 2 ends with
    ewc.on_task_end(trainer, module, 1)
    assert [len(logger.logged) for logger in loggers] == [2, 1, 2]
    for k, logger in enumerate(loggers):
        first, step = logger.logged[0]
        assert step == 1 and "ewc/penalty" not in first
        assert first["ewc/stiffness"] == pytest.approx(LAMS[k] * first["ewc/fisher_max"], rel=1e-6)
    for k in (0, 2):
        last, step = loggers[k].logged[1]
        assert step == 2 and last["ewc/penalty"] == penalty[k].item()


def test_lam_needs_one_value_per_member() -> None:
    _, module = members(SEEDS)
    ewc = EWC(lam=[1.0, 2.0])
    theta = module.population.flat()
    ewc.add_task(*penalty_state(3, theta.shape[1], tasks=1)[0])
    with pytest.raises(ValueError, match="lam"):
        added_gradient(ewc, module)


# ---------------------------------------------------------------------- Kirkpatrick's Fisher
@pytest.mark.parametrize("kind", ["empirical", "true"])
def test_member_k_fisher_is_the_population_of_one_bitwise(kind: str) -> None:
    dm, module = members(SEEDS)
    fisher = EWC(fisher=kind, fisher_samples=100, fisher_batch_size=32).estimate_fisher(module, dm, 0)
    looped = EWC(fisher=kind, fisher_samples=100, backend="loop").estimate_fisher(module, dm, 0)
    torch.testing.assert_close(fisher, looped)  # vmap over the examples and the loop agree
    assert module.population.stacked.training  # eval mode only during the estimate
    for k, seed in enumerate(SEEDS):
        one, alone = members([seed])
        assert torch.equal(EWC(fisher=kind, fisher_samples=100, fisher_batch_size=32).estimate_fisher(alone, one, 0)[0],
                           fisher[k])
    assert not torch.equal(fisher[0], fisher[1])


def test_fisher_examples_come_from_each_members_seed() -> None:
    dm, _ = members(SEEDS)
    idx = EWC(fisher_samples=100).fisher_indices(dm, 0)
    assert idx.shape == (3, 100) and all(len(row.unique()) == 100 for row in idx)
    for k, seed in enumerate(SEEDS):
        one, _ = members([seed])
        assert torch.equal(EWC(fisher_samples=100).fisher_indices(one, 0)[0], idx[k])
    assert not torch.equal(idx[0], idx[1])


def test_fisher_of_each_members_masked_classes_is_zero() -> None:
    # split digits, each member its own shuffled classes: member k's output weights of classes
    # outside its task get no gradient and no importance
    dm, module = members(SEEDS, benchmark="split", dropout=0.0, classes_per_task=5, class_order="shuffled",
                         test_examples_per_task=150, train_examples_per_task=700)
    fisher = EWC(fisher_samples=64).estimate_fisher(module, dm, 0)
    out_bias, task_classes = fisher[:, -10:], dm.class_mask[:, 0]
    assert not torch.equal(task_classes[0], task_classes[1])
    assert (out_bias[~task_classes] == 0).all() and (out_bias[task_classes] > 0).all()


def test_a_nan_member_leaves_the_others_fisher() -> None:
    dm, module = members(SEEDS)
    clean = EWC(fisher_samples=50).estimate_fisher(module, dm, 0)
    with torch.no_grad():
        broken = module.population.flat()
        broken[2] = float("nan")
        module.population.load_flat(broken)
    dirty = EWC(fisher_samples=50, fisher_normalization="min_max").estimate_fisher(module, dm, 0)
    assert torch.equal(dirty[:2], min_max(clean)[:2])


def test_min_max_normalises_each_member_on_its_own() -> None:
    flat = torch.stack([torch.rand(50), 10 * torch.rand(50) + 5, torch.full((50,), 3.0)])
    normalised = min_max(flat)
    assert (normalised[:2].amin(1) == 0).all() and torch.allclose(normalised[:2].amax(1), torch.ones(2))
    assert not normalised[2].any()  # a constant row becomes zeros
    for k in range(3):
        assert torch.equal(min_max(flat[k : k + 1])[0], normalised[k])


# ---------------------------------------------------------------------- agem's running Fisher
def feed_gradients(ewc: EWC, module, steps: int, seed: int, member_seeds: list[int]) -> None:
    """``steps`` optimizer steps' worth of gradients for ``track_gradient``: member k's from
    ``member_seeds[k]``, so every member sees the same gradients in any population."""
    params = params_of(module)
    gens = [torch.Generator().manual_seed(1000 * seed + s) for s in member_seeds]
    for _ in range(steps):
        for p in params:
            p.grad = torch.stack([torch.randn(p.shape[1:], generator=g) for g in gens])
        ewc.track_gradient(params)


def test_agem_member_k_running_fisher_is_the_population_of_one_bitwise() -> None:
    decays = [0.9, 0.5, 1.0]
    _, module = members(SEEDS)
    ewc = EWC(variant="agem", lam=LAMS, fisher_decay=decays, fisher_update_every=4)
    feed_gradients(ewc, module, 23, 0, SEEDS)
    fisher = ewc.running.close(module.population.flat())
    assert ewc.running.steps == 0 and not ewc.running.window.any()
    for k, seed in enumerate(SEEDS):
        _, alone = members([seed])
        solo = EWC(variant="agem", lam=LAMS[k], fisher_decay=decays[k], fisher_update_every=4)
        feed_gradients(solo, alone, 23, 0, [seed])
        assert torch.equal(solo.running.fisher[0], ewc.running.fisher[k])
        assert torch.equal(solo.running.close(alone.population.flat())[0], fisher[k])


def test_agem_running_fisher_is_the_a_gem_codes_moving_average() -> None:
    # written out as the A-GEM code's training loop runs it (fc_permute_mnist.py 270-279), float64
    decays, every, steps = [0.9, 0.5, 1.0], 4, 23
    _, module = members(SEEDS)
    ewc = EWC(variant="agem", fisher_decay=decays, fisher_update_every=every)
    feed_gradients(ewc, module, steps, 0, SEEDS)
    params = params_of(module)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    squares = []
    for _ in range(steps):
        grads = [torch.stack([torch.randn(p.shape[1:], generator=g) for g in gens]) for p in params]
        squares.append(torch.cat([g.flatten(1) for g in grads], dim=1).double() ** 2)
    decay = torch.tensor(decays, dtype=torch.float64).unsqueeze(1)
    running = window = torch.zeros_like(squares[0])
    for step, square in enumerate(squares):
        if (step + 1) % every == 0:
            running, window = (1 - decay) * running + decay / every * window, torch.zeros_like(running)
        window = window + square
    torch.testing.assert_close(ewc.running.fisher.double(), running, rtol=1e-5, atol=1e-7)


def test_state_survives_a_weights_only_round_trip(tmp_path) -> None:
    dm, module = members(SEEDS)
    theta = module.population.flat()
    ewc = EWC(lam=LAMS)
    for f, a in penalty_state(3, theta.shape[1], tasks=2):
        ewc.add_task(f, theta + a)
    ewc.tasks = [0, 1]
    torch.save(ewc.state_dict(), tmp_path / "ewc.pt")
    restored = EWC(lam=LAMS)
    restored.load_state_dict(torch.load(tmp_path / "ewc.pt", weights_only=True))
    restored.setup(SimpleNamespace(datamodule=dm), module, "fit")  # a state loaded before `setup` is applied there
    assert restored.tasks == [0, 1]
    assert torch.equal(added_gradient(ewc, module), added_gradient(restored, module))
    other_dm, other = members([0, 1])  # a population of another size is refused with the reason
    elsewhere = EWC(lam=1.0)
    elsewhere.load_state_dict(torch.load(tmp_path / "ewc.pt", weights_only=True))
    elsewhere.setup(SimpleNamespace(datamodule=other_dm), other, "fit")
    with pytest.raises(ValueError, match="another network or population"):
        added_gradient(elsewhere, other)



# ---------------------------------------------------------------------- whole runs
RUN_LAMS = [10.0, 3.0, 5.0]  # inside SGD's stability limit for every member (lr 0.1, momentum 0.8)
RUN = {"num_tasks": 3, "hidden": (32,), "dropout": 0.25}


def fit(tmp_path, variant: str, seeds: list[int], lam: float | list[float]) -> tuple[Tensor, ContinualModule, EWC]:
    """Three permuted-digits tasks of EWC with ``lam`` per member: ``[N, T, T]`` accuracy matrices,
    the module, the method."""
    ewc = EWC(lam=lam, variant=variant, fisher_samples=256)
    matrices, module = fit_permuted_digits(tmp_path, [ewc], seeds=seeds, **RUN)
    return matrices, module, ewc


@pytest.fixture(scope="module", params=["kirkpatrick", "agem"])
def population_run(request, tmp_path_factory):
    """Members of seeds 0, 1, 2 with lam 10, 3, 5 trained together."""
    return request.param, fit(tmp_path_factory.mktemp(request.param), request.param, SEEDS, RUN_LAMS)


@pytest.mark.slow
def test_member_k_of_a_run_is_the_run_of_one_with_its_seed_and_lam(population_run, tmp_path):
    variant, (matrices, module, ewc) = population_run
    for k, (seed, lam) in enumerate(zip(SEEDS, RUN_LAMS)):
        matrix, alone, solo = fit(tmp_path / f"seed_{seed}", variant, [seed], lam)
        assert torch.equal(alone.population.flat()[0], module.population.flat()[k])
        assert torch.equal(matrix[0].nan_to_num(-1), matrices[k].nan_to_num(-1))
        for name in ("fisher_sum", "fisher_anchor", "anchor_energy"):
            assert torch.equal(getattr(solo, name)[0], getattr(ewc, name)[k]), name
    assert ewc.tasks == [0, 1, 2]


@pytest.mark.slow
def test_member_2s_seed_and_lam_do_not_reach_member_1(population_run, tmp_path):
    # member 2 becomes seed 7 with a lam far past SGD's stability limit: it is warned about and
    # diverges to NaN, and members 0 and 1 end bitwise where they ended beside the old member 2
    variant, (_, module, _) = population_run
    with pytest.warns(UserWarning, match=r"seed\(s\) \[7\]"):
        _, changed, _ = fit(tmp_path, variant, [0, 1, 7], [*RUN_LAMS[:2], 1000.0])
    assert torch.equal(changed.population.flat()[:2], module.population.flat()[:2])
    assert changed.population.flat()[2].isnan().any()


@pytest.mark.slow
def test_a_population_resumed_mid_task_gives_the_same_run(tmp_path):
    # agem's running Fisher, its window and the [N, P] penalty state come back from the checkpoint
    straight, resumed = straight_and_resumed(tmp_path, lambda: [EWC(lam=[10.0, 3.0], variant="agem")], num_tasks=3,
                                             crash_step=90 + 15, hidden=(16,), seeds=[0, 1])
    assert_same_run(straight, resumed)
    [straight_ewc], [resumed_ewc] = straight[0], resumed[0]
    resumed_state, straight_state = resumed_ewc.method_state(), straight_ewc.method_state()
    for name in ("running_fisher", "fisher_window", "fisher_sum", "fisher_anchor", "anchor_energy"):
        assert torch.equal(resumed_state[name], straight_state[name]), name


@pytest.mark.slow
# ---------------------------------------------------------------------- the command line
def test_a_member_of_a_command_line_population_is_its_own_plain_run(mnist_root, tmp_path):
    # lam and fisher_decay per member: member k's config.yaml holds its own values, its TensorBoard
    # events its own EWC scalars, and the config re-runs it alone to the same accuracy matrix
    out = tmp_path / "population"
    cli_main(["fit", *tiny_run_args("ewc/permuted_mnist.yaml", mnist_root, out), "--seeds", "[0,3]",
              "--trainer.callbacks.init_args.lam", "[10.0,3.0]", "--trainer.callbacks.init_args.fisher_decay", "[0.9,0.5]"])
    folders = [out / "lightning_logs" / "version_0" / f"seed_{seed}" for seed in (0, 3)]
    for k, folder in enumerate(folders):
        [ewc] = yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["callbacks"]
        assert (ewc["init_args"]["lam"], ewc["init_args"]["fisher_decay"]) == ([10.0, 3.0][k], [0.9, 0.5][k])
        scalars = EventAccumulator(str(folder)).Reload().Tags()["scalars"]
        assert {"ewc/fisher_mean", "ewc/stiffness", "ewc/penalty"} <= set(scalars)
    alone = tmp_path / "alone"
    cli_main(["fit", "--config", str(folders[1] / "config.yaml"), "--trainer.logger.init_args.save_dir", str(alone)])
    solo = json.loads((alone / "lightning_logs" / "version_0" / "accuracy_matrix.json").read_text())
    assert solo["matrix"] == json.loads((folders[1] / "accuracy_matrix.json").read_text())["matrix"]  # the same floats
