"""Fault injection: a real ``cl-lightning fit`` killed (SIGKILL) or stopped (SIGTERM) at each
point of a task, then resumed with the README's command, ends exactly as the uninterrupted run.

Each case runs MC-SGD on three permuted-digits tasks in a child process with
:class:`injector.FaultInjector`, checks what the user saw (exit status, last line) and what
survived (checkpoints that load, the accuracy matrix so far), resumes with
``fit --config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt`` and compares the
final accuracy-matrix files and weights with the uninterrupted run's, bitwise. Every case adds
a row to the fault table (``CL_FAULT_TABLE=<file> pytest tests/cli/faults`` writes it; it is the
table of docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import processes
import pytest
import torch

CONFIG = Path(__file__).parents[3] / "configs" / "mcsgd" / "permuted_digits.yaml"
POINTS = ("mid_task", "last_step", "consolidation", "evaluation", "checkpoint_write")
EXIT_STATUS = {"SIGKILL": -signal.SIGKILL, "SIGTERM": 128 + signal.SIGTERM}
pytestmark = pytest.mark.slow  # each case kills a real `cl-lightning` process


SETTINGS = ("--data.num_tasks", "3", "--trainer.deterministic", "true", "--trainer.enable_model_summary", "false",
            "--accuracy_matrix.print_table", "false")


def cl_lightning(*args: str) -> subprocess.CompletedProcess:
    """``cl-lightning <args>`` in a child process (warm: ``tests/processes.py``) that can import the injector."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return processes.run(args, env=env)


def fit(out: Path, *extra: str, config: Path = CONFIG) -> subprocess.CompletedProcess:
    """``cl-lightning fit`` of three deterministic permuted-digits tasks (or a run's saved ``config``)."""
    settings = (*SETTINGS, "--trainer.logger.init_args.save_dir", str(out)) if config == CONFIG else ()
    return cl_lightning("fit", "--config", str(config), *settings, *extra)


def inject(point: str, signal_name: str, *extra: str) -> tuple[str, ...]:
    """The overrides that add the injector, firing at ``point`` of the second task."""
    return ("--trainer.callbacks+=injector.FaultInjector", "--trainer.callbacks.point", point,
            "--trainer.callbacks.task", "1", "--trainer.callbacks.signal", signal_name, *extra)


def run_folder(out: Path, version: int) -> Path:
    return out / "lightning_logs" / f"version_{version}"


def matrix_files(run: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(run.glob("*accuracy_matrix.*"))}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The model's weights and MC-SGD's w_bar and w_hat in the run's ``last.ckpt``."""
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    mcsgd = checkpoint["callbacks"]["MCSGD"]
    return {**checkpoint["state_dict"], "w_bar": mcsgd["w_bar"], "w_hat": mcsgd["w_hat"]}


def same_result(run: Path, reference: Path) -> bool:
    """Same accuracy-matrix files (every digit) and bitwise-equal final weights, w_bar and w_hat."""
    expected, got = final_weights(reference), final_weights(run)
    return (matrix_files(run) == matrix_files(reference) and expected.keys() == got.keys()
            and all(torch.equal(got[k], v) for k, v in expected.items()))


def last_line(process: subprocess.CompletedProcess) -> str:
    lines = [line for line in (process.stdout + process.stderr).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(nothing)"


def loadable(checkpoint: Path) -> bool:
    try:
        torch.load(checkpoint, weights_only=True)
        return True
    except Exception:  # noqa: BLE001 (any failure to load is what this reports)
        return False


@pytest.fixture
def straight(mcsgd_digits_run) -> Path:
    """The uninterrupted run of these settings (conftest: one in-process run that the signal and resume tests
    share; a run is the same in any process of this machine, which test_signals checks)."""
    return mcsgd_digits_run[0]


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("point", POINTS)
def test_interrupted_run_resumes_to_the_same_result(point, signal_name, straight, tmp_path, fault_table):
    faulted = fit(tmp_path, *inject(point, signal_name))
    run = run_folder(tmp_path, 0)
    assert faulted.returncode == EXIT_STATUS[signal_name], faulted.stdout + faulted.stderr

    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"))
    assert checkpoints and all(loadable(c) for c in checkpoints), "a checkpoint a resume could pick does not load"
    tasks_done = json.loads((run / "accuracy_matrix.json").read_text())["tasks_completed"]

    resumed = fit(tmp_path, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), config=run / "config.yaml")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]  # resumed in its own folder
    identical = same_result(run, straight)
    fault_table.append({
        "fault": signal_name, "where": f"{point.replace('_', ' ')}, task 2 of 3",
        "user sees": f"exit {faulted.returncode}; `{last_line(faulted)[:120]}`",
        "survives": f"{len(checkpoints)} checkpoint(s), all loadable; matrix rows for {tasks_done} task(s)",
        "resumed result identical": "yes (bitwise)" if identical else "NO",
    })
    assert identical


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_grid_child_interrupted_then_grid_rerun_gives_the_same_result(signal_name, straight, tmp_path, fault_table):
    configs = tmp_path / "configs" / "mcsgd"
    configs.mkdir(parents=True)
    (configs / "permuted_digits.yaml").write_text(CONFIG.read_text())
    grid = ("grid", "--methods", "mcsgd", "--benchmarks", "permuted_digits", "--seeds", "0", "--root",
            str(tmp_path / "runs"), "--configs", str(tmp_path / "configs"), "--", *SETTINGS,
            *inject("mid_task", signal_name, "--trainer.callbacks.once_file", str(tmp_path / "fired")))
    interrupted = cl_lightning(*grid)
    assert interrupted.returncode == 1 and (tmp_path / "fired").exists(), interrupted.stdout + interrupted.stderr
    rerun = cl_lightning(*grid)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    identical = same_result(tmp_path / "runs" / "permuted_digits" / "mcsgd" / "seed_0", straight)
    fault_table.append({
        "fault": f"{signal_name} to a `grid` child", "where": "mid task, task 2 of 3",
        "user sees": f"grid exit {interrupted.returncode}; `{last_line(interrupted)[:120]}`",
        "survives": "the other runs; the run's folder, then the rerun completes it",
        "resumed result identical": "yes (bitwise)" if identical else "NO",
    })
    assert identical


@pytest.mark.xdist_group("ray")  # one Ray at a time on this machine (see tests/sweep/test_run.py)
def test_sweep_trial_killed_then_sweep_rerun_gives_the_same_result(straight, tmp_path, fault_table, ray_address):
    grid_file = tmp_path / "one.yaml"
    grid_file.write_text("params:\n  model.lr: [0.1]\nseeds: [0]\nfinal_seeds: [0]\n")
    sweep = ("sweep", "--config", str(CONFIG), "--grid", str(grid_file), "--root", str(tmp_path / "sweeps"),
             "--max_concurrent", "1", "--address", ray_address, "--no-plots", "--", *SETTINGS,
             *inject("mid_task", "SIGKILL", "--trainer.callbacks.once_file", str(tmp_path / "fired")))
    interrupted = cl_lightning(*sweep)
    assert (tmp_path / "fired").exists(), interrupted.stdout + interrupted.stderr
    rerun = cl_lightning(*sweep)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    (trial,) = (tmp_path / "sweeps" / "one" / "search").glob("*/*/seed_0")
    # The same trial uninterrupted: its own config (validation split and all; not its --ckpt_path), in
    # another folder.
    reference = cl_lightning("fit", "--config", str(trial / "config.yaml"), "--ckpt_path", "null",
                             "--trainer.logger.init_args.save_dir", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stdout + reference.stderr
    (uninterrupted,) = (tmp_path / "reference").glob("**/accuracy_matrix.json")
    identical = same_result(trial, uninterrupted.parent)
    fault_table.append({
        "fault": "SIGKILL to a `sweep` trial", "where": "mid task, task 2 of 3",
        "user sees": f"sweep exit {interrupted.returncode}; `{last_line(interrupted)[:120]}`",
        "survives": "the trial's folder and checkpoints; the rerun of the same command completes it",
        "resumed result identical": "yes (bitwise)" if identical else "NO",
    })
    assert identical


def tree(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with its digest, and every folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def test_a_second_run_in_the_same_folder_leaves_the_first_intact(straight, tmp_path, fault_table):
    shutil.copytree(straight.parent.parent, tmp_path / "out")
    first = run_folder(tmp_path / "out", 0)
    before = tree(first)
    again = fit(tmp_path / "out")  # the same command again
    assert again.returncode == 0, again.stdout + again.stderr
    named = fit(tmp_path / "out", "--trainer.logger.init_args.version", "version_0")  # a new run naming the first's folder
    intact = tree(first) == before
    fault_table.append({
        "fault": "a second run in the same folder", "where": "after a finished run: the same command, then one naming its folder",
        "user sees": f"exit {again.returncode}, a new version_1; then exit {named.returncode}; `{last_line(named)[:120]}`",
        "survives": "the first run's folder, byte-identical" if intact else "NOT the first run's files",
        "resumed result identical": "yes (the second run's matrix equals the first's)"
        if matrix_files(run_folder(tmp_path / "out", 1)) == matrix_files(first) else "NO",
    })
    assert named.returncode == 1 and "already holds a run" in last_line(named)
    assert intact and same_result(run_folder(tmp_path / "out", 1), straight)


def test_a_refused_run_in_a_folder_with_results_changes_nothing(straight, tmp_path, fault_table):
    shutil.copytree(straight.parent.parent, tmp_path / "out")
    before = tree(tmp_path / "out")
    refused = fit(tmp_path / "out", "--seeds", "[0,1]", "--trainer.callbacks.init_args.alpha0", "[0.1,0.2,0.3]")
    intact = tree(tmp_path / "out") == before
    fault_table.append({
        "fault": "a refused run in a folder with results", "where": "before training: a per-member list of the wrong length",
        "user sees": f"exit {refused.returncode}; `{last_line(refused)[:120]}`",
        "survives": "the folder, byte-identical, nothing created" if intact else "NOT the folder as it was",
        "resumed result identical": "(nothing ran)",
    })
    assert refused.returncode == 1 and "alpha0 has 3 values" in last_line(refused)
    assert intact
