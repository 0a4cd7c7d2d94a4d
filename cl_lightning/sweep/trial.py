"""One trial of a sweep: one ``cl-lightning fit`` of one setting and seed, in its run folder.

The run goes to ``<phase root>/<benchmark>/<label>/seed_<n>/``, the layout ``cl-lightning
report`` reads, with the TensorBoard logs, ``config.yaml``, checkpoints and accuracy matrix of any
``fit``. It runs in a child process (:mod:`cl_lightning.sweep.child`), whose console output goes
to ``run.log``, so a crash ends that trial only and Ray records it as failed.

The run folder, not Ray's experiment state, says what is left to do, so a sweep rerun after a
crash or a kill picks up exactly where the runs are:

- finished (all T rows of the accuracy matrix): not run again, its result is reported as is;
- interrupted with a ``checkpoints/last.ckpt``: resumed from it with ``--ckpt_path``;
- interrupted before its first checkpoint, or failed (``FAILED`` marker; the sweep retries those
  only with ``--retry_failed``): moved aside to ``.seed_<n>.attempt<k>`` (hidden from ``report``)
  and run again from the start.

While the run trains, each new row of its accuracy matrix is reported to Ray Tune (tasks done,
average accuracy so far), so the sweep's status shows progress inside trials too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_lightning.analysis.runs import FAILED_MARKER, LOG_FILE, MATRIX_FILE, wall_time_line
from cl_lightning.grid import is_finished, set_aside

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
#: Seconds between two looks at a running trial's accuracy matrix.
POLL_SECONDS = 1.0


class TrialFailedError(RuntimeError):
    """The trial's run failed; the message is the reason and the run's last error line."""


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial needs: where its run goes and the ``fit`` arguments that put it there."""

    phase_root: Path
    benchmark: str
    label: str
    seed: int
    args: list[str] = field(default_factory=list)  # after ``cl-lightning fit``, folder arguments excluded
    cwd: Path = Path(".")  # where the sweep was started: relative paths in ``args`` (data.root) are relative to it

    @property
    def name(self) -> str:
        return f"{self.benchmark}/{self.label}/seed_{self.seed}"

    @property
    def folder(self) -> Path:
        return self.phase_root / self.benchmark / self.label / f"seed_{self.seed}"

    def fit_args(self) -> list[str]:
        """``fit`` arguments with the run folder set through the TensorBoard logger, as ``cl-lightning grid`` does."""
        return [
            "fit", *self.args, "--seed_everything", str(self.seed),
            "--trainer.logger.init_args.save_dir", str(self.phase_root),
            "--trainer.logger.init_args.name", f"{self.benchmark}/{self.label}",
            "--trainer.logger.init_args.version", f"seed_{self.seed}",
            "--trainer.enable_progress_bar", "false",  # the output is a log file, not a terminal
        ]


def read_result(folder: Path) -> dict[str, Any] | None:
    """The summaries of the rows written so far (``accuracy_matrix.json``), or None before the first."""
    try:
        record = json.loads((folder / MATRIX_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {
        "tasks_completed": int(record["tasks_completed"]), "num_tasks": int(record["num_tasks"]),
        "average_accuracy": float(record["average_accuracy"]), "forgetting": float(record["forgetting"]),
        "split": str(record["split"]),
    }


def prepare(spec: TrialSpec) -> list[str]:
    """Decide from the run folder how the run starts: the extra ``fit`` arguments (``--ckpt_path``
    to resume), after moving a failed or checkpoint-less attempt aside."""
    folder = spec.folder
    if not folder.exists():
        return []
    if not (folder / FAILED_MARKER).exists() and (folder / LAST_CHECKPOINT).exists():
        # The resumed run writes its config.yaml again (the same settings plus --ckpt_path); LightningCLI
        # refuses to overwrite one.
        (folder / "config.yaml").unlink(missing_ok=True)
        return ["--ckpt_path", str(folder / LAST_CHECKPOINT)]
    set_aside(folder)
    return []


def failure_reason(code: int, folder: Path) -> str:
    """Why a run failed: its exit code and the last error of its log (with the indented lines
    that continue it, where LightningCLI puts the reason of a bad value)."""
    lines = (folder / LOG_FILE).read_text(errors="replace").splitlines() if (folder / LOG_FILE).exists() else []
    last = next((i for i in reversed(range(len(lines))) if "Error" in lines[i] or "error:" in lines[i]), None)
    error = ""
    if last is not None:
        block = [lines[last].strip()]
        for line in lines[last + 1:last + 4]:
            if not line.startswith((" ", "\t")):
                break
            block.append(line.strip())
        error = " ".join(block)
    result = read_result(folder)
    reason = f"exit code {code}" if code else f"exit code 0 but only {result and result['tasks_completed']} task(s) done"
    return f"{reason}: {error}" if error else reason


def execute(spec: TrialSpec, report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume, or skip) the trial; ``report(metrics)`` gets each new row's summaries.
    Returns the final summaries; raises :class:`TrialFailedError` after leaving a ``FAILED`` marker."""
    folder = spec.folder
    if is_finished(folder):
        result = read_result(folder)
        if report is not None:
            report(result)
        return result
    resume = prepare(spec)
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cl_lightning.sweep.child", str(os.getpid()), *spec.fit_args(), *resume]
    reported = 0
    with open(folder / LOG_FILE, "a") as log:
        log.write(("\n--- resumed ---\n" if resume else "") + "$ cl-lightning " + " ".join(command[4:]) + "\n\n")
        log.flush()
        start = time.monotonic()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=spec.cwd)
        while True:
            code = process.poll()
            result = read_result(folder)
            if result is not None and result["tasks_completed"] > reported and report is not None:
                reported = result["tasks_completed"]
                report(result)
            if code is not None:
                break
            time.sleep(POLL_SECONDS)
        log.write(wall_time_line(time.monotonic() - start, code))
    if code == 0 and is_finished(folder):
        return read_result(folder)
    reason = failure_reason(code, folder)
    tail = (folder / LOG_FILE).read_text(errors="replace").splitlines()[-30:]
    (folder / FAILED_MARKER).write_text(f"{reason}\n\nlast lines of {LOG_FILE}:\n" + "\n".join(tail) + "\n")
    raise TrialFailedError(f"{spec.name}: {reason} (log: {folder / LOG_FILE})")


def ray_trainable(config: dict[str, str], specs: dict[str, TrialSpec]) -> None:
    """The function Ray Tune runs for a trial: ``config["trial"]`` names its spec."""
    from ray import tune

    execute(specs[config["trial"]], report=tune.report)
