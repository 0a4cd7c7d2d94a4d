"""ER-Reservoir: the per-member reservoir's sampling law and state, and ER trained for real on small
seeded digits runs, member by member."""

import math

import pytest
import torch

from cl_lightning.methods.er import ER
from cl_lightning.methods.reservoir import ReservoirBuffer, member_keys, stream_bits


def stream(buffer: ReservoirBuffer, batch_sizes: list[int], start: int = 0) -> None:
    """Feed every member examples start, start+1, ... in batches; index and task both carry the
    example's number (task shifted by 1000, so a mix-up of the two shows)."""
    for size in batch_sizes:
        ids = torch.arange(start, start + size).expand(buffer.size, size)
        buffer.add(ids, ids + 1000)
        start += size


def kept_ids(buffer: ReservoirBuffer) -> torch.Tensor:
    """``[N, held]`` example numbers held by each member, in slot order."""
    index, task = buffer.examples()
    assert torch.equal(task, index + 1000)  # the two tensors stay aligned
    return index


def algorithm_r(seed: int, capacity: int, length: int) -> list[int]:
    """Vitter's algorithm R one example at a time, with the member's counter-based draws: the
    reference the batched insertion must equal."""
    keys = member_keys([seed], "er_reservoir")
    slots: list[int] = []
    for n in range(1, length + 1):
        if n <= capacity:
            slots.append(n - 1)
            continue
        j = int(stream_bits(keys, torch.tensor([n - 1]))[0, 0]) % n
        if j < capacity:
            slots[j] = n - 1
    return slots


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


BATCHINGS = [[1] * LENGTH, [7] * 8 + [4], [CAPACITY, LENGTH - CAPACITY], [LENGTH], [2, 9, 1, 30, 18]]
BATCHING_IDS = ["one_by_one", "batches_of_7", "fill_then_one_big_batch", "one_batch", "uneven"]


@pytest.mark.parametrize("batch_sizes", BATCHINGS, ids=BATCHING_IDS)
def test_reservoir_keeps_every_example_with_equal_probability(batch_sizes):
    # one population of TRIALS members (seeds 0..TRIALS-1): each member is one trial
    buffer = ReservoirBuffer(CAPACITY, range(TRIALS))
    stream(buffer, batch_sizes)
    ids = kept_ids(buffer)
    assert ids.shape == (TRIALS, CAPACITY) and all(len(row.unique()) == CAPACITY for row in ids)
    assert_uniform(torch.bincount(ids.flatten(), minlength=LENGTH), TRIALS, CAPACITY / LENGTH)


@pytest.mark.parametrize("policy", ["keep_first", "keep_last"])
def test_the_uniformity_bound_rejects_biased_reservoirs(policy):
    # what a keep-first / keep-last "reservoir" would have counted in the test above
    counts = torch.zeros(LENGTH, dtype=torch.long)
    kept = slice(0, CAPACITY) if policy == "keep_first" else slice(LENGTH - CAPACITY, LENGTH)
    counts[kept] = TRIALS
    with pytest.raises(AssertionError):
        assert_uniform(counts, TRIALS, CAPACITY / LENGTH)


class FirstDrawWins(ReservoirBuffer):
    """A subtly wrong reservoir: when several examples of one batch draw the same slot, the first
    of them keeps it (sequential insertion leaves the last)."""

    def _writers(self, slots):
        positions = torch.arange(slots.shape[1]).expand_as(slots)
        writer = torch.full((self.size, self.capacity + 1), slots.shape[1], dtype=torch.int64)
        writer.scatter_reduce_(1, slots, positions, reduce="amin")
        return writer.masked_fill(writer == slots.shape[1], -1)[:, : self.capacity]


def test_the_uniformity_bound_rejects_a_subtle_bias():
    buffer = FirstDrawWins(CAPACITY, range(TRIALS))
    stream(buffer, [CAPACITY, LENGTH - CAPACITY])
    with pytest.raises(AssertionError):
        assert_uniform(torch.bincount(kept_ids(buffer).flatten(), minlength=LENGTH), TRIALS, CAPACITY / LENGTH)


@pytest.mark.parametrize("batch_sizes", BATCHINGS + [[200], [5, 70, 70, 55]], ids=BATCHING_IDS + ["long", "long_uneven"])
def test_batched_insertion_is_algorithm_r_one_example_at_a_time(batch_sizes):
    # the draws are keyed by stream position, so any cut of the stream into batches gives the
    # memory that sequential insertion gives
    seeds = [0, 7, 123]
    buffer = ReservoirBuffer(8, seeds)
    stream(buffer, batch_sizes)
    for k, seed in enumerate(seeds):
        assert kept_ids(buffer)[k].tolist() == algorithm_r(seed, 8, sum(batch_sizes))


# ---------------------------------------------------------------------------- members
def test_member_k_holds_what_its_population_of_one_holds():
    seeds = [3, 11, 4]
    population = ReservoirBuffer(8, seeds)
    stream(population, [5, 40, 13])
    sampled = population.sample(4, member_keys(seeds, "er_sample"))
    for k, seed in enumerate(seeds):
        alone = ReservoirBuffer(8, [seed])
        stream(alone, [5, 40, 13])
        assert torch.equal(kept_ids(alone)[0], kept_ids(population)[k])
        assert torch.equal(alone.sample(4, member_keys([seed], "er_sample"))[0], sampled[k])
    assert not torch.equal(kept_ids(population)[0], kept_ids(population)[1])  # the seeds do matter


# ---------------------------------------------------------------------------- capacity and state
def test_capacity_is_respected_and_fills_in_order():
    buffer = ReservoirBuffer(5, [0, 1])
    assert len(buffer) == 0
    stream(buffer, [3])
    assert len(buffer) == 3 and kept_ids(buffer).tolist() == [[0, 1, 2]] * 2
    stream(buffer, [4], start=3)
    assert len(buffer) == 5 and buffer.seen == 7 and buffer.index.shape == (2, 5)
    assert set(kept_ids(buffer).flatten().tolist()) <= set(range(7))
    stream(buffer, [100] * 3, start=7)
    assert len(buffer) == 5 and buffer.seen == 307 and all(len(row.unique()) == 5 for row in kept_ids(buffer))


def test_sample_draws_without_replacement_and_caps_at_the_content():
    buffer = ReservoirBuffer(10, [0, 1, 2])
    keys = member_keys([0, 1, 2], "er_sample")
    stream(buffer, [4])
    slots = buffer.sample(64, keys)
    assert slots.shape == (3, 4) and all(sorted(row.tolist()) == [0, 1, 2, 3] for row in slots)  # fewer held: all
    stream(buffer, [50], start=4)
    slots = buffer.sample(6, keys)
    assert slots.shape == (3, 6) and all(len(row.unique()) == 6 for row in slots) and slots.max() < 10
    assert not torch.equal(slots, buffer.sample(6, keys.flip(0)))  # each member its own draw
    stream(buffer, [1], start=54)
    assert not torch.equal(slots, buffer.sample(6, keys))  # each step a new one


@pytest.mark.parametrize("capacity", [0, -3])
def test_bad_capacities_are_refused(capacity):
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(capacity, [0])


@pytest.mark.parametrize("kwargs", [{"memory_size": 0}, {"memory_size": 10, "memory_batch_size": 0}])
def test_er_refuses_an_empty_memory_or_replay(kwargs):
    with pytest.raises(ValueError, match="ER needs a memory" if kwargs["memory_size"] == 0 else "memory_batch_size"):
        ER(**kwargs)


def test_state_round_trip_gives_the_same_future(tmp_path):
    buffer = ReservoirBuffer(8, [3, 5])
    stream(buffer, [5, 11, 2])
    state = buffer.state_dict()
    path = tmp_path / "state.pt"
    torch.save(state, path)
    restored = ReservoirBuffer(8, [3, 5])  # the draws are keyed by the seeds: nothing else to restore
    restored.load_state_dict(torch.load(path, weights_only=True))
    stream(buffer, [13, 40], start=18)  # the saved state is a copy: this does not change it
    stream(restored, [13, 40], start=18)
    assert restored.seen == buffer.seen == 71
    assert torch.equal(kept_ids(buffer), kept_ids(restored))
    keys = member_keys([3, 5], "er_sample")
    assert torch.equal(buffer.sample(4, keys), restored.sample(4, keys))
    with pytest.raises(ValueError, match="memory size"):
        ReservoirBuffer(9, [3, 5]).load_state_dict(state)
    with pytest.raises(ValueError, match="seeds"):
        ReservoirBuffer(8, [3]).load_state_dict(state)
