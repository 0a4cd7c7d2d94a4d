"""``cl-lightning report <folder>``: the paper's table over seeds, and its plots, from a folder of runs.

This module is the command, its arguments and what it prints; what it computes and writes (the
table, the 95 % intervals, the paired comparison, the CSVs and plots) is
:mod:`cl_lightning.analysis.tables`. That module needs numpy, scipy, matplotlib and torch, seconds
of imports on a busy machine: it is imported once the arguments are parsed, so that ``--help`` and a
refused argument answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The method every other one is compared with, seed by seed (``--baseline``).
BASELINE = "mcsgd"


def __getattr__(name: str) -> Any:
    """``write_report`` from here, where scripts and tests imported it before the tables had a module
    of their own; loaded on first use, as the command loads it."""
    if name == "write_report":
        from cl_lightning.analysis.tables import write_report

        return write_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> None:
    """``cl-lightning report``; ``argv`` are the arguments after ``report`` (default: ``sys.argv[2:]``)."""
    parser = argparse.ArgumentParser(
        prog="cl-lightning report",
        allow_abbrev=False,  # a typo must not silently set another option
        description="Turn a folder of runs into the paper's table (mean ± std and 95 % t interval over seeds), a "
        "paired comparison of each method with a baseline over the same seeds, and plots. Runs are found "
        "as <folder>/<benchmark>/<method>/seed_<n>/ (the layout `cl-lightning grid` writes) and, elsewhere, wherever an "
        "accuracy_matrix.json lies beside its run's config.yaml (fit's run folders and population members, named by "
        "that config: method, benchmark, seed, and the settings that differ between runs of one method); the grid expected is "
        "every method x benchmark x seed seen, and its missing, failed and incomplete runs are listed. Several "
        "folders make one table (e.g. the final folders of several sweeps: lightning_logs/protocol/*/final). Writes "
        "report.md, report.csv (one row per method and benchmark), report_runs.csv (one row per run), "
        "report_paired.csv (one row per method and benchmark against the baseline) and plots/*.png.",
    )
    parser.add_argument("folders", nargs="+", type=Path, metavar="folder",
                        help="folder(s) holding the runs, e.g. lightning_logs")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the report (default: the folder itself; needed with several folders)")
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                        help="draw the PNG figures (average accuracy per benchmark, task accuracy per method, "
                        "heatmap per run)")
    parser.add_argument("--baseline", default=BASELINE,
                        help="the method every other one is compared with, seed by seed (default: %(default)s)")
    args = parser.parse_args(sys.argv[2:] if argv is None else argv)
    if len(args.folders) > 1 and args.out is None:
        parser.error(f"{len(args.folders)} folders make one report: say where it goes with --out")
    from cl_lightning.analysis.tables import write_report  # numpy, scipy, matplotlib and torch: after the arguments

    report, files = write_report(args.folders, args.out, args.plots, args.baseline)
    print("Final average accuracy A_T (%) ± std [95 % interval of the mean] / forgetting F_T ± std [95 % interval]\n")
    print(report.table())
    if report.expected_lines():
        print("\nAgainst the expected values of the configs (OUTSIDE: the mean is outside the expected 95 % interval):")
        print("\n".join(report.expected_lines()))
    if report.few_seeds():
        print(f"\n{report.few_seeds()}")
    print(f"\nA_T against {report.baseline} over the same seeds (separated: the 95 % interval of the difference excludes 0)"
          f"\n\n{report.paired_table()}")
    if report.not_finished or report.ignored:
        print(f"\nRuns not in the table ({len(report.not_finished)}):\n{report.problems()}")
    print(f"\nwritten: {', '.join(str(f) for f in files[:4])} and {len(files) - 4} PNG(s)")
