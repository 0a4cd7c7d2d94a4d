"""Selection: the setting with the best final average accuracy on the held-out validation split.

The score of a setting is the mean over its search seeds of A_T, the final average accuracy of
its runs' accuracy matrices, which the search runs measured on ``data.val_fraction`` of the
training data (``"split": "val"`` in ``accuracy_matrix.json``). A matrix measured on any other
split is refused, so the test set can never choose a setting. A setting with a failed or
unfinished seed is not eligible: its mean would be over other seeds than the rest.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from cl_lightning.errors import UserError
from cl_lightning.rundir import FAILED_MARKER, read_result
from cl_lightning.sweep.grid_file import Setting
from cl_lightning.sweep.trial import TrialSpec

OBJECTIVE_SPLIT = "val"


class SelectionError(UserError, RuntimeError):
    """No setting can be selected (every one failed), or a search run was not scored on validation data."""


@dataclass
class SettingScore:
    """The search runs of one setting and their validation scores."""

    setting: Setting
    label: str
    specs: list[TrialSpec]
    scores: list[float] = field(default_factory=list)  # final validation A_T of each finished seed
    problems: list[str] = field(default_factory=list)

    @property
    def eligible(self) -> bool:
        return len(self.scores) == len(self.specs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    def text(self) -> str:
        if not self.scores:
            return "—"
        std = f" ± {statistics.stdev(self.scores):.2f}" if len(self.scores) > 1 else ""
        return f"{self.mean:.2f}{std}"


def score(setting: Setting, label: str, specs: list[TrialSpec]) -> SettingScore:
    """Read the validation scores of a setting's search runs from their folders."""
    result = SettingScore(setting, label, specs)
    for spec in specs:
        record = read_result(spec.folder)
        marker = spec.folder / FAILED_MARKER
        if marker.exists():
            result.problems.append(f"seed {spec.seed} failed: {(marker.read_text().splitlines() or [''])[0]}")
            continue
        if record is None or record["tasks_completed"] < record["num_tasks"]:
            result.problems.append(f"seed {spec.seed} not finished (see {spec.folder})")
            continue
        if record["split"] != OBJECTIVE_SPLIT:
            raise SelectionError(f"{spec.folder}: its accuracy matrix was measured on the {record['split']} split; a sweep "
                                 f"selects on the {OBJECTIVE_SPLIT} split only (data.val_fraction > 0). Remove the folder "
                                 "and rerun the sweep.")
        result.scores.append(record["average_accuracy"])
    return result


def best(scores: list[SettingScore]) -> SettingScore:
    """The eligible setting of highest mean validation score (the first in grid order on a tie)."""
    eligible = [s for s in scores if s.eligible]
    if not eligible:
        raise SelectionError("no setting finished all its search seeds, so none can be selected: run the same "
                             "command again to resume interrupted trials; a trial that failed says why in its "
                             "run.log (and FAILED file; --retry_failed runs failed trials again)")
    return max(eligible, key=lambda s: s.mean)


def table(scores: list[SettingScore], chosen: SettingScore | None) -> str:
    """Markdown table of every setting: validation A_T over seeds, and what kept a setting out."""
    lines = ["| setting | seeds finished | val average accuracy (%) | |", "|---|---|---|---|"]
    for s in scores:
        note = "**selected**" if s is chosen else "; ".join(s.problems)
        lines.append(f"| {s.label} | {len(s.scores)}/{len(s.specs)} | {s.text()} | {note} |")
    return "\n".join(lines)


def best_config(resolved_yaml: str, chosen: SettingScore, base: Path, val_fraction: float) -> str:
    """``best.yaml``: the base config resolved with the selected values, ready for ``cl-lightning fit --config``."""
    values = "\n".join(f"#   {key}: {value!r}" for key, value in chosen.setting)
    header = (
        f"# Selected by `cl-lightning sweep` from {base}: the grid setting with the best final average accuracy\n"
        f"# on a validation split ({val_fraction:g} of the training data), mean {chosen.mean:.2f} % over seeds "
        f"{[spec.seed for spec in chosen.specs]}:\n{values}\n"
        "# data.val_fraction is back to 0: this config trains on the whole training set and evaluates on the test set.\n"
    )
    return header + resolved_yaml
