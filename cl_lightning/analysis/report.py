"""``cl-lightning report <folder>``: the paper's table over seeds, and its plots, from a folder of runs.

Rows are methods, columns benchmarks, cells the mean ± std over seeds of the final average
accuracy A_T (%) and forgetting F_T (a fraction), as in Table 1 of the paper. Only finished runs
(all T rows of the accuracy matrix) enter the table; every other run of the grid, missing,
failed or incomplete, is listed with what went wrong, so a partial grid is never mistaken for a
complete one. std is the sample standard deviation (ddof=1) over the seeds of a cell; a cell of
one seed has no ±. Each run's wall time (its ``run.log``, all attempts summed) is averaged per
cell in a second table, so a table of results also says what it cost.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cl_lightning.analysis import plots
from cl_lightning.analysis.runs import Run, benchmark_order, find_runs, method_order
from cl_lightning.metrics.continual import average_accuracy, summary

#: Summaries of the final row of each matrix (``metrics/continual.py``), as columns of ``report.csv``.
METRICS = ("average_accuracy", "forgetting", "learning_accuracy", "backward_transfer")


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); no std for a single value."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class Cell:
    """The finished runs of one (benchmark, method) and the number of seeds the grid expects."""

    benchmark: str
    method: str
    expected_seeds: int
    runs: list[Run] = field(default_factory=list)

    def final(self, metric: str) -> list[float]:
        """``metric`` after the last task of each finished run."""
        return [summary(run.matrix, run.matrix.shape[0] - 1)[metric] for run in self.runs]

    @property
    def num_tasks(self) -> list[int]:
        return sorted({run.matrix.shape[0] for run in self.runs})

    def text(self) -> str:
        """``A ± std / F ± std``, with the number of seeds when some are not finished."""
        if not self.runs:
            return "—"
        parts = []
        for metric, digits in (("average_accuracy", 2), ("forgetting", 3)):
            mean, std = mean_std(self.final(metric))
            parts.append(f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}"))
        seeds = "" if len(self.runs) == self.expected_seeds else f" ({len(self.runs)}/{self.expected_seeds} seeds)"
        return " / ".join(parts) + seeds

    @property
    def wall_time_s(self) -> float | None:
        """Mean wall time of the finished runs that logged one."""
        times = [run.wall_time_s for run in self.runs if run.wall_time_s is not None]
        return statistics.fmean(times) if times else None

    def average_accuracy_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """A_t after each task t: mean and std (NaN below two seeds) over the finished runs."""
        length = max(self.num_tasks)
        curves = np.full((len(self.runs), length), np.nan)
        for r, run in enumerate(self.runs):
            curves[r, : run.matrix.shape[0]] = [average_accuracy(run.matrix, t) for t in range(run.matrix.shape[0])]
        columns = [column[~np.isnan(column)] for column in curves.T]
        mean = np.array([column.mean() for column in columns])
        std = np.array([column.std(ddof=1) if len(column) > 1 else np.nan for column in columns])
        return mean, std

    def mean_matrix(self) -> np.ndarray:
        """The accuracy matrix averaged over the finished runs (of the most common T)."""
        length = max(self.num_tasks, key=lambda n: sum(run.matrix.shape[0] == n for run in self.runs))
        return np.mean([run.matrix.numpy() for run in self.runs if run.matrix.shape[0] == length], axis=0)


@dataclass
class Report:
    """Everything ``cl-lightning report`` writes, computed once from the runs found."""

    root: Path
    runs: list[Run]
    ignored: list[Path]
    cells: list[Cell] = field(init=False)

    def __post_init__(self) -> None:
        seeds = len({run.seed for run in self.runs})
        self.benchmarks = sorted({run.benchmark for run in self.runs}, key=benchmark_order)
        self.methods = sorted({run.method for run in self.runs}, key=method_order)
        self.cells = [Cell(b, m, seeds) for b in self.benchmarks for m in self.methods]
        by_key = {(c.benchmark, c.method): c for c in self.cells}
        for run in self.runs:
            if run.status == "finished":
                by_key[run.benchmark, run.method].runs.append(run)

    @property
    def not_finished(self) -> list[Run]:
        return [run for run in self.runs if run.status != "finished"]

    def table(self, cell_text: Callable[[Cell], str] = Cell.text) -> str:
        """The Markdown table: rows = methods, columns = benchmarks, cells ``cell_text(cell)``."""
        by_key = {(c.benchmark, c.method): c for c in self.cells}
        lines = ["| method | " + " | ".join(self.benchmarks) + " |", "|---" * (len(self.benchmarks) + 1) + "|"]
        for method in self.methods:
            lines.append(f"| {method} | " + " | ".join(cell_text(by_key[b, method]) for b in self.benchmarks) + " |")
        return "\n".join(lines)

    def wall_time_table(self) -> str:
        """Mean wall time per run of each cell, in seconds (— where no finished run logged one)."""
        return self.table(lambda cell: "—" if cell.wall_time_s is None else f"{cell.wall_time_s:.0f}")

    def problems(self) -> str:
        """The runs of the grid that are not in the table, and the folders ignored, one per line."""
        lines = [f"- {run.name} **{run.status}**: {run.problem}" for run in self.not_finished]
        lines += [f"- {folder} ignored: not a <benchmark>/<method>/seed_<n> run folder" for folder in self.ignored]
        lines += [f"- {c.benchmark}/{c.method}: finished runs of different task counts {c.num_tasks} are averaged together"
                  for c in self.cells if len(c.runs) and len(c.num_tasks) > 1]
        return "\n".join(lines)

    def markdown(self, figures: list[Path], out: Path) -> str:
        finished = len(self.runs) - len(self.not_finished)
        text = [
            f"# Continual-learning report: {self.root}",
            "",
            f"{finished} of {len(self.runs)} runs finished ({len(self.methods)} methods x {len(self.benchmarks)} "
            f"benchmarks x {len({r.seed for r in self.runs})} seeds).",
            "",
            "Cells: final average accuracy A_T (%) ± std / forgetting F_T ± std over the finished seeds "
            "(sample std, ddof=1; no ± for one seed).",
            "",
            self.table(),
            "",
            "Wall time per run (s), mean over the finished seeds: each run's whole `cl-lightning fit` command, "
            "start-up included, from its run.log (summed over the attempts of a resumed run).",
            "",
            self.wall_time_table(),
            "",
            f"## Runs not in the table ({len(self.not_finished)})",
            "",
            self.problems() or "None: the grid is complete.",
        ]
        if figures:
            # The average-accuracy figures inline; the per-method and per-run ones (dozens) as links.
            text += ["", "## Plots", ""]
            text += [f"![{f.stem}]({f.relative_to(out).as_posix()})" for f in figures if f.stem.startswith("average_accuracy")]
            text += [""] + [f"- [{f.stem}]({f.relative_to(out).as_posix()})" for f in figures
                            if not f.stem.startswith("average_accuracy")]
        return "\n".join(text) + "\n"

    def cells_csv(self) -> str:
        """One row per (benchmark, method): seeds, then mean and std of every summary."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["benchmark", "method", "seeds_finished", "seeds_expected", "num_tasks"]
                        + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")] + ["wall_time_s_mean"])
        for cell in self.cells:
            values = []
            for metric in METRICS:
                mean, std = mean_std(cell.final(metric)) if cell.runs else (None, None)
                values += ["" if mean is None else f"{mean:.6g}", "" if std is None else f"{std:.6g}"]
            wall = "" if cell.wall_time_s is None else f"{cell.wall_time_s:.1f}"
            writer.writerow([cell.benchmark, cell.method, len(cell.runs), cell.expected_seeds,
                             ",".join(map(str, cell.num_tasks))] + values + [wall])
        return out.getvalue()

    def runs_csv(self) -> str:
        """One row per run of the grid, with its state and final summaries."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["benchmark", "method", "seed", "status", "tasks_completed", "num_tasks", *METRICS, "wall_time_s",
                         "folder", "problem"])
        for run in self.runs:
            scores = summary(run.matrix, run.tasks_completed - 1) if run.tasks_completed else {}
            writer.writerow([run.benchmark, run.method, run.seed, run.status, run.tasks_completed,
                             "" if run.matrix is None else run.matrix.shape[0],
                             *(f"{scores[m]:.6g}" if scores else "" for m in METRICS),
                             "" if run.wall_time_s is None else f"{run.wall_time_s:.1f}", run.folder, run.problem])
        return out.getvalue()

    def draw(self, folder: Path) -> list[Path]:
        """Average accuracy per benchmark, mean matrix evolution per cell, heatmap per run."""
        figures = []
        for benchmark in self.benchmarks:
            cells = [c for c in self.cells if c.benchmark == benchmark and c.runs]
            if cells:
                curves = {c.method: (*c.average_accuracy_curve(), len(c.runs)) for c in cells}
                figures.append(plots.average_accuracy_curves(
                    curves, f"{benchmark}: average accuracy (mean ± std over seeds)", folder / f"average_accuracy_{benchmark}.png"))
            for cell in cells:
                figures.append(plots.task_accuracy_evolution(
                    cell.mean_matrix(), f"{benchmark} / {cell.method}: accuracy of each task (mean over {len(cell.runs)} seeds)",
                    folder / f"task_accuracy_{benchmark}_{cell.method}.png"))
        for run in self.runs:
            if run.matrix is not None:
                figures.append(plots.matrix_heatmap(
                    run.matrix.numpy(), f"{run.name} ({run.status})",
                    folder / f"heatmap_{run.benchmark}_{run.method}_seed_{run.seed}.png"))
        return figures


def write_report(root: Path, out: Path | None = None, draw: bool = True) -> tuple[Report, list[Path]]:
    """Find the runs below ``root``; write ``report.md``, ``report.csv``, ``report_runs.csv`` and the
    PNGs (under ``plots/``) into ``out`` (default: ``root``). Returns the report and the files."""
    runs, ignored = find_runs(root)
    if not runs:
        hint = (f" ({len(ignored)} folder(s) with an accuracy matrix outside that layout, e.g. {ignored[0]}: "
                "rename them or rerun with `cl-lightning grid`)" if ignored else "")
        raise FileNotFoundError(f"no run folders <benchmark>/<method>/seed_<n>/ below {Path(root).resolve()}{hint}")
    report = Report(Path(root).resolve(), runs, ignored)
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    figures = report.draw(out / "plots") if draw else []
    files = [out / "report.md", out / "report.csv", out / "report_runs.csv"]
    for path, text in zip(files, (report.markdown(figures, out), report.cells_csv(), report.runs_csv())):
        path.write_text(text)
    return report, files + figures


def main(argv: Sequence[str] | None = None) -> None:
    """``cl-lightning report``; ``argv`` are the arguments after ``report`` (default: ``sys.argv[2:]``)."""
    parser = argparse.ArgumentParser(
        prog="cl-lightning report",
        description="Turn a folder of runs into the paper's table (mean ± std over seeds) and plots. Runs are found "
        "as <folder>/<benchmark>/<method>/seed_<n>/ (the layout `cl-lightning grid` writes); the grid expected is "
        "every method x benchmark x seed seen, and its missing, failed and incomplete runs are listed. Writes "
        "report.md, report.csv (one row per method and benchmark), report_runs.csv (one row per run) and plots/*.png.",
    )
    parser.add_argument("folder", type=Path, help="folder holding the runs, e.g. lightning_logs")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: the folder itself)")
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                        help="draw the PNG figures (average accuracy per benchmark, task accuracy per method, "
                        "heatmap per run)")
    args = parser.parse_args(sys.argv[2:] if argv is None else argv)
    try:
        report, files = write_report(args.folder, args.out, args.plots)
    except (FileNotFoundError, NotADirectoryError) as err:
        sys.exit(f"error: {err}")
    print(report.table())
    if report.not_finished or report.ignored:
        print(f"\nRuns not in the table ({len(report.not_finished)}):\n{report.problems()}")
    print(f"\nwritten: {', '.join(str(f) for f in files[:3])} and {len(files) - 3} PNG(s)")
