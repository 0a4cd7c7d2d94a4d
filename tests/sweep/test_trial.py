"""Where a trial's run goes: the run folder of :mod:`cl_lightning.rundir`, through the same ``fit`` overrides as ``grid``."""

from cl_lightning.rundir import placement, run_folder
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
