"""What a trial does with the run folder it finds."""

from cl_lightning.sweep.trial import TrialSpec, prepare


def test_a_trial_resumes_an_interrupted_run_and_restarts_a_failed_one(tmp_path):
    spec = TrialSpec(tmp_path, "permuted_digits", "naive[lr=0.1]", 0)
    (spec.folder / "checkpoints").mkdir(parents=True)
    (spec.folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    (spec.folder / "config.yaml").write_text("model: {}\n")
    assert prepare(spec) == ["--ckpt_path", str(spec.folder / "checkpoints" / "last.ckpt")]
    assert not (spec.folder / "config.yaml").exists()  # the resumed fit writes it again (LightningCLI would refuse)
    (spec.folder / "FAILED").write_text("exit code 1: error: boom\n")
    assert prepare(spec) == []
    assert not spec.folder.exists() and (spec.folder.parent / ".seed_0.attempt1" / "FAILED").exists()
