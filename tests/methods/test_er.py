"""ER-Reservoir: the reservoir's sampling law and state, and ER trained for real on small seeded digits runs."""

import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from ddp_probes import MemoryAgreement
from lightning.pytorch import Callback, Trainer, seed_everything
from sequence_runs import assert_same_run, fit_permuted_digits, straight_and_resumed
from torch.nn.utils import parameters_to_vector

from cl_lightning.data.datamodule import ContinualDataModule
from cl_lightning.methods.er import ER
from cl_lightning.methods.reservoir import ReservoirBuffer
from cl_lightning.metrics.continual import average_accuracy, forgetting
from cl_lightning.models.module import ContinualModule
from cl_lightning.models.nets import MLP


def stream(buffer: ReservoirBuffer, batch_sizes: list[int], start: int = 0) -> None:
    """Feed examples start, start+1, ... in batches; x, y and task all carry the example's number."""
    for size in batch_sizes:
        ids = torch.arange(start, start + size)
        buffer.add(ids.float().unsqueeze(1), ids, ids)
        start += size


def kept_ids(buffer: ReservoirBuffer) -> torch.Tensor:
    x, y, task = buffer.examples()
    assert torch.equal(x.squeeze(1).long(), y) and torch.equal(y, task)  # the three tensors stay aligned
    return y


# ---------------------------------------------------------------------------- the sampling law
CAPACITY, LENGTH, TRIALS = 6, 60, 600


def uniformity(counts: torch.Tensor, trials: int, p: float) -> tuple[float, float]:
    """(max |z|, sum z^2) of per-element keep counts against Binomial(trials, p).

    For a correct reservoir every element is kept with probability p = capacity / length, so each
    z is about N(0, 1) and the sum about chi-square with `length` degrees of freedom (mean
    length, sd sqrt(2 length)); the bounds used below (6 and length + 10 sd) fail with
    probability far below 1e-6.
    """
    z = (counts.double() - trials * p) / math.sqrt(trials * p * (1 - p))
    return z.abs().max().item(), (z**2).sum().item()


def assert_uniform(counts: torch.Tensor, trials: int, p: float) -> None:
    max_z, chi2 = uniformity(counts, trials, p)
    n = len(counts)
    assert max_z < 6.0 and chi2 < n + 10 * math.sqrt(2 * n), (max_z, chi2, counts.tolist())


@pytest.mark.parametrize(
    "batch_sizes",
    [[1] * LENGTH, [7] * 8 + [4], [CAPACITY, LENGTH - CAPACITY], [LENGTH], [2, 9, 1, 30, 18]],
    ids=["one_by_one", "batches_of_7", "fill_then_one_big_batch", "one_batch", "uneven"],
)
def test_reservoir_keeps_every_example_with_equal_probability(batch_sizes):
    counts = torch.zeros(LENGTH, dtype=torch.long)
    for trial in range(TRIALS):
        buffer = ReservoirBuffer(CAPACITY, torch.Generator().manual_seed(trial))
        stream(buffer, batch_sizes)
        ids = kept_ids(buffer)
        assert len(ids) == CAPACITY and len(ids.unique()) == CAPACITY
        counts += torch.bincount(ids, minlength=LENGTH)
    assert_uniform(counts, TRIALS, CAPACITY / LENGTH)


@pytest.mark.parametrize("policy", ["keep_first", "keep_last"])
def test_the_uniformity_bound_rejects_biased_reservoirs(policy):
    # what a keep-first / keep-last "reservoir" would have counted in the test above
    counts = torch.zeros(LENGTH, dtype=torch.long)
    kept = slice(0, CAPACITY) if policy == "keep_first" else slice(LENGTH - CAPACITY, LENGTH)
    counts[kept] = TRIALS
    with pytest.raises(AssertionError):
        assert_uniform(counts, TRIALS, CAPACITY / LENGTH)


@pytest.mark.parametrize("batch_sizes", [[3, 20, 1, 40], [200], [5, 70, 70]])
def test_python_and_tensor_paths_make_the_same_choices(batch_sizes):
    fast, vectorized = ReservoirBuffer(8, torch.Generator().manual_seed(4)), ReservoirBuffer(8, torch.Generator().manual_seed(4))
    fast.python_draws, vectorized.python_draws = 10**9, 0
    stream(fast, batch_sizes)
    stream(vectorized, batch_sizes)
    assert torch.equal(kept_ids(fast), kept_ids(vectorized))


class FirstDrawWins(ReservoirBuffer):
    """A subtly wrong reservoir: when several examples of one batch draw the same slot, the first
    of them keeps it (sequential insertion leaves the last)."""

    def _choose(self, size):
        free = max(0, min(self.capacity - self.seen, size))
        n = torch.arange(self.seen + free + 1, self.seen + size + 1, dtype=torch.float64)
        j = (torch.rand(size - free, generator=self.generator, dtype=torch.float64) * n).long()
        slot_of: dict[int, int] = {}
        for position, slot in enumerate(j.tolist()):
            if slot < self.capacity:
                slot_of.setdefault(slot, free + position)
        positions = torch.cat([torch.arange(free), torch.tensor(list(slot_of.values()), dtype=torch.long)])
        slots = torch.cat([torch.arange(self.seen, self.seen + free), torch.tensor(list(slot_of), dtype=torch.long)])
        return positions, slots


def test_the_uniformity_bound_rejects_a_subtle_bias():
    counts = torch.zeros(LENGTH, dtype=torch.long)
    for trial in range(TRIALS):
        buffer = FirstDrawWins(CAPACITY, torch.Generator().manual_seed(trial))
        stream(buffer, [CAPACITY, LENGTH - CAPACITY])
        counts += torch.bincount(kept_ids(buffer), minlength=LENGTH)
    with pytest.raises(AssertionError):
        assert_uniform(counts, TRIALS, CAPACITY / LENGTH)


# ---------------------------------------------------------------------------- capacity and state
def test_capacity_is_respected_and_fills_in_order():
    buffer = ReservoirBuffer(5, torch.Generator().manual_seed(0))
    assert len(buffer) == 0
    stream(buffer, [3])
    assert len(buffer) == 3 and kept_ids(buffer).tolist() == [0, 1, 2]
    stream(buffer, [4], start=3)
    assert len(buffer) == 5 and buffer.seen == 7 and buffer.x.shape[0] == 5
    assert set(kept_ids(buffer).tolist()) <= set(range(7))
    stream(buffer, [100] * 3, start=7)
    assert len(buffer) == 5 and buffer.seen == 307 and len(kept_ids(buffer).unique()) == 5


def test_sample_draws_without_replacement_and_caps_at_the_content():
    buffer = ReservoirBuffer(10, torch.Generator().manual_seed(0))
    stream(buffer, [4])
    x, y, task = buffer.sample(64, torch.Generator().manual_seed(0))
    assert sorted(y.tolist()) == [0, 1, 2, 3]  # fewer held than asked: all of them
    stream(buffer, [50], start=4)
    _, y, _ = buffer.sample(6, torch.Generator().manual_seed(0))
    assert len(y) == 6 and len(y.unique()) == 6 and set(y.tolist()) <= set(kept_ids(buffer).tolist())


@pytest.mark.parametrize("capacity", [0, -3])
def test_bad_capacities_are_refused(capacity):
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(capacity)


@pytest.mark.parametrize("kwargs", [{"memory_size": 0}, {"memory_size": 10, "memory_batch_size": 0}])
def test_er_refuses_an_empty_memory_or_replay(kwargs):
    with pytest.raises(ValueError, match="ER needs a memory" if kwargs["memory_size"] == 0 else "memory_batch_size"):
        ER(**kwargs)


def test_state_round_trip_gives_the_same_future(tmp_path):
    buffer = ReservoirBuffer(8, torch.Generator().manual_seed(3))
    stream(buffer, [5, 11, 2])
    state = buffer.state_dict()
    path = tmp_path / "state.pt"
    torch.save(state, path)
    restored = ReservoirBuffer(8)  # unseeded: the state brings the generator along
    restored.load_state_dict(torch.load(path, weights_only=True))
    stream(buffer, [13, 40], start=18)  # the saved state is a copy: this does not change it
    stream(restored, [13, 40], start=18)
    assert restored.seen == buffer.seen == 71
    for a, b in zip(buffer.examples(), restored.examples()):
        assert torch.equal(a, b)
    assert torch.equal(buffer.sample(4, torch.Generator().manual_seed(1))[1],
                       restored.sample(4, torch.Generator().manual_seed(1))[1])
    with pytest.raises(ValueError, match="memory size"):
        ReservoirBuffer(9).load_state_dict(state)


def test_er_state_round_trip_includes_both_generators():
    er = ER(memory_size=8, memory_batch_size=3)
    er.buffer, er.sampler = ReservoirBuffer(8, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1)
    stream(er.buffer, [20])
    er.sampler.manual_seed(5)
    buffer = io.BytesIO()
    torch.save(er.state_dict(), buffer)
    buffer.seek(0)
    restored = ER(memory_size=8, memory_batch_size=3)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(3):
        assert torch.equal(er.buffer.sample(3, er.sampler)[1], restored.buffer.sample(3, restored.sampler)[1])
    stream(er.buffer, [7], start=20)
    stream(restored.buffer, [7], start=20)
    assert torch.equal(er.buffer.examples()[1], restored.buffer.examples()[1])


# ---------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def forgetting_runs(tmp_path_factory):
    """Naive SGD and ER on 5 permuted-digits tasks, MLP 64-100-100-10, same seed and settings."""
    er = ER(memory_size=50, memory_batch_size=16)
    naive, _ = fit_permuted_digits(tmp_path_factory.mktemp("naive"), lr_decay=0.8)
    replay, _ = fit_permuted_digits(tmp_path_factory.mktemp("er"), [er], lr_decay=0.8)
    return naive, replay, er


def test_er_reduces_forgetting(forgetting_runs):
    naive, replay, _ = forgetting_runs
    last = naive.shape[0] - 1
    print(f"\nforgetting naive {forgetting(naive, last):.3f}  ER {forgetting(replay, last):.3f}; "
          f"average accuracy naive {average_accuracy(naive, last):.1f}  ER {average_accuracy(replay, last):.1f}")
    # measured: forgetting 0.60 naive vs 0.13 ER, average accuracy 42 vs 80 %
    assert forgetting(replay, last) < forgetting(naive, last) - 0.2
    assert average_accuracy(replay, last) > average_accuracy(naive, last) + 15.0


def test_memory_is_a_sample_of_every_task(forgetting_runs):
    *_, er = forgetting_runs
    assert len(er.buffer) == 50 and er.buffer.seen == 5 * len(ContinualDataModule(source="digits", seed=0).task_dataset(0))
    shares = er.shares(5)
    assert torch.all(shares > 0.05) and shares.sum().item() == pytest.approx(1.0)  # about 1/5 each


class JoinedBatchProbe(Callback):
    """Placed before ER: at each micro-batch of one optimizer step, computes on its own the gradient
    of the mean cross-entropy over the current batch joined with the memory batch ER is about to
    draw (from a copy of ER's sampler), as the reference trains on the concatenation."""

    def __init__(self, er: ER, step: int) -> None:
        self.er, self.step, self.batch, self.joined = er, step, None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step != self.step:
            return
        sampler = torch.Generator()
        sampler.set_state(self.er.sampler.get_state())
        memory = self.er.buffer.sample(self.er.memory_batch_size, sampler)
        x, y, task = (torch.cat([m, c]) for m, c in zip(memory, self.batch))
        with torch.enable_grad():
            grads = torch.autograd.grad(F.cross_entropy(pl_module(x, task), y), list(pl_module.parameters()))
        self.joined.append(parameters_to_vector(grads))


class GradientProbe(Callback):
    """Placed after ER: the gradient the optimizer will step with (after the step's last micro-batch)."""

    def __init__(self, step: int) -> None:
        self.step, self.grad = step, None

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            self.grad = parameters_to_vector(p.grad for p in pl_module.parameters()).clone()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_step_follows_one_mean_over_the_joined_current_and_memory_batch(tmp_path, accumulate):
    step = 150 // accumulate  # in task 2 (90 batches per task): the memory holds examples of both tasks
    er = ER(memory_size=40, memory_batch_size=8)  # memory batch 8 beside current batches of 16
    probe, after = JoinedBatchProbe(er, step), GradientProbe(step)
    seed_everything(0)
    dm = ContinualDataModule(source="digits", benchmark="permuted", num_tasks=2, batch_size=16, seed=0)
    module = ContinualModule(MLP(64, [32], 10, dropout=0.0), lr=0.1)  # no dropout: the loss is recomputable
    trainer = Trainer(**dm.trainer_settings(), callbacks=[probe, er, after], logger=False,
                      accumulate_grad_batches=accumulate, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert len(probe.joined) == accumulate and after.grad is not None
    # Lightning averages the micro-batches' losses over the accumulation window
    expected = torch.stack(probe.joined).mean(0)
    torch.testing.assert_close(after.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_resume_between_tasks_gives_the_same_run(tmp_path):
    straight, resumed = straight_and_resumed(tmp_path, lambda: [ER(memory_size=30, memory_batch_size=8)],
                                             num_tasks=3, dropout=0.25, hidden=(32,), lr_decay=0.8)
    assert_same_run(straight, resumed)
    [straight_er], [resumed_er] = straight[0], resumed[0]
    assert resumed_er.buffer.seen == straight_er.buffer.seen
    for a, b in zip(resumed_er.buffer.examples(), straight_er.buffer.examples()):
        assert torch.equal(a, b)
    assert torch.equal(resumed_er.sampler.get_state(), straight_er.sampler.get_state())


@pytest.mark.slow
def test_processes_keep_identical_memories_under_ddp(tmp_path):
    seed_everything(0)
    dm = ContinualDataModule(source="digits", benchmark="permuted", num_tasks=2, batch_size=16, seed=0)
    module = ContinualModule(MLP(64, [32], 10, dropout=0.25), lr=0.1)
    er = ER(memory_size=30, memory_batch_size=8)
    out = tmp_path / "agreement.jsonl"
    trainer = Trainer(
        **dm.trainer_settings(), accelerator="cpu", devices=2, strategy="ddp_spawn",
        callbacks=[er, MemoryAgreement(er, str(out))], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    per_task = len(dm.task_dataset(0))
    assert [r["task"] for r in records] == [0, 1]
    for r in records:
        assert r["world_size"] == 2 and r["held"] == 30
        assert r["x"] and r["y"] and r["task_ids"] and r["sampler"] and r["weights"], r
        # the reservoir saw the global stream: both shards (DistributedSampler pads to equal shards)
        assert per_task * (r["task"] + 1) <= r["seen"] <= (per_task + 1) * (r["task"] + 1)
