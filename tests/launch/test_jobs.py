"""One job of ``grid`` or ``sweep``: started, resumed or set aside from what its run folder holds,
and what its ending leaves in its members' folders. The fit is a stand-in child process that prints
a line and exits with a given status."""

import sys
from pathlib import Path

from cl_lightning.launch.jobs import prepare, run_job
from cl_lightning.rundir import (
    CONFIG_FILE,
    FAILED_MARKER,
    LAST_CHECKPOINT,
    LOG_FILE,
    OUT_OF_MEMORY,
    population_folder,
    run_folder,
)

#: ``<entry> fit <line> <exit status> [--ckpt_path <checkpoint>]``: prints the line, exits with the status.
CHILD = (sys.executable, "-c", "import sys; print(sys.argv[2], flush=True); sys.exit(int(sys.argv[3]))")


def test_prepare_resumes_an_interrupted_run_and_sets_aside_a_failed_or_checkpointless_one(tmp_path):
    folder = run_folder(tmp_path, "permuted_digits", "naive", 0)
    assert prepare(folder) == []  # nothing there yet
    (folder / "checkpoints").mkdir(parents=True)
    (folder / LAST_CHECKPOINT).write_bytes(b"")
    (folder / CONFIG_FILE).write_text("model: {}\n")
    assert prepare(folder) == ["--ckpt_path", str(folder / LAST_CHECKPOINT)]
    assert (folder / CONFIG_FILE).exists()  # kept: only a fit that writes a new one replaces it
    (folder / FAILED_MARKER).write_text("exit code 1: error: boom\n")
    assert prepare(folder) == []
    assert not folder.exists() and (folder.parent / ".seed_0.attempt1" / FAILED_MARKER).exists()
    folder.mkdir()  # an attempt stopped before its first checkpoint starts again too
    assert prepare(folder) == [] and (folder.parent / ".seed_0.attempt2").is_dir()


def population(root: Path) -> tuple[Path, list[Path]]:
    return population_folder(root, "permuted_digits", "naive", [0, 1]), [
        run_folder(root, "permuted_digits", "naive", seed) for seed in (0, 1)]


def test_a_fresh_population_sets_its_members_earlier_attempts_aside_and_marks_the_members_that_did_not_finish(tmp_path):
    folder, members = population(tmp_path)
    members[0].mkdir(parents=True)
    (members[0] / FAILED_MARKER).write_text("exit code 1\n")  # an earlier attempt, of its own
    started = []
    job = run_job(folder, ["fit", "error: boom", "1"], members, entry=CHILD, on_start=started.append)
    assert started == [None] and (job.fit.code, job.fit.failure, job.halve) == (1, "exit code 1: error: boom", False)
    assert (members[0].parent / ".seed_0.attempt1" / FAILED_MARKER).read_text() == "exit code 1\n"
    assert job.unfinished == members
    for member in members:  # each with a marker of its own, naming the population's log
        assert (member / FAILED_MARKER).read_text() == (
            f"did not finish in the population run {folder}; see {folder / LOG_FILE}\n")
    assert (folder / FAILED_MARKER).read_text().startswith("exit code 1: error: boom\n\nlast lines of run.log:\n$ cl-lightning")


def test_a_population_out_of_the_devices_memory_is_to_be_halved_and_its_members_are_not_marked(tmp_path):
    folder, members = population(tmp_path)
    job = run_job(folder, ["fit", f"error: {OUT_OF_MEMORY}", "1"], members, entry=CHILD)
    assert job.halve and job.unfinished == [] and not any(member.exists() for member in members)
    # the caller's own reason to halve (the sweep's: several settings, one refused before training)
    job = run_job(folder, ["fit", "error: bad value", "1"], members, entry=CHILD, halve_if=lambda outcome: True)
    assert job.halve and (folder.parent / ".seeds_0-1.attempt1").is_dir()  # the failed attempt, set aside by prepare
    assert not any(member.exists() for member in members)


def test_an_interrupted_population_resumes_keeping_its_members_and_a_stop_by_a_signal_marks_nothing(tmp_path):
    folder, members = population(tmp_path)
    (folder / "checkpoints").mkdir(parents=True)
    (folder / LAST_CHECKPOINT).write_bytes(b"")
    for member in members:
        member.mkdir(parents=True)
    started = []
    job = run_job(folder, ["fit", "stopped", "143"], members, entry=CHILD, on_start=started.append)
    assert started == [folder / LAST_CHECKPOINT]
    assert job.fit.stopped and (job.fit.failure, job.unfinished, job.halve) == (None, [], False)
    assert all(member.is_dir() and not (member / FAILED_MARKER).exists() for member in members)
    assert not (folder / FAILED_MARKER).exists()
    assert f"\n--- resumed ---\n$ cl-lightning fit stopped 143 --ckpt_path {folder / LAST_CHECKPOINT}\n" in (
        folder / LOG_FILE).read_text()


def test_a_plain_run_marks_no_members(tmp_path):
    folder = run_folder(tmp_path, "permuted_digits", "naive", 0)
    job = run_job(folder, ["fit", "error: boom", "1"], [folder], entry=CHILD)
    assert (job.fit.failure, job.unfinished, job.halve) == ("exit code 1: error: boom", [], False)
    assert (folder / FAILED_MARKER).read_text().startswith("exit code 1: error: boom")
