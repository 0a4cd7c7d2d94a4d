"""Where a trial's run goes: the run folder of :mod:`cl_lightning.rundir`, through the same ``fit`` overrides as ``grid``."""

from cl_lightning.rundir import placement, run_folder
from cl_lightning.sweep.trial import TrialSpec


def test_a_trial_runs_its_setting_into_the_run_folder_with_the_folder_settings_last(tmp_path):
    spec = TrialSpec(tmp_path, "permuted_digits", "naive[lr=0.1]", 0, ["--config", "c.yaml", "--model.lr", "0.1"])
    assert spec.folder == run_folder(tmp_path, "permuted_digits", "naive[lr=0.1]", 0)
    assert spec.fit_args() == ["fit", "--config", "c.yaml", "--model.lr", "0.1",
                               *placement(tmp_path, "permuted_digits", "naive[lr=0.1]", 0),
                               "--trainer.enable_progress_bar", "false"]
