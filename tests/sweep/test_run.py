"""``cl-lightning sweep`` on a real local Ray (2 CPUs, shared by the tests) with real tiny runs.

Each trial is a ``cl-lightning fit`` process (seconds of imports on a busy 2-core machine), so the
grids are as small as the properties allow.
"""

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fakedata import write_mnist
from processes import command_lines

from cl_lightning.analysis.report import write_report
from cl_lightning.cli.lightning_cli import cli_main
from cl_lightning.rundir import is_finished
from cl_lightning.sweep.run import main

ray = pytest.importorskip("ray")
# One local Ray (conftest's `ray_address`) for these tests and the fault table's sweep; the unreachable-cluster
# check, which needs none running, joins their group, so pytest -n 2 runs them one after another, that check first.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

CONFIGS = Path(__file__).parents[2] / "configs"
TINY = ["--", "--data.num_tasks", "2", "--data.train_examples_per_task", "200", "--trainer.enable_model_summary", "false"]


def wait_for(condition, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def live_runs(root: Path) -> dict[int, str]:
    """Process ids and command lines of the processes still training a run below ``root``."""
    return {pid: text for pid, text in command_lines().items() if "cl_lightning.sweep.child" in text and str(root) in text}


def pause_run(root: Path, name: str) -> bool:
    """SIGSTOP the fit process training the run ``name`` below ``root``, so that it stays mid-way
    however fast the machine is (a stopped process still obeys the SIGKILL it gets with its trial)."""
    pids = [pid for pid, text in live_runs(root).items() if f" {name} " in text]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return bool(pids)


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, ray_address):
    """4 trials (2 search settings, then the best one on 2 final seeds), 2 at a time: the sweep
    process is killed when its 2-task trial has finished and its 16-task one is mid-way (paused
    there); the same command completes the sweep, runs the finished trial no more, resumes the
    other from its last checkpoint, and writes 4 run folders that ``report`` reads."""
    grid = tmp_path / "demo.yaml"
    grid.write_text("params:\n  data.num_tasks: [2, 16]\nseeds: [0]\nfinal_seeds: [0, 1]\n")
    root = tmp_path / "sweeps"
    argv = ["--config", str(CONFIGS / "naive" / "permuted_digits.yaml"), "--grid", str(grid), "--root", str(root),
            "--max_concurrent", "2", "--address", ray_address, "--no-plots", *TINY]
    search = root / "demo" / "search" / "permuted_digits"
    final = root / "demo" / "final" / "permuted_digits" / "naive"
    short, long = search / "naive[num_tasks=2]" / "seed_0", search / "naive[num_tasks=16]" / "seed_0"
    folders = [short, long, final / "seed_0", final / "seed_1"]

    with open(tmp_path / "sweep.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "cl_lightning", "sweep", *argv], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        paused = False

        def ready() -> bool:
            nonlocal paused
            if not paused and (long / "checkpoints" / "last.ckpt").exists():
                paused = pause_run(root, "permuted_digits/naive[num_tasks=16]")
            return paused and is_finished(short)

        wait_for(ready, 240, "the 2-task trial to finish and the 16-task one to checkpoint a task", poll=0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done = {f: (f / "accuracy_matrix.json").stat().st_mtime_ns for f in folders if is_finished(f)}
    assert short in done and long not in done, "the kill must come mid-way"
    # the killed trials' training processes die with them, rather than training on as orphans
    wait_for(lambda: not live_runs(root), 60, "the killed trials' fit processes to exit")

    main(argv)  # the same command again, in this process

    for folder in folders:
        assert is_finished(folder)
    for folder, mtime in done.items():
        assert (folder / "accuracy_matrix.json").stat().st_mtime_ns == mtime
        assert (folder / "run.log").read_text().count("$ cl-lightning fit") == 1  # never started again
    log = (long / "run.log").read_text()
    assert "--- resumed ---" in log and f"--ckpt_path {long / 'checkpoints' / 'last.ckpt'}" in log
    report, _ = write_report(root / "demo" / "search", draw=False)
    assert sorted((r.method, r.status) for r in report.runs) == [("naive[num_tasks=16]", "finished"), ("naive[num_tasks=2]", "finished")]
    final_report, _ = write_report(root / "demo" / "final", draw=False)
    assert [(r.name, r.status) for r in final_report.runs] == [("permuted_digits/naive/seed_0", "finished"),
                                                                ("permuted_digits/naive/seed_1", "finished")]
    assert '"split": "test"' in (final / "seed_1" / "accuracy_matrix.json").read_text()  # best.yaml: the whole training set
    best = (root / "demo" / "best.yaml").read_text()
    assert "val_fraction: 0.0" in best and "selected" in (root / "demo" / "selection.md").read_text()


def shifted_mnist(root: Path) -> Path:
    """Fake MNIST whose TEST labels are shifted by one class: a model that learnt the task scores
    about 0 % on the test split and an untrained one about 10 %, so validation and test disagree on
    which setting is best, by construction."""
    raw = write_mnist(root, "MNIST", n_train=600, n_test=200, seed=0)
    labels = raw / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[8:] = ((np.frombuffer(bytes(data[8:]), dtype=np.uint8) + 1) % 10).astype(np.uint8).tobytes()
    labels.write_bytes(bytes(data))
    return root


def test_selection_uses_validation_not_test_and_bad_values_fail_alone(tmp_path, ray_address, capsys):
    data = shifted_mnist(tmp_path / "data")
    config = tmp_path / "configs" / "naive" / "shifted_mnist.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(
        "model:\n  net:\n    class_path: cl_lightning.models.nets.MLP\n"
        "    init_args: {input_size: 784, hidden_sizes: [64], num_classes: 10, dropout: 0.0}\n  lr: 0.1\n"
        f"data: {{source: mnist, root: {data}, benchmark: permuted, num_tasks: 2, batch_size: 16}}\n"
        "trainer: {enable_model_summary: false}\n")
    grid = tmp_path / "lr.yaml"
    grid.write_text("params:\n  model.lr: [0.00001, -1.0, 0.1, 1.0e+30]\nseeds: [0]\nval_fraction: 0.2\n")
    root = tmp_path / "sweeps"
    # half a CPU each: all 4 at once (two of them fail early)
    main(["--config", str(config), "--grid", str(grid), "--root", str(root), "--cpus_per_trial", "0.5", "--search_only"])

    search = root / "lr" / "search" / "shifted_mnist"
    runs = {label: search / f"naive[lr={label}]" / "seed_0" for label in ("1e-05", "-1.0", "0.1", "1e+30")}
    # lr is per member: the four settings were packed into one population, split until the refused value failed alone
    assert sorted(p.name for p in search.iterdir()) == sorted([*(f"naive[lr={label}]" for label in runs), "populations"])
    # the invalid value and the diverging one failed alone, with their messages
    failed = (runs["-1.0"] / "FAILED").read_text().splitlines()[0]
    assert "model.lr" in failed and "PositiveFloat" in failed
    assert "error: the training loss is not finite (nan)" in (runs["1e+30"] / "FAILED").read_text().splitlines()[0]
    assert is_finished(runs["1e-05"]) and is_finished(runs["0.1"])

    def validation(label: str) -> float:
        record = json.loads((runs[label] / "accuracy_matrix.json").read_text())
        assert record["split"] == "val"
        return record["average_accuracy"]

    def test_accuracy(label: str) -> float:
        # a packed run's checkpoint is its population's (population.json says where); its config names its place in it
        packed = runs[label] / "population.json"
        checkpoints = Path(json.loads(packed.read_text())["checkpoints"]) if packed.exists() else runs[label] / "checkpoints"
        cli_main(["test", "--config", str(runs[label] / "config.yaml"), "--ckpt_path", str(checkpoints / "last.ckpt"),
                  "--trainer.logger.init_args.save_dir", str(tmp_path / "test"), "--trainer.logger.init_args.name", "",
                  "--trainer.logger.init_args.version", label])
        record = (tmp_path / "test" / label / "test_accuracy.json").read_text()
        return json.loads(record)["average_accuracy"]

    # validation prefers lr 0.1, the test split prefers 1e-05: the sweep chose by validation
    assert validation("0.1") > validation("1e-05") + 30
    assert test_accuracy("1e-05") > test_accuracy("0.1")
    selection = (root / "lr" / "selection.md").read_text()
    assert "| lr=0.1 | 1/1 |" in selection and "**selected**" in selection.split("| lr=0.1 |")[1].splitlines()[0]
    assert "| lr=-1.0 | 0/1 | — | seed 0 failed: exit code 2: error: Parser key \"model.lr\"" in selection
    assert "lr: 0.1" in (root / "lr" / "best.yaml").read_text() and "val_fraction: 0.0" in (root / "lr" / "best.yaml").read_text()
    assert not (root / "lr" / "final").exists()  # --search_only

    # rerun: nothing left to do; the failure is a result of the search, kept unless asked to retry
    rerun = ["--config", str(config), "--grid", str(grid), "--root", str(root), "--search_only"]
    capsys.readouterr()
    main(rerun)
    assert "[search] 4 run(s): 2 finished and 2 failed already (--retry_failed runs them again)" in capsys.readouterr().out
    main([*rerun, "--dry_run", "--retry_failed"])
    out = capsys.readouterr().out
    assert "naive[lr=0.1]/seed_0: finished already" in out and "populations/naive[lr=-1.0]+1_" in out  # the two failed, packed


def test_ctrl_c_ends_the_sweep_with_one_line_naming_the_rerun(tmp_path, ray_address):
    """Ctrl-C (SIGINT to the sweep process; the trials' fits run in sessions of their own) while a
    trial trains: status 130, the last line names the rerun, no traceback, no FAILED marker
    announced or written, and the trial's fit does not train on as an orphan."""
    grid = tmp_path / "one.yaml"
    grid.write_text("params:\n  data.num_tasks: [16]\nseeds: [0]\nfinal_seeds: [0]\n")
    root = tmp_path / "sweeps"
    argv = ["--config", str(CONFIGS / "naive" / "permuted_digits.yaml"), "--grid", str(grid), "--root", str(root),
            "--address", ray_address, "--no-plots", *TINY]
    run = root / "one" / "search" / "permuted_digits" / "naive[num_tasks=16]" / "seed_0"
    with open(tmp_path / "sweep.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "cl_lightning", "sweep", *argv], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: (run / "checkpoints" / "last.ckpt").exists() or process.poll() is not None, 240,
                 "the trial to checkpoint a task", poll=0.02)
        assert pause_run(root, "permuted_digits/naive[num_tasks=16]"), "the trial ended before its first task's checkpoint"
        os.kill(process.pid, signal.SIGINT)  # Ctrl-C
        assert process.wait(timeout=120) == 130
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone when the sweep ended as it should
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    output = (tmp_path / "sweep.log").read_text()
    assert "Traceback" not in output and "FAILED" not in output
    assert output.splitlines()[-1] == ("interrupted (Ctrl-C); finished runs are kept and the interrupted ones resume from "
                                       f"their last checkpoint when you rerun: cl-lightning sweep {shlex.join(argv)}")
    assert not (run / "FAILED").exists() and not is_finished(run)
    wait_for(lambda: not live_runs(root), 60, "the interrupted trial's fit process to exit")
