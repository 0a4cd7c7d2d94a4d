"""The sweep's live status: one line per trial event with the counts done / running / failed / pending.

A Ray Tune callback (it runs in the sweep's own process), rather than Ray's table reporter,
because Ray's console output changed across 2.x releases and a hundred-trial table reprinted
every few seconds drowns the events that matter: which trial finished with what score, and
which failed and why (the first line of its ``FAILED`` marker).
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from cl_lightning.rundir import FAILED_MARKER
from cl_lightning.sweep.trial import Job


class StatusLine(Callback):
    """Prints ``[phase] d/n done, r running, f failed, p pending | <event>`` on each trial start and end."""

    def __init__(self, phase: str, specs: dict[str, Job], finished_before: int, failed_before: list[str],
                 total: int) -> None:
        self.phase, self.specs, self.total = phase, specs, total
        self.done, self.running, self.failed = finished_before, set(), list(failed_before)

    def _line(self, event: str) -> None:
        pending = self.total - self.done - len(self.running) - len(self.failed)
        print(f"[{self.phase}] {self.done}/{self.total} done, {len(self.running)} running, {len(self.failed)} failed, "
              f"{pending} pending | {event}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = trial.config["trial"]
        self.running.add(name)
        self._line(f"{name} started")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = trial.config["trial"]
        self.running.discard(name)
        self.done += 1
        result = self.specs[name].result() or {}
        score = (f": average accuracy ({result['split']}) {result['average_accuracy']:.2f} %, forgetting "
                 f"{result['forgetting']:.3f}" if result else "")
        self._line(f"{name} finished{score}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = trial.config["trial"]
        self.running.discard(name)
        self.failed.append(name)
        marker = self.specs[name].folder / FAILED_MARKER
        reason = marker.read_text().splitlines()[0] if marker.exists() else str(trial.get_error()).strip().splitlines()[-1]
        self._line(f"{name} FAILED: {reason}")
