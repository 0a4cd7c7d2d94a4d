"""One fit of ``grid`` or ``sweep``, run by the same steps for both: the run folder, not the
launcher's memory, says what is left to do, so a rerun picks up exactly where the runs are.

- A finished run is not launched again (the callers skip it).
- An interrupted one resumes from its ``checkpoints/last.ckpt`` (``--ckpt_path``).
- A failed one, or one stopped before its first checkpoint, is set aside to ``.<name>.attempt<k>``
  (hidden from ``report``) and starts again; so are the earlier attempts of a fresh population's members.
- After the fit, each member of a population that did not finish gets a ``FAILED`` marker of its own,
  as its plain run would have, unless the population is to be run again in halves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cl_lightning.launch.process import FIT_ENTRY, Outcome, launch
from cl_lightning.rundir import (
    LAST_CHECKPOINT,
    has_failed,
    mark_unfinished_members,
    ran_out_of_memory,
    set_aside,
    set_aside_existing,
)


def prepare(folder: Path) -> list[str]:
    """Decide from the run folder how a launched fit starts: the extra ``fit`` arguments
    (``--ckpt_path .../last.ckpt`` to resume an interrupted run), after moving a failed or
    checkpoint-less attempt aside (it starts again). Call it on a folder that is not finished."""
    if not folder.exists():
        return []
    if not has_failed(folder) and (folder / LAST_CHECKPOINT).exists():
        return ["--ckpt_path", str(folder / LAST_CHECKPOINT)]
    set_aside(folder)
    return []


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended: how its fit process ended and, for a population, what that leaves to do."""

    fit: Outcome
    #: The population's members that did not finish, each now with its ``FAILED`` marker.
    unfinished: list[Path] = field(default_factory=list)
    #: The population is to be run again as two of half its members (it ran out of the device's
    #: memory, or ``halve_if`` said so): its members are not marked, the caller sets its attempt aside.
    halve: bool = False


def run_job(folder: Path, fit_args: Sequence[str], members: Sequence[Path] = (), *, entry: Sequence[str] = FIT_ENTRY,
            cwd: Path | None = None, on_start: Callable[[Path | None], None] | None = None,
            on_poll: Callable[[], None] | None = None,
            halve_if: Callable[[Outcome], bool] | None = None) -> JobOutcome:
    """Launch ``<entry> <fit_args>`` into the run folder ``folder``, resumed or afresh (:func:`prepare`),
    with the launcher's signals passed on (:func:`~cl_lightning.launch.process.launch`).

    ``members`` are the folders of a population's members (fewer than two: a plain run);
    ``on_start`` gets the checkpoint the fit resumes from (None: afresh) just before it starts;
    ``on_poll`` is called about every second while it runs. Call it on a folder that is not finished."""
    population = len(members) > 1
    resume = prepare(folder)
    if population and not resume:  # a fresh population: earlier attempts of its members are set aside
        set_aside_existing(members)
    if on_start is not None:
        on_start(Path(resume[-1]) if resume else None)
    outcome = launch(folder, fit_args, resume, entry=entry, cwd=cwd, on_poll=on_poll)
    if not population or outcome.stopped:
        return JobOutcome(outcome)
    if ran_out_of_memory(folder) or (halve_if is not None and halve_if(outcome)):
        return JobOutcome(outcome, halve=True)
    return JobOutcome(outcome, unfinished=mark_unfinished_members(folder, members))
