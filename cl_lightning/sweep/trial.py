"""One trial of a sweep: one ``cl-lightning fit`` of one setting and its seeds, as one population.

Each seed's run goes to ``<phase root>/<benchmark>/<label>/seed_<n>/``, the layout ``cl-lightning
report`` reads, with the TensorBoard logs, ``config.yaml`` and accuracy matrix of any ``fit``
(:class:`TrialSpec`, one per seed, is what selection reads). Runs train together as one population
(:class:`PopulationSpec`, :func:`pack`): the seeds of a setting, whose checkpoints and ``run.log``
are in ``<label>/seeds_<s1>-.../``, and settings that differ only in per-member values, in
``populations/<first label>+<k>_<digest>/``; each member writes into its own run's ``seed_<n>/``. A
run packed with no other is a plain run in its ``seed_<n>/``.
A trial runs in a child process (:mod:`cl_lightning.sweep.child`), so a crash ends that trial only
and Ray records it as failed.

The run folder, not Ray's experiment state, says what is left to do, so a sweep rerun after a
crash or a kill picks up exactly where the runs are (:func:`cl_lightning.launch.jobs.run_job`, as
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

import hashlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_lightning.launch.jobs import run_job
from cl_lightning.launch.process import Outcome
from cl_lightning.rundir import (
    LOG_FILE,
    is_finished,
    placement,
    population_folder,
    population_placement,
    read_result,
    run_folder,
    set_aside_existing,
)
from cl_lightning.sweep.grid_file import Setting, cli_value, override_args

#: The folder (in place of a setting's) of the populations that hold several settings.
PACKED = "populations"


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
    setting: Setting = ()  # the grid's values, set after ``args`` (they win over them)

    @property
    def name(self) -> str:
        return f"{self.benchmark}/{self.label}/seed_{self.seed}"

    @property
    def folder(self) -> Path:
        return run_folder(self.phase_root, self.benchmark, self.label, self.seed)

    def fit_args(self) -> list[str]:
        """``fit`` arguments with the run folder set (the folder's settings win over ``args``)."""
        return [
            "fit", *self.args, *override_args(self.setting), *placement(self.phase_root, self.benchmark, self.label, self.seed),
            "--trainer.enable_progress_bar", "false",  # the output is a log file, not a terminal
        ]


    def result(self) -> dict[str, Any] | None:
        """The run's summaries so far (None before its first row)."""
        return read_result(self.folder)


@dataclass(frozen=True)
class PopulationSpec:
    """Trials run as one population in one ``fit``: the seeds of a setting, and settings that differ
    only in per-member values (a learning rate, MC-SGD's ``alpha0``, ...: :func:`pack`). Each member
    writes into its own trial's folder, which selection reads as it reads a plain trial's."""

    members: tuple[TrialSpec, ...]

    @property
    def first(self) -> TrialSpec:
        return self.members[0]

    @property
    def seeds(self) -> list[int]:
        return [member.seed for member in self.members]

    @property
    def one_setting(self) -> bool:
        """Whether the members are the seeds of one setting (else several settings, seeds may repeat)."""
        return all(member.label == self.first.label for member in self.members)

    @property
    def name(self) -> str:
        return f"{self.first.benchmark}/{self.folder.parent.name}/{self.folder.name}"

    @property
    def folder(self) -> Path:
        """The population's run folder (checkpoints, ``run.log``): ``<label>/seeds_<s1>-...`` for one
        setting; for several, ``populations/<first label>+<others>_<digest>`` (digest of the members,
        so each population has its own), outside any setting's folder."""
        first = self.first
        if self.one_setting:
            return population_folder(first.phase_root, first.benchmark, first.label, self.seeds)
        digest = hashlib.sha1("\n".join(str(member.folder) for member in self.members).encode()).hexdigest()[:8]
        return first.phase_root / first.benchmark / PACKED / f"{first.label}+{len(self.members) - 1}_{digest}"

    @property
    def cwd(self) -> Path:
        return self.first.cwd

    def fit_args(self) -> list[str]:
        """``fit`` arguments with the population's folder, seeds and members' settings set (they win
        over ``args``): a grid value the members share as one value, one they differ in as a list."""
        first = self.first
        settings = []
        for k, (key, value) in enumerate(first.setting):
            values = [member.setting[k][1] for member in self.members]
            settings += [f"--{key}", cli_value(value if all(v == value for v in values) else values)]
        if self.one_setting:
            folder = population_placement(first.phase_root, first.benchmark, first.label, self.seeds)
        else:
            folder = population_placement(first.phase_root, first.benchmark, PACKED, self.seeds, self.folder,
                                          [member.folder for member in self.members])
        return ["fit", *first.args, *settings, *folder, "--trainer.enable_progress_bar", "false"]

    def result(self) -> dict[str, Any] | None:
        """The members' summaries so far: average accuracy and forgetting are their means, the tasks
        completed their minimum (None before every member has a row). Over several settings this is
        only the trial's progress for Ray's status; selection scores each setting from its folders."""
        results = [read_result(member.folder) for member in self.members]
        if any(r is None for r in results):
            return None
        mean = {key: sum(r[key] for r in results) / len(results) for key in ("average_accuracy", "forgetting")}
        return {**results[0], **mean, "tasks_completed": min(r["tasks_completed"] for r in results)}


Job = TrialSpec | PopulationSpec


def pack(specs: list[TrialSpec], member_keys: frozenset[str] = frozenset(), size: int | None = None) -> list[Job]:
    """The trials as jobs: trials that may share one population (same arguments, and grid values
    that differ only in ``member_keys``, the per-member settings, numbers) as populations of at most
    ``size`` members, in the order of the trials; a group of one trial stays a plain run.

    Without ``member_keys`` a population holds the seeds of one setting."""
    groups: dict[tuple, list[TrialSpec]] = {}
    for spec in specs:
        shared = tuple((key, value) for key, value in spec.setting if not _per_member(key, value, member_keys))
        groups.setdefault((spec.phase_root, spec.benchmark, tuple(spec.args), spec.cwd, shared), []).append(spec)
    jobs: list[Job] = []
    for group in groups.values():
        step = size or len(group)
        for chunk in (group[i:i + step] for i in range(0, len(group), step)):
            jobs.append(chunk[0] if len(chunk) == 1 else PopulationSpec(tuple(chunk)))
    return jobs


def _per_member(key: str, value: Any, member_keys: frozenset[str]) -> bool:
    return key in member_keys and isinstance(value, (int, float)) and not isinstance(value, bool)


def execute(job: Job, report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume, or skip) the job; ``report(metrics)`` gets each new row's summaries (a
    population's: the members' means). Returns the final summaries; raises :class:`TrialFailedError`
    when the run, or a member of it, did not finish (after leaving a ``FAILED`` marker, unless it was
    stopped by a signal)."""
    folder = job.folder
    if is_finished(folder):
        result = job.result()
        if report is not None:
            report(result)
        return result
    reported = 0

    def report_new_rows() -> None:
        nonlocal reported
        result = job.result()
        if result is not None and result["tasks_completed"] > reported and report is not None:
            reported = result["tasks_completed"]
            report(result)

    members = [member.folder for member in job.members] if isinstance(job, PopulationSpec) else []
    entry = (sys.executable, "-m", "cl_lightning.sweep.child", str(os.getpid()))
    done = run_job(folder, job.fit_args(), members, entry=entry, cwd=job.cwd, on_poll=report_new_rows,
                   halve_if=lambda outcome: _failed_untrained(job, outcome))
    if done.halve:
        return _in_halves(job, report)
    outcome = done.fit
    if outcome.failure is not None or outcome.stopped or done.unfinished:
        reason = outcome.failure or (f"stopped by a signal (exit code {outcome.code}); a rerun resumes it" if outcome.stopped
                                     else f"member(s) {', '.join(f.name for f in done.unfinished)} did not finish")
        raise TrialFailedError(f"{job.name}: {reason} (log: {folder / LOG_FILE})")
    report_new_rows()
    return job.result()


def _failed_untrained(job: Job, outcome: Outcome) -> bool:
    """Whether a population of several settings failed before any member finished a task: most likely
    one setting's value is refused (a negative lr), which must fail that setting's trials alone."""
    return (isinstance(job, PopulationSpec) and not job.one_setting and outcome.failure is not None
            and all(m.result() is None for m in job.members))


def _in_halves(job: PopulationSpec, report: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """A population too large for the device, or of several settings that failed before training: its
    attempt set aside, two populations of half its members (each split again if need be) in this trial."""
    set_aside_existing([job.folder, *(member.folder for member in job.members)])
    middle = len(job.members) // 2
    failures = []
    for half in (job.members[:middle], job.members[middle:]):
        try:  # a failing half must not keep the other from running
            execute(half[0] if len(half) == 1 else PopulationSpec(half), report)
        except TrialFailedError as err:
            failures.append(str(err))
    if failures:
        raise TrialFailedError("; ".join(failures))
    return job.result()


def ray_trainable(config: dict[str, str], specs: dict[str, Job]) -> None:
    """The function Ray Tune runs for a trial: ``config["trial"]`` names its spec."""
    from ray import tune

    execute(specs[config["trial"]], report=tune.report)
