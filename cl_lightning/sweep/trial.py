"""One trial of a sweep: one ``cl-lightning fit`` of one setting and seed, in its run folder.

The run goes to ``<phase root>/<benchmark>/<label>/seed_<n>/``, the layout ``cl-lightning
report`` reads, with the TensorBoard logs, ``config.yaml``, checkpoints and accuracy matrix of any
``fit``. It runs in a child process (:mod:`cl_lightning.sweep.child`), whose console output goes
to ``run.log``, so a crash ends that trial only and Ray records it as failed.

The run folder, not Ray's experiment state, says what is left to do, so a sweep rerun after a
crash or a kill picks up exactly where the runs are (:func:`cl_lightning.rundir.prepare`, as
``cl-lightning grid`` does):

- finished (all T rows of the accuracy matrix): not run again, its result is reported as is;
- interrupted with a ``checkpoints/last.ckpt``: resumed from it with ``--ckpt_path``;
- interrupted before its first checkpoint, or failed (``FAILED`` marker; the sweep retries those
  only with ``--retry_failed``): moved aside to ``.seed_<n>.attempt<k>`` (hidden from ``report``)
  and run again from the start.

While the run trains, each new row of its accuracy matrix is reported to Ray Tune (tasks done,
average accuracy so far), so the sweep's status shows progress inside trials too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_lightning.rundir import LOG_FILE, is_finished, launch, placement, prepare, read_result, run_folder


class TrialFailedError(RuntimeError):
    """The trial's run failed (or was stopped); the message is the reason and the run's last error line."""


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
        return run_folder(self.phase_root, self.benchmark, self.label, self.seed)

    def fit_args(self) -> list[str]:
        """``fit`` arguments with the run folder set (the folder's settings win over ``args``)."""
        return [
            "fit", *self.args, *placement(self.phase_root, self.benchmark, self.label, self.seed),
            "--trainer.enable_progress_bar", "false",  # the output is a log file, not a terminal
        ]


def execute(spec: TrialSpec, report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume, or skip) the trial; ``report(metrics)`` gets each new row's summaries.
    Returns the final summaries; raises :class:`TrialFailedError` when the run did not finish
    (after leaving a ``FAILED`` marker, unless it was stopped by a signal)."""
    folder = spec.folder
    if is_finished(folder):
        result = read_result(folder)
        if report is not None:
            report(result)
        return result
    reported = 0

    def report_new_rows() -> None:
        nonlocal reported
        result = read_result(folder)
        if result is not None and result["tasks_completed"] > reported and report is not None:
            reported = result["tasks_completed"]
            report(result)

    entry = (sys.executable, "-m", "cl_lightning.sweep.child", str(os.getpid()))
    outcome = launch(folder, spec.fit_args(), prepare(folder), entry=entry, cwd=spec.cwd, on_poll=report_new_rows)
    if outcome.failure is not None or outcome.stopped:
        reason = outcome.failure or f"stopped by a signal (exit code {outcome.code}); a rerun resumes it"
        raise TrialFailedError(f"{spec.name}: {reason} (log: {folder / LOG_FILE})")
    report_new_rows()
    return read_result(folder)


def ray_trainable(config: dict[str, str], specs: dict[str, TrialSpec]) -> None:
    """The function Ray Tune runs for a trial: ``config["trial"]`` names its spec."""
    from ray import tune

    execute(specs[config["trial"]], report=tune.report)
