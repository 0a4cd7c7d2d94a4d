"""MemberSGD is torch.optim.SGD per member, and MemberTaskLR the per-task lr decay per member.

All trajectory comparisons are bitwise (``torch.equal``): the update is elementwise (addcmul, mul,
add), and ``addcmul`` rounds as torch's ``add(..., alpha=)`` (one fused multiply-add) on this build,
so a population of one equals ``torch.optim.SGD`` exactly and member k of N equals its population
of one exactly. The gradients are ``noise + 0.5 * w``: they depend on the weights (so momentum,
weight decay and lr all shape the trajectory) and are exact elementwise (``0.5 * w`` is exact), so
no kernel difference can hide in them. The shapes leave vector-lane tails (7x5, 37, ...).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import Tensor

from cl_lightning.models.member_sgd import MemberSGD, MemberTaskLR

SHAPES = [(7, 5), (5,), (3, 2, 4), (37,)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def member_tensors(seed: int, step: int, dtype: torch.dtype) -> list[Tensor]:
    """One member's tensors of ``SHAPES``, drawn from (seed, step) alone."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    return [torch.randn(shape, generator=g, dtype=dtype) for shape in SHAPES]


def stacked(seeds: list[int], step: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[Tensor]:
    """The members' tensors stacked along dim 0: ``[N, *shape]`` each."""
    members = [member_tensors(seed, step, dtype) for seed in seeds]
    return [torch.stack(parts).to(device) for parts in zip(*members)]


def initial_params(seeds: list[int], dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[Tensor]:
    return [t.requires_grad_() for t in stacked(seeds, step=-1, dtype=dtype, device=device)]


def train(optimizer: torch.optim.Optimizer, params: list[Tensor], seeds: list[int], steps: range) -> None:
    """``optimizer.step()`` with member k's gradient ``noise(seeds[k], step) + 0.5 * w``."""
    for step in steps:
        for p, noise in zip(params, stacked(seeds, step, params[0].dtype, str(params[0].device))):
            p.grad = noise + 0.5 * p.detach()
        optimizer.step()


def clone(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- the update
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("as_tensors", [False, True])
@pytest.mark.parametrize("weight_decay", [0.01, 0.0])  # without: d = g, no pass over the weights
def test_population_of_one_is_torch_sgd_bitwise(dtype: torch.dtype, foreach: bool, as_tensors: bool,
                                                weight_decay: float) -> None:
    settings = {"lr": 0.1, "momentum": 0.9, "weight_decay": weight_decay}
    ours, theirs = initial_params([0], dtype), initial_params([0], dtype)
    member = {k: torch.tensor([v], dtype=dtype) for k, v in settings.items()} if as_tensors else settings
    with torch.no_grad():  # as in a training loop that steps outside autograd
        train(MemberSGD(ours, **member), ours, [0], range(6))  # momentum acts from step 2 on
    train(torch.optim.SGD(theirs, **settings, foreach=foreach), theirs, [0], range(6))
    assert equal(ours, theirs)


@pytest.mark.parametrize("device", DEVICES)
def test_member_k_is_its_population_of_one_bitwise(device: str) -> None:
    seeds = [0, 1, 2, 3]
    lr = torch.tensor([0.1, 0.05, 0.2, 0.01])
    momentum = torch.tensor([0.9, 0.0, 0.5, 0.8])
    weight_decay = torch.tensor([0.0, 0.01, 0.001, 0.1])
    params = initial_params(seeds, device=device)
    train(MemberSGD(params, lr, momentum, weight_decay), params, seeds, range(6))
    for k, seed in enumerate(seeds):
        alone = initial_params([seed], device=device)
        train(MemberSGD(alone, lr[k : k + 1], momentum[k : k + 1], weight_decay[k : k + 1]), alone, [seed], range(6))
        assert equal([p[k : k + 1] for p in params], alone), k
    # member 1 has momentum 0: plain SGD, as torch's SGD without a momentum buffer
    plain = initial_params([1], device=device)
    train(torch.optim.SGD(plain, lr=lr[1].item(), momentum=0.0, weight_decay=weight_decay[1].item()), plain, [1], range(6))
    assert equal([p[1:2] for p in params], plain)


def test_changing_member_2s_lr_leaves_member_1s_trajectory_unchanged() -> None:
    seeds = [0, 1, 2]
    base, changed = initial_params(seeds), initial_params(seeds)
    opt_base = MemberSGD(base, lr=0.1, momentum=0.9, weight_decay=0.01)
    opt_changed = MemberSGD(changed, lr=torch.tensor([0.1, 0.1, 0.3]), momentum=0.9, weight_decay=0.01)
    for step in range(6):
        if step == 3:  # a new task: member 2's lr differs again
            opt_base.set_lr(torch.tensor([0.05, 0.05, 0.05]))
            opt_changed.set_lr(torch.tensor([0.05, 0.05, 0.5]))
        train(opt_base, base, seeds, range(step, step + 1))
        train(opt_changed, changed, seeds, range(step, step + 1))
        assert equal([p[:2] for p in base], [p[:2] for p in changed]), step
        assert not torch.equal(base[0][2], changed[0][2])


# ---------------------------------------------------------------- task starts and resume
@pytest.mark.parametrize("how", ["assigned", "loaded"])
def test_a_weight_decay_set_after_steps_without_one_takes_effect(how: str) -> None:
    """Whether any member decays is checked once per settings tensor (not per step): a new tensor
    in the group, assigned or loaded with a state dict, is checked again. Against torch.optim.SGD,
    whose weight decay is read at every step."""
    ours, theirs = initial_params([1]), initial_params([1])
    optimizer, reference = MemberSGD(ours, lr=0.1, momentum=0.9), torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    train(optimizer, ours, [1], range(2))
    train(reference, theirs, [1], range(2))
    if how == "assigned":
        optimizer.param_groups[0]["weight_decay"] = torch.tensor([0.1])
    else:
        state = optimizer.state_dict()
        state["param_groups"][0]["weight_decay"] = torch.tensor([0.1])
        optimizer.load_state_dict(state)
    reference.param_groups[0]["weight_decay"] = 0.1
    train(optimizer, ours, [1], range(2, 4))
    train(reference, theirs, [1], range(2, 4))
    assert equal(ours, theirs)


def test_clearing_the_state_at_a_task_start_is_a_fresh_optimizer() -> None:
    seeds = [0, 1]
    momentum, weight_decay = torch.tensor([0.9, 0.5]), torch.tensor([0.01, 0.0])
    params = initial_params(seeds)
    optimizer = MemberSGD(params, torch.tensor([0.1, 0.2]), momentum, weight_decay)
    train(optimizer, params, seeds, range(3))
    at_task_start, kept_buffers = clone(params), clone(params)
    train_kept = MemberSGD(kept_buffers, torch.tensor([0.1, 0.2]), momentum, weight_decay)
    train_kept.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # its own copy of the buffers

    new_lr = torch.tensor([0.08, 0.15])
    optimizer.state.clear()  # what ContinualModule does at a task start
    optimizer.set_lr(new_lr)
    train(optimizer, params, seeds, range(3, 6))

    fresh = MemberSGD(at_task_start, new_lr, momentum, weight_decay)
    train(fresh, at_task_start, seeds, range(3, 6))
    assert equal(params, at_task_start)
    # ... and the clearing mattered: with the old buffers the members go elsewhere
    train_kept.set_lr(new_lr)
    train(train_kept, kept_buffers, seeds, range(3, 6))
    assert not equal(params, kept_buffers)


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_resumes_exactly(device: str) -> None:
    seeds = [0, 1, 2]
    settings = {"momentum": torch.tensor([0.9, 0.0, 0.5]), "weight_decay": torch.tensor([0.01, 0.0, 0.1])}
    params = initial_params(seeds, device=device)
    optimizer = MemberSGD(params, torch.tensor([0.1, 0.2, 0.05]), **settings)
    train(optimizer, params, seeds, range(2))
    optimizer.set_lr(torch.tensor([0.07, 0.2, 0.03]))  # the lr of a later task is part of the state
    train(optimizer, params, seeds, range(2, 4))
    # Through a file, as a checkpoint. (An in-memory state dict of a live optimizer shares its
    # momentum buffers with it, as torch's optimizers' do: loading does not copy them.)
    resumed, buffer = clone(params), io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)

    optimizer_resumed = MemberSGD(resumed, lr=1.0)  # other settings, no buffers: all come from the state
    optimizer_resumed.load_state_dict(torch.load(buffer))
    train(optimizer, params, seeds, range(4, 8))
    train(optimizer_resumed, resumed, seeds, range(4, 8))
    assert equal(params, resumed)
    # the loaded lr is the saved task's, not the constructor's
    assert torch.equal(optimizer_resumed.param_groups[0]["lr"], torch.tensor([0.07, 0.2, 0.03], device=device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_state_saved_on_cpu_loads_onto_cuda() -> None:
    seeds = [0, 1]
    settings = {"lr": torch.tensor([0.1, 0.2]), "momentum": torch.tensor([0.9, 0.5]), "weight_decay": 0.01}
    on_cpu = initial_params(seeds)
    optimizer = MemberSGD(on_cpu, **settings)
    train(optimizer, on_cpu, seeds, range(3))
    on_cuda = [p.detach().cuda().requires_grad_() for p in on_cpu]
    optimizer_cuda = MemberSGD(on_cuda, lr=1.0)
    optimizer_cuda.load_state_dict(optimizer.state_dict())
    train(optimizer, on_cpu, seeds, range(3, 6))
    train(optimizer_cuda, on_cuda, seeds, range(3, 6))
    for name in ("lr", "momentum", "weight_decay"):
        assert optimizer_cuda.param_groups[0][name].device.type == "cuda"
    # CPU and CUDA kernels may round differently
    for a, b in zip(on_cpu, on_cuda):
        torch.testing.assert_close(a, b.cpu())


def test_settings_of_another_dtype_or_a_plain_float_become_member_tensors_at_the_next_step() -> None:
    params = initial_params([0, 1])
    optimizer = MemberSGD(params, lr=0.1, momentum=0.9)
    state = optimizer.state_dict()
    state["param_groups"][0]["lr"] = torch.tensor([0.1, 0.2], dtype=torch.float64)
    optimizer.load_state_dict(state)
    optimizer.param_groups[0]["momentum"] = 0.5  # as a scheduler writing a float would
    train(optimizer, params, [0, 1], range(1))
    group = optimizer.param_groups[0]
    assert torch.equal(group["lr"], torch.tensor([0.1, 0.2]))
    assert torch.equal(group["momentum"], torch.tensor([0.5, 0.5]))


def test_bad_settings_and_parameters_are_refused() -> None:
    params = initial_params([0, 1, 2])
    with pytest.raises(ValueError, match=r"lr: one value per member, shape \(3,\)"):
        MemberSGD(params, lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="momentum must be >= 0"):
        MemberSGD(params, lr=0.1, momentum=torch.tensor([0.9, -0.1, 0.9]))
    with pytest.raises(ValueError, match="same N"):
        MemberSGD([params[0], initial_params([0, 1])[0]], lr=0.1)
    optimizer = MemberSGD(params, lr=0.1)
    with pytest.raises(ValueError, match="lr: one value per member"):
        optimizer.set_lr(torch.ones(3, 1))


# ---------------------------------------------------------------- the per-task lr decay
def test_member_task_lr_is_the_closed_form_with_its_floor() -> None:
    lr, decay, floor = [0.1, 0.05, 0.2], [0.8, 1.0, 0.5], [0.0005, 0.0005, 0.03]
    schedule = MemberTaskLR(*(torch.tensor(v, dtype=torch.float64) for v in (lr, decay, floor)), epochs_per_task=2)
    floored = set()
    for epoch in range(60):
        task = epoch // 2
        expected = [max(f, r * d**task) for r, d, f in zip(lr, decay, floor)]
        got = schedule(epoch)
        assert got.dtype == torch.float64 and got.tolist() == expected, epoch  # exact
        floored |= {k for k in range(3) if expected[k] == floor[k]}
        for k in range(3):  # the paper's max(floor, lr * decay^t) for each member, in plain Python
            assert got[k].item() == pytest.approx(max(floor[k], lr[k] * decay[k] ** (epoch // 2)), rel=1e-15)
    assert floored == {0, 2}  # member 0 reaches its floor at task 24, member 2 at task 3
    assert torch.equal(pickle.loads(pickle.dumps(schedule))(41), schedule(41))


def test_member_task_lr_broadcasts_floats_and_sets_member_sgd() -> None:
    schedule = MemberTaskLR(torch.tensor([0.1, 0.2], dtype=torch.float64), 0.5, 0.0005, epochs_per_task=1)
    assert schedule(2).tolist() == [0.1 * 0.25, 0.2 * 0.25]
    assert MemberTaskLR(0.1, 0.9, 0.0005, epochs_per_task=1)(0).shape == (1,)
    optimizer = MemberSGD(initial_params([0, 1]), lr=1.0)
    optimizer.set_lr(schedule(2))
    assert torch.equal(optimizer.param_groups[0]["lr"], schedule(2).float())
