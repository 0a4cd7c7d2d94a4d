"""Expected values that guard a paper-row config: what its many-seed table gave, carried by the config.

A config of the paper's table records the result it produced (``expected:`` in the YAML, the
``--expected`` option of ``fit``): the 95 % intervals of the mean final average accuracy A_T and
forgetting F_T over its seeds, with where they come from. Every run keeps it in its ``config.yaml``, and
``report`` prints each cell beside its expected values and flags a cell whose mean falls outside, so a
change that moves a paper row (a refactor, a dependency, a config edit) is seen in the next report.

Standard library only: ``report`` reads it without torch or Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The two summaries an expected result bounds, with the digits ``report`` shows.
BOUNDED = {"average_accuracy": ("A_T", 2), "forgetting": ("F_T", 3)}


@dataclass(frozen=True)
class ExpectedResult:
    """A config's result over many seeds, which later runs of it are checked against.

    Args:
        average_accuracy: 95 % interval ``[low, high]`` of the mean final average accuracy A_T (%).
        forgetting: 95 % interval ``[low, high]`` of the mean final forgetting F_T.
        seeds: How many seeds the intervals were measured over.
        source: Where the values come from: the command, commit and data of the table.
    """

    average_accuracy: tuple[float, float]
    forgetting: tuple[float, float]
    seeds: int = 10
    source: str = ""

    @classmethod
    def of(cls, config: dict[str, Any] | None) -> ExpectedResult | None:
        """The ``expected`` entry of a run's config (as its ``config.yaml`` holds it), or None."""
        entry = (config or {}).get("expected")
        if not isinstance(entry, dict):
            return None
        try:
            return cls(tuple(map(float, entry["average_accuracy"])), tuple(map(float, entry["forgetting"])),
                       int(entry.get("seeds", 10)), str(entry.get("source", "")))
        except (KeyError, TypeError, ValueError):
            return None

    def outside(self, means: dict[str, float]) -> list[str]:
        """The metrics (``A_T``, ``F_T``) whose mean in ``means`` lies outside its expected interval."""
        return [label for metric, (label, _) in BOUNDED.items()
                if not getattr(self, metric)[0] <= means[metric] <= getattr(self, metric)[1]]

    def text(self) -> str:
        """``A_T [low, high] / F_T [low, high] (n seeds)``."""
        parts = [f"{label} [{getattr(self, metric)[0]:.{digits}f}, {getattr(self, metric)[1]:.{digits}f}]"
                 for metric, (label, digits) in BOUNDED.items()]
        return " / ".join(parts) + f" ({self.seeds} seeds)"
