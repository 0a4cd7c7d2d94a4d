"""A population of N members is N solo runs: each member depends only on its own seed and settings.

Two references for member k. A solo ``nn.Module`` (``init_member(build, seed_k)``) matches to float
tolerance: vmap turns its matmuls into batched ones, which round differently (observed: about 3e-8
on logits of order 0.3), so those comparisons use ``assert_close``'s float32 defaults (rtol 1.3e-6,
atol 1e-5). A population of one holding member k (a plain run under the population design) matches
bitwise on this build for the MLP, dropout included; those comparisons use ``torch.equal``. (For
ResNet18, vmapped convolutions are grouped ones and match to float tolerance only.)
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap
from torch.nn.utils import parameters_to_vector

from cl_lightning.models.member_random import drop_threshold, dropout_keys, keep_mask, keep_masks, mix64
from cl_lightning.models.nets import MLP, ResNet18
from cl_lightning.models.params import load_flat
from cl_lightning.models.population import Population, _StackedLinear, init_member

small_mlp = partial(MLP, 20, [16, 16], 5)
SEEDS = [0, 1, 2]


def batches(seed: int, steps: int, batch: int = 4) -> list[tuple[Tensor, Tensor]]:
    """A member's own training batches, drawn from its seed."""
    g = torch.Generator().manual_seed(1000 + seed)
    return [(torch.rand(batch, 20, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(steps)]


def population_losses(pop: Population, x: Tensor, y: Tensor, step: int | None = None) -> Tensor:
    """Each member's mean cross-entropy on its own batch, shape ``[N]``."""
    logits = pop(x, step)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


def train_population(pop: Population, seeds: list[int], steps: int, lr: float = 0.1, momentum: float = 0.8) -> None:
    """SGD on the sum of the members' losses; member k trains on ``batches(seeds[k])``."""
    optimizer = torch.optim.SGD(pop.parameters(), lr=lr, momentum=momentum)
    data = [batches(seed, steps) for seed in seeds]
    for step in range(steps):
        x = torch.stack([d[step][0] for d in data])
        y = torch.stack([d[step][1] for d in data])
        optimizer.zero_grad()
        population_losses(pop, x, y, step).sum().backward()
        optimizer.step()


def train_solo(net: nn.Module, seed: int, steps: int, lr: float = 0.1, momentum: float = 0.8) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    for x, y in batches(seed, steps):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()


def member_vector(pop: Population, k: int) -> Tensor:
    return pop.flat()[k]


# ---------------------------------------------------------------- initialisation and forward
def test_member_k_starts_as_the_solo_run_with_its_seed() -> None:
    pop = Population.from_seeds(small_mlp, SEEDS)
    for k, seed in enumerate(SEEDS):
        assert torch.equal(member_vector(pop, k), parameters_to_vector(init_member(small_mlp, seed).parameters()))
    assert not torch.equal(member_vector(pop, 0), member_vector(pop, 1))


def test_init_member_is_keyed_by_the_seed_and_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    first = parameters_to_vector(init_member(small_mlp, 3).parameters())
    torch.rand(7)  # whatever else the process draws in between does not matter
    assert torch.equal(first, parameters_to_vector(init_member(small_mlp, 3).parameters()))
    torch.set_rng_state(state)
    init_member(small_mlp, 3)
    assert torch.equal(torch.get_rng_state(), state)


def test_member_logits_equal_a_solo_net_with_its_weights() -> None:
    pop = Population.from_seeds(small_mlp, SEEDS).eval()
    x = torch.rand(3, 6, 20)
    logits = pop(x)
    assert logits.shape == (3, 6, 5)
    for k, seed in enumerate(SEEDS):
        torch.testing.assert_close(logits[k], init_member(small_mlp, seed).eval()(x[k]))


def test_member_logits_equal_a_population_of_one_bitwise() -> None:
    pop = Population.from_seeds(partial(small_mlp, dropout=0.3), SEEDS)
    x = torch.rand(3, 6, 20)
    for k, seed in enumerate(SEEDS):
        alone = Population.from_seeds(partial(small_mlp, dropout=0.3), [seed])
        assert torch.equal(pop(x, step=4)[k], alone(x[k : k + 1], step=4)[0])
        assert torch.equal(pop.eval()(x)[k], alone.eval()(x[k : k + 1])[0])
        pop.train()


# ---------------------------------------------------------------- gradients and SGD
def test_gradient_of_the_summed_losses_is_each_members_own_gradient() -> None:
    pop = Population.from_seeds(small_mlp, SEEDS)
    x, y = torch.rand(3, 8, 20), torch.randint(0, 5, (3, 8))
    population_losses(pop, x, y).sum().backward()
    for k, seed in enumerate(SEEDS):
        solo = init_member(small_mlp, seed)
        F.cross_entropy(solo(x[k]), y[k]).backward()
        for p_pop, p_solo in zip(pop.parameters(), solo.parameters()):
            torch.testing.assert_close(p_pop.grad[k], p_solo.grad)


def test_sgd_with_momentum_on_the_population_is_the_solo_steps() -> None:
    steps = 3  # momentum acts from the second step on
    pop = Population.from_seeds(small_mlp, SEEDS)
    train_population(pop, SEEDS, steps)
    for k, seed in enumerate(SEEDS):
        solo = init_member(small_mlp, seed)
        train_solo(solo, seed, steps)
        torch.testing.assert_close(member_vector(pop, k), parameters_to_vector(solo.parameters()).detach())


# ---------------------------------------------------------------- independence of members
def test_changing_member_2s_seed_leaves_member_1_unchanged() -> None:
    build = partial(small_mlp, dropout=0.5)
    before = Population.from_seeds(build, [0, 1, 2])
    after = Population.from_seeds(build, [0, 1, 7])
    assert torch.equal(member_vector(before, 1), member_vector(after, 1))
    assert not torch.equal(member_vector(before, 2), member_vector(after, 2))

    for site in range(2):  # dropout masks
        key_before, key_after = dropout_keys([0, 1, 2], site), dropout_keys([0, 1, 7], site)
        assert key_before[1] == key_after[1] and key_before[2] != key_after[2]
    x = torch.rand(3, 6, 20)
    assert torch.equal(before(x, step=5)[:2], after(x, step=5)[:2])  # train mode: masks applied

    train_population(before, [0, 1, 2], steps=3)
    train_population(after, [0, 1, 7], steps=3)
    assert torch.equal(before.flat()[:2], after.flat()[:2])
    # ... and member 1 trained exactly as its plain run, a population of one
    alone = Population.from_seeds(build, [1])
    train_population(alone, [1], steps=3)
    assert torch.equal(member_vector(before, 1), member_vector(alone, 0))


def test_members_may_differ_in_dropout_rate() -> None:
    pop = Population([init_member(partial(small_mlp, dropout=0.5), 0), init_member(small_mlp, 1)], [0, 1])
    x = torch.rand(2, 6, 20)
    train_out, eval_out = pop(x, step=0), pop.eval()(x)
    assert not torch.equal(train_out[0], eval_out[0])
    assert torch.equal(train_out[1], eval_out[1])  # rate 0: every element kept, scale exactly 1


# ---------------------------------------------------------------- the counter-based dropout
def splitmix64_reference(z: int) -> int:
    """The finaliser in plain unsigned 64-bit arithmetic."""
    mask = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_mix64_is_splitmix64_on_the_bits() -> None:
    values = [0, 1, 12345, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 0x9E3779B97F4A7C15]
    signed = torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in values], dtype=torch.int64)
    got = [v & ((1 << 64) - 1) for v in mix64(signed).tolist()]
    assert got == [splitmix64_reference(v) for v in values]


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_masks_keep_the_right_share_and_differ_between_members_steps_and_sites(p: float) -> None:
    shape = (200, 500)
    threshold = torch.tensor(drop_threshold(p))
    keys = dropout_keys([0, 1], site=0)
    mask = keep_mask(keys[0], 0, shape, threshold)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.006  # > 4 standard deviations at 1e5 elements
    others = [
        keep_mask(keys[1], 0, shape, threshold),  # another member
        keep_mask(keys[0], 1, shape, threshold),  # another step
        keep_mask(dropout_keys([0], site=1)[0], 0, shape, threshold),  # another site
    ]
    for other in others:
        # independent masks agree on (1-p)^2 + p^2 of the elements
        assert abs((mask == other).float().mean().item() - ((1 - p) ** 2 + p**2)) < 0.006
    assert torch.equal(mask, keep_mask(keys[0], 0, shape, threshold))


def test_the_masks_of_all_sites_in_one_pass_are_each_sites_own_masks_bitwise() -> None:
    """The batched MLP draws every site's masks at once (the smaller site takes the first elements of a
    hash over the largest): the same bits as one :func:`keep_mask` per site and member, rates differing."""
    keys = torch.stack([dropout_keys([0, 5, 9], site) for site in range(2)])  # [S, N]
    thresholds = torch.tensor([[drop_threshold(p) for p in rates] for rates in ([0.25, 0.1, 0.5], [0.3, 0.0, 0.7])])
    shapes = [(7, 16), (7, 12, 2)]
    masks = keep_masks(keys, 41, shapes, thresholds)
    for site, shape in enumerate(shapes):
        assert masks[site].shape == (3, *shape)
        for k in range(3):
            assert torch.equal(masks[site][k], keep_mask(keys[site, k], 41, shape, thresholds[site, k]))


def test_dropout_scales_the_kept_elements_by_one_over_keep_probability() -> None:
    pop = Population([nn.Sequential(nn.Dropout(0.25))], [0])
    x = torch.rand(1, 50, 40) + 1
    out = pop(x, step=0)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    assert 0.7 < kept.float().mean().item() < 0.8


def test_a_training_forward_with_dropout_needs_the_step() -> None:
    pop = Population.from_seeds(partial(small_mlp, dropout=0.2), [0])
    with pytest.raises(ValueError, match="step"):
        pop(torch.rand(1, 2, 20))
    pop.eval()(torch.rand(1, 2, 20))  # eval mode: no masks, no step


# ---------------------------------------------------------------- flat views
def test_flat_views_round_trip_in_the_solo_layout() -> None:
    pop = Population.from_seeds(small_mlp, SEEDS).eval()
    vectors = torch.randn_like(pop.flat())
    pop.load_flat(vectors)
    assert torch.equal(pop.flat(), vectors)
    x = torch.rand(3, 6, 20)
    for k in range(3):
        solo = small_mlp().eval()
        load_flat(solo, vectors[k])
        torch.testing.assert_close(pop(x)[k], solo(x[k]))
    with pytest.raises(ValueError, match="shape"):
        pop.load_flat(vectors[:2])


def test_members_must_share_one_architecture() -> None:
    with pytest.raises(ValueError, match="architecture"):
        Population([small_mlp(), MLP(20, [8, 16], 5)], [0, 1])


# ---------------------------------------------------------------- ResNet18 and BatchNorm
@pytest.mark.parametrize("bn_stats", ["batch", "running"])
def test_resnet18_members_match_solo_nets_in_training_mode(bn_stats: str) -> None:
    build = partial(ResNet18, num_classes=5, width=4, bn_stats=bn_stats, dropout=0.0)
    seeds = [0, 1]
    pop = Population.from_seeds(build, seeds)
    x = torch.rand(2, 3, 3, 32, 32)
    logits = pop(x)
    for k, seed in enumerate(seeds):
        solo = init_member(build, seed)
        torch.testing.assert_close(logits[k], solo(x[k]), rtol=1e-5, atol=1e-5)
        # running statistics, if any, are updated per member as in the solo net
        for (name, stacked), (_, own) in zip(pop.stacked.named_buffers(), solo.named_buffers()):
            torch.testing.assert_close(stacked[k], own, msg=name)


def test_resnet18_dropout_masks_do_not_depend_on_the_population() -> None:
    # vmapped convolutions become grouped ones, so members match a population of one to float
    # tolerance only; a mask that depended on N or on other members would differ by whole units.
    build = partial(ResNet18, num_classes=5, width=4, dropout=0.1)
    pop = Population.from_seeds(build, [0, 1, 2])
    x = torch.rand(3, 3, 3, 32, 32)
    logits = pop(x, step=2)
    for k, seed in enumerate([0, 1, 2]):
        alone = Population.from_seeds(build, [seed])
        torch.testing.assert_close(logits[k], alone(x[k : k + 1], step=2)[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, pop(x, step=3), atol=1e-3)  # another step, other masks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dropout_masks_and_members_are_the_same_on_cpu_and_cuda() -> None:
    threshold = torch.tensor(drop_threshold(0.25))
    key = dropout_keys([3], site=1)[0]
    assert torch.equal(keep_mask(key, 9, (64, 256), threshold), keep_mask(key.cuda(), 9, (64, 256), threshold.cuda()).cpu())
    pop = Population.from_seeds(partial(small_mlp, dropout=0.25), SEEDS)
    x = torch.rand(3, 6, 20)
    torch.testing.assert_close(pop(x, step=9), pop.cuda()(x.cuda(), step=9).cpu())


@pytest.mark.parametrize("training", [True, False])
def test_the_mlps_batched_matmul_path_is_the_vmapped_forward_with_the_same_dropout_masks(training: bool) -> None:
    population = Population.from_seeds(lambda: MLP(20, [16, 16], 5, dropout=0.3), [3, 1, 4]).train(training)
    assert population._plain_mlp  # the paper's MLP takes the batched path
    x = torch.rand(3, 7, 20)
    params, buffers = dict(population.stacked.named_parameters()), dict(population.stacked.named_buffers())
    batched = population(x, step=11)
    vmapped = vmap(population._member_forward)(params, buffers, x)  # the step was set by the call above
    torch.testing.assert_close(batched, vmapped, rtol=0, atol=1e-6)  # masks differing would move logits by ~0.1


def test_the_stacked_linear_layer_has_the_exact_gradient_in_the_weights_own_layout() -> None:
    """The batched MLP's layer computes its own backward (the weight gradient as ``grad^T @ x``):
    checked against finite differences in float64, against autograd's ``baddbmm`` backward in float32
    (the same products, possibly summed in another order), and laid out as the weight, so that
    ``AccumulateGrad`` keeps it instead of copying it (the copy of a transposed gradient was the
    most expensive part of a step: docstring of ``_StackedLinear``)."""
    g = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
                       for shape in [(3, 4, 6), (3, 5, 6), (3, 5)])
    assert torch.autograd.gradcheck(_StackedLinear.apply, (x, weight, bias))

    x, weight, bias = (t.detach().float().requires_grad_() for t in (x, weight, bias))
    upstream = torch.randn(3, 4, 5, generator=g)
    ours = torch.autograd.grad(_StackedLinear.apply(x, weight, bias), (x, weight, bias), upstream)
    autograd = torch.autograd.grad(torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2)), (x, weight, bias), upstream)
    for a, b in zip(ours, autograd):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    population = Population.from_seeds(lambda: MLP(20, [16], 5), [0, 1])
    population(torch.rand(2, 3, 20)).sum().backward()
    assert all(p.grad.stride() == p.stride() for p in population.parameters())
