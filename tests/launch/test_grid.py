"""``cl-lightning grid``: a real 2-run grid on the offline digits, a failure, and what a rerun does."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from processes import command_lines
from signal_probes import has_pending, is_paused, wait_until

from cl_lightning.analysis.report import write_report
from cl_lightning.launch.grid import GridError, fit_command, main
from cl_lightning.rundir import WallTime, wall_time

CONFIGS = Path(__file__).parents[2] / "configs"
TINY = ["--", "--data.num_tasks", "2", "--data.train_examples_per_task", "200", "--trainer.enable_model_summary", "false"]


def test_fit_command_names_the_run_folder():
    command = fit_command(Path("configs/mcsgd/rotated_mnist.yaml"), Path("runs"), "rotated_mnist", "mcsgd", [3], ["--x", "1"])
    assert command[:5] == ["fit", "--config", "configs/mcsgd/rotated_mnist.yaml", "--seed_everything", "3"]
    text = " ".join(command)
    assert ("--trainer.logger.init_args.save_dir runs --trainer.logger.init_args.name rotated_mnist/mcsgd "
            "--trainer.logger.init_args.version seed_3") in text
    assert command[-2:] == ["--x", "1"]  # user overrides last: they win


def test_fit_command_of_several_seeds_is_one_population():
    command = fit_command(Path("c.yaml"), Path("runs"), "rotated_mnist", "mcsgd", [0, 3, 4], ["--x", "1"])
    assert command[:5] == ["fit", "--config", "c.yaml", "--seeds", "[0,3,4]"]
    assert "--trainer.logger.init_args.version seeds_0-3-4" in " ".join(command) and command[-2:] == ["--x", "1"]


@pytest.mark.slow
def test_grid_runs_names_folders_goes_on_after_a_failure_and_skips_finished_runs(tmp_path, capsys):
    configs, root = tmp_path / "configs", tmp_path / "runs"
    (configs / "naive").mkdir(parents=True)
    shutil.copy(CONFIGS / "naive" / "permuted_digits.yaml", configs / "naive")
    # a method whose data cannot be found: its run fails, the grid goes on
    (configs / "broken").mkdir()
    (configs / "broken" / "permuted_digits.yaml").write_text(
        f"model:\n  net: {{class_path: cl_lightning.models.nets.MLP}}\ndata: {{source: mnist, root: {tmp_path / 'nowhere'}}}\n")
    grid = ["--methods", "naive", "broken", "--benchmarks", "permuted_digits", "--seeds", "1",
            "--root", str(root), "--configs", str(configs), *TINY]

    with pytest.raises(GridError, match="1 run\\(s\\) did not finish"):
        main(grid)
    naive, broken = root / "permuted_digits" / "naive" / "seed_1", root / "permuted_digits" / "broken" / "seed_1"
    record = json.loads((naive / "accuracy_matrix.json").read_text())
    assert record["tasks_completed"] == record["num_tasks"] == 2
    assert "seed_everything: 1" in (naive / "config.yaml").read_text()
    assert (naive / "checkpoints" / "last.ckpt").exists() and (naive / "run.log").exists()
    assert "MNIST" in (broken / "FAILED").read_text()  # the data error that made it fail, named
    out = capsys.readouterr().out
    assert "naive/seed_1: done in" in out and "broken/seed_1: FAILED (exit code 1: error: " in out

    # the same command again skips the finished run and would rerun the failed one (a dry run: no third process)
    before = (naive / "accuracy_matrix.json").stat().st_mtime_ns
    main([*grid[: grid.index("--")], "--dry_run"])
    out = capsys.readouterr().out
    assert "naive/seed_1: finished already, skipped" in out and "broken/seed_1: cl-lightning fit --config" in out
    assert (naive / "accuracy_matrix.json").stat().st_mtime_ns == before
    report, _ = write_report(root, draw=False)
    assert [(r.method, r.status) for r in report.runs] == [("naive", "finished"), ("broken", "failed")]


def test_missing_config_is_named_with_what_exists(tmp_path):
    with pytest.raises(GridError) as error:
        main(["--methods", "mcsgd", "--benchmarks", "permuted_mnsit", "--seeds", "0", "--configs", str(CONFIGS)])
    message = str(error.value)
    assert "mcsgd/permuted_mnsit.yaml" in message and "mcsgd/permuted_mnist.yaml" in message


def test_dry_run_prints_commands_and_runs_nothing(tmp_path, capsys):
    grid = ["--methods", "naive", "mcsgd", "--benchmarks", "rotated_mnist", "--seeds", "0", "1", "--root", str(tmp_path),
            "--configs", str(CONFIGS), "--dry_run"]
    main(grid)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("[2/2] rotated_mnist/mcsgd/seeds_0-1: cl-lightning fit --config")
    assert "--seeds [0,1]" in lines[1]
    main([*grid, "--solo"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[3].startswith("[2/2] rotated_mnist/mcsgd/seed_1: cl-lightning fit --config")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_grid_packs_a_cells_seeds_into_one_population_that_report_reads_as_runs(tmp_path, capsys):
    root = tmp_path / "runs"
    grid = ["--methods", "naive", "--benchmarks", "permuted_digits", "--seeds", "0", "2", "--root", str(root),
            "--configs", str(CONFIGS), *TINY]
    main(grid)
    cell = root / "permuted_digits" / "naive"
    assert sorted(p.name for p in cell.iterdir()) == ["seed_0", "seed_2", "seeds_0-2"]
    assert (cell / "seeds_0-2" / "checkpoints" / "last.ckpt").exists() and (cell / "seeds_0-2" / "run.log").exists()
    out = capsys.readouterr().out
    assert "naive/seeds_0-2: done in" in out and "seed_0 " in out and "seed_2 " in out
    report, _ = write_report(root, draw=False)
    assert [(r.seed, r.status) for r in report.runs] == [(0, "finished"), (2, "finished")]
    # each member costs its share of the population's process: the wall time in its run.log over 2
    population_time = wall_time(cell / "seeds_0-2")
    assert population_time.complete and population_time.seconds > 0
    assert [r.wall_time for r in report.runs] == [WallTime(population_time.seconds / 2, True)] * 2
    main(grid)  # everything finished: nothing runs again
    assert "seed_0: finished already, skipped" in capsys.readouterr().out
    # the runs copied elsewhere find their own population; an attempt killed with its launcher (no
    # wall-time line) counts the tasks it logged as finished, a lower bound, said with ≥ in the report
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    log_file = moved / "permuted_digits" / "naive" / "seeds_0-2" / "run.log"
    log = log_file.read_text()
    task_seconds = [float(s) for s in re.findall(r"^task \d/2: \d+ steps in ([0-9.]+) s", log, re.MULTILINE)]
    assert len(task_seconds) == 2
    log_file.write_text(re.sub(r"wall time of the whole command: .*", "", log)
                        + "\n--- resumed ---\n$ cl-lightning fit --config c.yaml --ckpt_path last.ckpt\n")
    report, _ = write_report(moved, draw=False)
    killed = sum(task_seconds) / 2
    assert [r.wall_time for r in report.runs] == [WallTime(pytest.approx(killed), False)] * 2
    assert killed < population_time.seconds / 2
    markdown = (moved / "report.md").read_text()
    assert f"| naive | ≥{killed:.0f} |" in markdown and "2 run(s) have an attempt that logged no wall time" in markdown


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_stopped_grid_stops_the_running_fit_with_its_checkpoint_and_the_rerun_resumes_it(signum, tmp_path, capsys,
                                                                                            monkeypatch):
    """Ctrl-C (the terminal's foreground group) or SIGTERM (`kill`, a scheduler) reaches the grid, not
    the fit, which runs in a session of its own: it is passed to the fit, which stops with a
    checkpoint, and the grid ends with one line naming the rerun, status 130 / 143, no traceback, and
    no FAILED marker for the unfinished run; no fit trains on as an orphan. The rerun resumes that
    run from its last.ckpt (the stop's checkpoint), not from scratch."""
    repo = CONFIGS.parent
    root = tmp_path / "runs"
    args = ["--methods", "naive", "--benchmarks", "permuted_digits", "--seeds", "0", "--root", str(root),
            "--configs", str(CONFIGS), *TINY, "--trainer.callbacks+=signal_probes.PauseAt", "--trainer.callbacks.step", "5"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests"), os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "grid.log", "w") as log:
        grid = subprocess.Popen([sys.executable, "-m", "cl_lightning", "grid", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    try:
        def paused_fit() -> int | None:
            return next((pid for pid, text in command_lines().items()
                         if "cl_lightning fit" in text and str(root) in text and is_paused(pid)), None)

        wait_until(lambda: paused_fit() is not None or grid.poll() is not None, "the fit to pause")
        fit = paused_fit()
        assert fit is not None, "the run ended before its pause point"
        os.kill(grid.pid, signum)
        wait_until(lambda: has_pending(fit, signum), "the grid to pass the signal on")
        os.kill(fit, signal.SIGCONT)
        assert grid.wait(timeout=300) == 128 + signum
        assert not any("cl_lightning fit" in text and str(root) in text for text in command_lines().values())  # no orphan
    finally:
        grid.kill()
    output = (tmp_path / "grid.log").read_text()
    assert "Traceback" not in output
    how = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "stopped by SIGTERM"
    assert output.splitlines()[-1] == (f"{how}; finished runs are kept and the interrupted ones resume from "
                                       f"their last checkpoint when you rerun: cl-lightning grid {shlex.join(args)}")
    run = root / "permuted_digits" / "naive" / "seed_0"
    log = (run / "run.log").read_text()
    name = signal.Signals(signum).name
    assert f"stopped by {name} at epoch 0, step 5: checkpoint" in log and f"(exit code {128 + signum})" in log
    assert (run / "checkpoints" / "interrupted-epoch=0-step=5.ckpt").exists() and not (run / "FAILED").exists()

    assert (run / "checkpoints" / "last.ckpt").exists()  # the stop's state (else the rerun would start afresh)
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])  # the rerun's fit loads the probe callback of the config
    main(args)
    assert "resuming from" in capsys.readouterr().out
    log = (run / "run.log").read_text()
    assert log.count("$ cl-lightning fit") == 2 and "--- resumed ---" in log
    assert f"--ckpt_path {run / 'checkpoints' / 'last.ckpt'}" in log
    record = json.loads((run / "accuracy_matrix.json").read_text())
    assert record["tasks_completed"] == record["num_tasks"] == 2


@pytest.mark.slow
def test_jobs_run_fits_at_once_and_a_sigterm_stops_each_with_its_checkpoint(tmp_path, capsys, monkeypatch):
    """``--jobs 2``: two fits train at the same time (both reach their pause point together); SIGTERM
    to the grid reaches both, each stops with its checkpoint, no orphan trains on; the rerun resumes
    both, and their results are those of the same runs made one after another."""
    repo = CONFIGS.parent
    root = tmp_path / "runs"
    args = ["--methods", "naive", "--benchmarks", "permuted_digits", "--seeds", "0", "1", "--solo", "--jobs", "2",
            "--root", str(root), "--configs", str(CONFIGS), *TINY, "--trainer.callbacks+=signal_probes.PauseAt",
            "--trainer.callbacks.step", "5"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests"), os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "grid.log", "w") as log:
        grid = subprocess.Popen([sys.executable, "-m", "cl_lightning", "grid", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    try:
        def paused_fits() -> list[int]:
            return [pid for pid, text in command_lines().items()
                    if "cl_lightning fit" in text and str(root) in text and is_paused(pid)]

        wait_until(lambda: len(paused_fits()) == 2 or grid.poll() is not None, "both fits to pause")
        fits = paused_fits()
        assert len(fits) == 2, "the fits did not run at the same time"
        os.kill(grid.pid, signal.SIGTERM)
        wait_until(lambda: all(has_pending(fit, signal.SIGTERM) for fit in fits), "the grid to pass SIGTERM on to both")
        for fit in fits:
            os.kill(fit, signal.SIGCONT)
        assert grid.wait(timeout=300) == 128 + signal.SIGTERM
        assert not any("cl_lightning fit" in text and str(root) in text for text in command_lines().values())  # no orphan
    finally:
        grid.kill()
    assert "Traceback" not in (tmp_path / "grid.log").read_text()
    runs = [root / "permuted_digits" / "naive" / f"seed_{seed}" for seed in (0, 1)]
    for run in runs:
        assert (run / "checkpoints" / "interrupted-epoch=0-step=5.ckpt").exists() and not (run / "FAILED").exists()

    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])  # the rerun's fits load the probe callback of the config
    main(args)
    assert capsys.readouterr().out.count("resuming from") == 2
    one_by_one = tmp_path / "one_by_one"
    main(["--methods", "naive", "--benchmarks", "permuted_digits", "--seeds", "0", "1", "--solo", "--root", str(one_by_one),
          "--configs", str(CONFIGS), *TINY])
    for run in runs:  # the matrices as written (tasks not reached are null)
        assert json.loads((run / "accuracy_matrix.json").read_text())["matrix"] == json.loads(
            (one_by_one / "permuted_digits" / "naive" / run.name / "accuracy_matrix.json").read_text())["matrix"]


def test_jobs_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--methods", "naive", "--benchmarks", "permuted_digits", "--seeds", "0", "--jobs", "0", "--root", str(tmp_path)])
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_a_population_that_runs_out_of_device_memory_is_split_until_it_fits(tmp_path, capsys, monkeypatch):
    tests = Path(__file__).parents[1]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")])))
    root = tmp_path / "runs"
    main(["--methods", "naive", "--benchmarks", "permuted_digits", "--seeds", "0", "1", "2", "--root", str(root),
          "--configs", str(CONFIGS), *TINY, "--trainer.callbacks+=sequence_runs.OutOfMemoryAbove",
          "--trainer.callbacks.members", "1"])
    out = capsys.readouterr().out
    assert "seeds_0-1-2: out of the device's memory; training seeds [0] and [1, 2] separately" in out
    assert "seeds_1-2: out of the device's memory; training seeds [1] and [2] separately" in out
    cell = root / "permuted_digits" / "naive"
    assert "the device ran out of memory" in (cell / ".seeds_0-1-2.attempt1" / "FAILED").read_text()
    report, _ = write_report(root, draw=False)
    assert [(r.seed, r.status) for r in report.runs] == [(0, "finished"), (1, "finished"), (2, "finished")]
