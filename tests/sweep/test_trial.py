"""Where a trial's run goes: the run folder of :mod:`cl_lightning.rundir`, through the same ``fit`` overrides as ``grid``."""

from pathlib import Path

import pytest

from cl_lightning.rundir import is_finished, placement, run_folder
from cl_lightning.sweep.trial import TrialSpec


def test_a_trial_runs_its_setting_into_the_run_folder_with_the_folder_settings_last(tmp_path):
    spec = TrialSpec(tmp_path, "permuted_digits", "naive[lr=0.1]", 0, ["--config", "c.yaml", "--model.lr", "0.1"])
    assert spec.folder == run_folder(tmp_path, "permuted_digits", "naive[lr=0.1]", 0)
    assert spec.fit_args() == ["fit", "--config", "c.yaml", "--model.lr", "0.1",
                               *placement(tmp_path, "permuted_digits", "naive[lr=0.1]", 0),
                               "--trainer.enable_progress_bar", "false"]


def test_the_seeds_of_a_setting_are_packed_into_one_population_trial(tmp_path):
    from cl_lightning.rundir import population_folder, population_placement
    from cl_lightning.sweep.trial import PopulationSpec, pack

    def spec(label, seed, lr):
        return TrialSpec(tmp_path, "permuted_digits", label, seed, ["--config", "c.yaml", "--model.lr", lr])

    specs = [spec("naive[lr=0.1]", 0, "0.1"), spec("naive[lr=0.01]", 0, "0.01"), spec("naive[lr=0.1]", 3, "0.1")]
    population, alone = pack(specs)
    assert isinstance(population, PopulationSpec) and population.seeds == [0, 3] and alone is specs[1]
    assert population.folder == population_folder(tmp_path, "permuted_digits", "naive[lr=0.1]", [0, 3])
    assert population.name == "permuted_digits/naive[lr=0.1]/seeds_0-3"
    assert population.fit_args() == ["fit", "--config", "c.yaml", "--model.lr", "0.1",
                                      *population_placement(tmp_path, "permuted_digits", "naive[lr=0.1]", [0, 3]),
                                      "--trainer.enable_progress_bar", "false"]
    # the members' runs are the trials' own folders, which selection reads
    assert [m.folder for m in population.members] == [specs[0].folder, specs[2].folder]


@pytest.mark.slow
def test_a_population_trial_that_runs_out_of_device_memory_is_split_until_it_fits(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    from cl_lightning.rundir import is_finished
    from cl_lightning.sweep.trial import execute, pack

    tests = Path(__file__).parents[1]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")])))
    config = tests.parent / "configs" / "naive" / "permuted_digits.yaml"
    args = ["--config", str(config), "--data.num_tasks", "2", "--data.train_examples_per_task", "200",
            "--trainer.callbacks+=sequence_runs.OutOfMemoryAbove", "--trainer.callbacks.members", "1"]
    specs = [TrialSpec(tmp_path, "permuted_digits", "naive", seed, args) for seed in (0, 1)]
    [population] = pack(specs)
    reported = []
    result = execute(population, reported.append)
    assert all(is_finished(spec.folder) for spec in specs) and result["tasks_completed"] == 2
    assert (tmp_path / "permuted_digits" / "naive" / ".seeds_0-1.attempt1" / "FAILED").exists()


def test_settings_that_differ_only_in_per_member_values_share_a_population(tmp_path):
    """lr is a per-member setting: the two lrs x two seeds are one population of four whose members
    write into their trials' folders; a batch size changes shapes, so it splits the populations."""
    import json

    from cl_lightning.rundir import population_placement
    from cl_lightning.sweep.trial import PACKED, PopulationSpec, pack

    def spec(lr, batch, seed):
        setting = (("model.lr", lr), ("data.batch_size", batch))
        return TrialSpec(tmp_path, "permuted_digits", f"naive[lr={lr},batch_size={batch}]", seed, ["--config", "c.yaml"],
                         setting=setting)

    specs = [spec(lr, batch, seed) for batch in (10, 64) for lr in (0.1, 0.01) for seed in (0, 3)]
    small, large = pack(specs, frozenset({"model.lr", "model.momentum"}))
    assert isinstance(small, PopulationSpec) and small.members == tuple(specs[:4]) and large.members == tuple(specs[4:])
    assert small.seeds == [0, 3, 0, 3] and not small.one_setting
    assert small.folder.parent == tmp_path / "permuted_digits" / PACKED and small.folder != large.folder
    assert small.fit_args() == ["fit", "--config", "c.yaml", "--model.lr", "[0.1, 0.1, 0.01, 0.01]", "--data.batch_size", "10",
                                *population_placement(tmp_path, "permuted_digits", PACKED, [0, 3, 0, 3], small.folder,
                                                      [s.folder for s in specs[:4]]),
                                "--trainer.enable_progress_bar", "false"]
    assert json.loads(small.fit_args()[small.fit_args().index("--member_dirs") + 1]) == [str(s.folder) for s in specs[:4]]
    # at most `size` members a population; without per-member keys each setting is its own population
    assert [len(getattr(job, "members", [job])) for job in pack(specs, frozenset({"model.lr"}), size=3)] == [3, 1, 3, 1]
    assert all(job.one_setting for job in pack(specs))


@pytest.mark.slow
def test_a_packed_population_of_settings_gives_each_its_plain_runs_numbers(tmp_path):
    """Two learning rates x two seeds in one fit: each member's accuracy matrix is its plain trial's,
    bitwise; a refused value fails its own trials only (the population is split until it does)."""
    import json

    import pytest

    from cl_lightning.sweep.trial import TrialFailedError, execute, pack

    config = Path(__file__).parents[2] / "configs" / "naive" / "permuted_digits.yaml"
    args = ["--config", str(config), "--data.num_tasks", "2", "--data.train_examples_per_task", "200"]

    def spec(root, lr, seed):
        return TrialSpec(root, "permuted_digits", f"naive[lr={lr}]", seed, args, setting=(("model.lr", lr),))

    packed = [spec(tmp_path / "packed", lr, seed) for lr in (0.1, 0.02) for seed in (0, 1)]
    [population] = pack(packed, frozenset({"model.lr"}))
    execute(population)
    alone = spec(tmp_path / "alone", 0.02, 1)
    execute(alone)

    def matrix(folder):
        return json.loads((folder / "accuracy_matrix.json").read_text())["matrix"]

    assert matrix(packed[3].folder) == matrix(alone.folder)
    assert matrix(packed[0].folder) != matrix(packed[2].folder)

    bad = [spec(tmp_path / "bad", lr, 0) for lr in (0.1, -1.0)]
    [population] = pack(bad, frozenset({"model.lr"}))
    with pytest.raises(TrialFailedError, match=r"naive\[lr=-1.0\]"):
        execute(population)
    assert is_finished(bad[0].folder) and "model.lr" in (bad[1].folder / "FAILED").read_text()
