"""What ``cl-lightning report`` computes and writes: the paper's table over seeds, the paired comparison
with a baseline, their CSVs and plots, from a folder of runs (the command itself, its arguments and
what it prints, is :mod:`cl_lightning.analysis.report`).

The runs are a grid's ``<benchmark>/<method>/seed_<n>/`` folders, or ``fit``'s run and member folders
named by their ``config.yaml`` (:mod:`cl_lightning.analysis.runs`).

Rows are methods, columns benchmarks, cells the mean ± std over seeds of the final average
accuracy A_T (%) and forgetting F_T (a fraction), as in Table 1 of the paper. Only finished runs
(all T rows of the accuracy matrix) enter the table; every other run of the grid, missing,
failed or incomplete, is listed with what went wrong, so a partial grid is never mistaken for a
complete one. std is the sample standard deviation (ddof=1) over the seeds of a cell; a cell of
one seed has no ±. Each run's wall time (its ``run.log``, all attempts summed; a population
member's share of its population's) is averaged per cell in a second table and summed over the
grid, so a table of results also says what it cost.

Why intervals: the same config and seed gave A_T from 36.1 to 54.0 on three machines on a 20-task
sequence (issue 15, section 5), so a std alone invites ranking methods that the seeds cannot rank.
Each mean has its 95 % Student-t interval (n - 1 degrees of freedom), and each method is compared
with MC-SGD seed by seed: the interval of the paired difference of A_T either excludes 0
(*separated*) or not (*not separated*: these seeds do not rank the two methods). Two seeds give an
interval of ±9 standard deviations (t = 12.7) and one none, so a cell of fewer than :data:`MIN_SEEDS`
finished seeds is named in a warning beside the table: its numbers are not a result to cite.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import t as student_t

from cl_lightning.analysis import plots
from cl_lightning.analysis.expected import BOUNDED, ExpectedResult
from cl_lightning.analysis.report import BASELINE
from cl_lightning.analysis.runs import Ignored, NoRunsError, Run, benchmark_order, find_runs, method_order
from cl_lightning.metrics.continual import average_accuracy, summary
from cl_lightning.rundir import WallTime

#: Summaries of the final row of each matrix (``metrics/continual.py``), as columns of ``report.csv``.
METRICS = ("average_accuracy", "forgetting", "learning_accuracy", "backward_transfer")


#: Two-sided confidence level of every interval in the report.
CONFIDENCE = 0.95
#: Fewer finished seeds than this in a cell draw a warning (:meth:`Report.few_seeds`).
MIN_SEEDS = 3


@dataclass(frozen=True)
class Estimate:
    """The mean of n values (seeds), their sample std (ddof=1) and the half-width of the Student-t
    interval of the mean at ``CONFIDENCE`` (n - 1 degrees of freedom); both None for one value,
    which has no spread to estimate: no interval is better than a fake one."""

    mean: float
    std: float | None
    half_width: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Estimate:
        n = len(values)
        if n < 2:
            return cls(statistics.fmean(values), None, None, n)
        std = statistics.stdev(values)
        return cls(statistics.fmean(values), std, float(student_t.ppf((1 + CONFIDENCE) / 2, n - 1)) * std / math.sqrt(n), n)

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    @property
    def interval(self) -> tuple[float, float] | None:
        return None if self.half_width is None else (self.low, self.high)

    def interval_text(self, digits: int) -> str:
        """``[low, high]``, or ``n=1`` where there is no interval."""
        return f"n={self.n}" if self.interval is None else "[{:.{d}f}, {:.{d}f}]".format(*self.interval, d=digits)

    def text(self, digits: int) -> str:
        """``mean ± std [low, high]``, or ``mean [n=1]``."""
        if self.std is None:
            return f"{self.mean:.{digits}f} [{self.interval_text(digits)}]"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} {self.interval_text(digits)}"


@dataclass
class Cell:
    """The finished runs of one (benchmark, method) and the number of seeds the grid expects."""

    benchmark: str
    method: str
    expected_seeds: int
    runs: list[Run] = field(default_factory=list)

    def final(self, metric: str) -> dict[int, float]:
        """``metric`` after the last task of each finished run, by seed."""
        return {run.seed: summary(run.matrix, run.matrix.shape[0] - 1)[metric] for run in self.runs}

    def estimate(self, metric: str) -> Estimate:
        """Mean, std and interval of the final ``metric`` over the finished seeds (at least one)."""
        return Estimate.of(list(self.final(metric).values()))

    @property
    def num_tasks(self) -> list[int]:
        return sorted({run.matrix.shape[0] for run in self.runs})

    @property
    def expected(self) -> ExpectedResult | None:
        """The expected result the cell's configs carry (the first finished run's: they share a config)."""
        return next((run.expected for run in self.runs if run.expected is not None), None)

    def expected_line(self) -> str:
        """``<benchmark>/<method>: A_T 85.31 / F_T 0.052 against expected A_T [..] / F_T [..] (10 seeds): ok``,
        or ``... OUTSIDE (A_T)``; empty without finished runs or an expected result."""
        if not self.runs or self.expected is None:
            return ""
        means = {metric: self.estimate(metric).mean for metric in BOUNDED}
        outside = self.expected.outside(means)
        got = " / ".join(f"{label} {means[metric]:.{digits}f}" for metric, (label, digits) in BOUNDED.items())
        verdict = f"OUTSIDE ({', '.join(outside)})" if outside else "ok"
        return (f"{self.benchmark}/{self.method}: {got} over {len(self.runs)} seed(s) against expected "
                f"{self.expected.text()}: {verdict}")

    def text(self) -> str:
        """``A ± std [interval] / F ± std [interval]``, with the number of seeds when some are not finished."""
        if not self.runs:
            return "—"
        parts = [self.estimate(metric).text(digits) for metric, digits in (("average_accuracy", 2), ("forgetting", 3))]
        seeds = "" if len(self.runs) == self.expected_seeds else f" ({len(self.runs)}/{self.expected_seeds} seeds)"
        return " / ".join(parts) + seeds

    @property
    def wall_time(self) -> WallTime | None:
        """Mean wall time of the finished runs that logged one; a lower bound (not complete) when an
        attempt of one of them was killed before it logged its time."""
        times = [run.wall_time for run in self.runs if run.wall_time is not None]
        if not times:
            return None
        return WallTime(statistics.fmean(t.seconds for t in times), all(t.complete for t in times))

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
class Paired:
    """A method against the baseline on one benchmark: A_T(method) - A_T(baseline) for each seed both finished.

    Pairing by seed removes what a seed's runs share across methods (the same permutations,
    rotations and class splits), where they share anything: then the interval of the mean difference
    can exclude 0 while the two cells' intervals overlap. It is the interval that says whether these
    seeds rank the two methods.
    """

    benchmark: str
    method: str
    baseline: str
    differences: dict[int, float]

    @property
    def estimate(self) -> Estimate | None:
        return Estimate.of(list(self.differences.values())) if self.differences else None

    @property
    def verdict(self) -> str:
        """``separated`` when the interval excludes 0; one pair has no interval, so it separates nothing."""
        if self.estimate is None:
            return f"no common seeds with {self.baseline}"
        interval = self.estimate.interval
        return "separated" if interval is not None and (interval[0] > 0 or interval[1] < 0) else "not separated"


def complete_text(time: WallTime | None) -> str:
    """A CSV's ``wall_time_complete``: ``true``/``false`` (a lower bound), empty without a wall time."""
    return "" if time is None else str(time.complete).lower()


def seconds_text(time: WallTime, spec: str) -> str:
    """Seconds formatted with ``spec``, after ``≥`` when they are a lower bound."""
    return ("" if time.complete else "≥") + format(time.seconds, spec)


@dataclass
class Report:
    """Everything ``cl-lightning report`` writes, computed once from the runs found."""

    roots: list[Path]
    runs: list[Run]
    ignored: list[Ignored]
    baseline: str = BASELINE
    cells: list[Cell] = field(init=False)

    def __post_init__(self) -> None:
        # a cell's seeds: its runs of any state (a grid's cell has one per seed of the grid, missing ones included)
        seeds = Counter((run.benchmark, run.method) for run in self.runs)
        self.benchmarks = sorted({run.benchmark for run in self.runs}, key=benchmark_order)
        self.methods = sorted({run.method for run in self.runs}, key=method_order)
        self.cells = [Cell(b, m, seeds[b, m]) for b in self.benchmarks for m in self.methods]
        self.cell = {(c.benchmark, c.method): c for c in self.cells}
        for run in self.runs:
            if run.status == "finished":
                self.cell[run.benchmark, run.method].runs.append(run)

    @property
    def not_finished(self) -> list[Run]:
        return [run for run in self.runs if run.status != "finished"]

    def table(self, cell_text: Callable[[Cell], str] = Cell.text) -> str:
        """The Markdown table: rows = methods, columns = benchmarks, cells ``cell_text(cell)``."""
        lines = ["| method | " + " | ".join(self.benchmarks) + " |", "|---" * (len(self.benchmarks) + 1) + "|"]
        for method in self.methods:
            lines.append(f"| {method} | " + " | ".join(cell_text(self.cell[b, method]) for b in self.benchmarks) + " |")
        return "\n".join(lines)

    def few_seeds(self) -> str:
        """One line naming the cells of 1 or 2 finished seeds, whose intervals are too wide (or absent) to
        rank methods; empty when there are none."""
        cells = [cell for cell in self.cells if 0 < len(cell.runs) < MIN_SEEDS]
        if not cells:
            return ""
        shown = ", ".join(f"{cell.benchmark}/{cell.method} ({len(cell.runs)})" for cell in cells[:6])
        more = f" and {len(cells) - 6} more" if len(cells) > 6 else ""
        return (f"Warning: {len(cells)} cell(s) have fewer than {MIN_SEEDS} finished seeds: {shown}{more}. Their 95 % "
                "intervals (2 seeds: ±9 std; 1 seed: none) cannot rank methods: train at least 3 seeds, e.g. "
                "--seeds [0,1,2].")

    def expected_lines(self) -> list[str]:
        """Each cell that carries an expected result, beside it (:meth:`Cell.expected_line`)."""
        return [line for line in (cell.expected_line() for cell in self.cells) if line]

    def wall_time_table(self) -> str:
        """Mean wall time per run of each cell, in seconds (— where no finished run logged one, ≥ where
        it is a lower bound)."""
        return self.table(lambda cell: "—" if cell.wall_time is None else seconds_text(cell.wall_time, ".0f"))

    def total_wall_time(self) -> str:
        """The sentence giving what the whole grid cost: every run's wall time (or share) summed, the
        unfinished runs' included."""
        times = [run.wall_time for run in self.runs if run.wall_time is not None]
        if not times:
            return "Whole grid: no run logged a wall time."
        total = WallTime(sum(t.seconds for t in times), all(t.complete for t in times))
        killed = sum(not t.complete for t in times)
        return (f"Whole grid: {seconds_text(total, '.0f')} s ({total.seconds / 3600:.2f} h) of process wall time over "
                f"{len(times)} runs, summed (processes that ran side by side are counted each)"
                + (f"; ≥: {killed} run(s) have an attempt that logged no wall time (killed with its launcher, or still "
                   "running), counted by its finished tasks." if killed else "."))

    def paired(self) -> tuple[list[Paired], list[str]]:
        """Every other method against ``baseline`` on each benchmark; a note for each benchmark without a
        finished baseline run, which has nothing to compare with."""
        comparisons, notes = [], []
        for benchmark in self.benchmarks:
            base = self.cell.get((benchmark, self.baseline))
            if base is None or not base.runs:
                notes.append(f"{benchmark}: no finished {self.baseline} run, no paired comparison{self.other_baselines(benchmark)}")
                continue
            reference = base.final("average_accuracy")
            for method in self.methods:
                if method != self.baseline:
                    own = self.cell[benchmark, method].final("average_accuracy")
                    common = sorted(own.keys() & reference.keys())
                    comparisons.append(Paired(benchmark, method, self.baseline, {s: own[s] - reference[s] for s in common}))
        return comparisons, notes

    def other_baselines(self, benchmark: str) -> str:
        """The hint to pass ``--baseline`` when the baseline's runs of ``benchmark`` are named by their
        settings (``mcsgd[model.lr=0.05]``): empty when there are none."""
        named = [c.method for c in self.cells if c.benchmark == benchmark and c.runs and c.method.startswith(f"{self.baseline}[")]
        return f" (pass one of {', '.join(named)} as --baseline)" if named else ""

    def paired_table(self) -> str:
        """The paired comparisons as a Markdown table, then the notes of the benchmarks left out."""
        comparisons, notes = self.paired()
        lines = []
        if comparisons:
            lines += [f"| benchmark | method | pairs | A_T − {self.baseline} (mean) | 95 % interval | verdict |", "|---" * 6 + "|"]
        for c in comparisons:
            mean, interval = ("—", "—") if c.estimate is None else (f"{c.estimate.mean:+.2f}", c.estimate.interval_text(2))
            lines.append(f"| {c.benchmark} | {c.method} | {len(c.differences)} | {mean} | {interval} | {c.verdict} |")
        return "\n".join(lines + ([""] if comparisons and notes else []) + [f"- {note}" for note in notes])

    def problems(self) -> str:
        """The runs of the grid that are not in the table, and the folders ignored, one per line."""
        lines = [f"- {run.where} **{run.status}**: {run.problem}" for run in self.not_finished]
        lines += [f"- {ignored.folder} ignored: {ignored.reason}" for ignored in self.ignored]
        lines += [f"- {c.benchmark}/{c.method}: finished runs of different task counts {c.num_tasks} are averaged together"
                  for c in self.cells if len(c.runs) and len(c.num_tasks) > 1]
        return "\n".join(lines)

    def markdown(self, figures: list[Path], out: Path) -> str:
        finished = len(self.runs) - len(self.not_finished)
        text = [
            f"# Continual-learning report: {', '.join(str(root) for root in self.roots)}",
            "",
            f"{finished} of {len(self.runs)} runs finished ({len(self.methods)} methods x {len(self.benchmarks)} "
            f"benchmarks x {len({r.seed for r in self.runs})} seeds).",
            "",
            "Cells: final average accuracy A_T (%) ± std [95 % interval of the mean] / forgetting F_T ± std "
            "[95 % interval] over the finished seeds (sample std, ddof=1; Student-t interval, n − 1 degrees of "
            "freedom; a cell of one seed has no ± and says [n=1] instead of an interval).",
            "",
            self.table(),
            *(["", self.few_seeds()] if self.few_seeds() else []),
            *(["", "Against the expected values of the configs (OUTSIDE: the mean is outside the expected 95 % "
                   "interval):", "", *[f"- {line}" for line in self.expected_lines()]] if self.expected_lines() else []),
            "",
            "Wall time per run (s), mean over the finished seeds: each run's whole `cl-lightning fit` command, "
            "start-up included, from its run.log (summed over the attempts of a resumed run); a member of a "
            "population counts its share, the population's wall time divided by its members. ≥: a lower bound, "
            "an attempt logged no wall time (killed with its launcher, or still running): its finished tasks count.",
            "",
            self.wall_time_table(),
            "",
            self.total_wall_time(),
            "",
            f"## Paired comparison with {self.baseline} (same seeds)",
            "",
            f"Difference of final average accuracy A_T (method − {self.baseline}, points) over the seeds both "
            "finished, its mean and the 95 % Student-t interval of that mean. **separated**: the interval excludes 0; "
            "**not separated**: it contains 0 (or there is a single pair), so these seeds do not rank the two methods.",
            "",
            self.paired_table(),
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
        """One row per (benchmark, method): seeds, mean and std of every summary, wall time, then the 95 %
        intervals of the means and whether the wall time is complete (appended, so that readers of the
        older columns read them unchanged)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["benchmark", "method", "seeds_finished", "seeds_expected", "num_tasks"]
                        + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")] + ["wall_time_s_mean"]
                        + [f"{m}_ci95_{s}" for m in METRICS for s in ("low", "high")] + ["wall_time_complete"])
        for cell in self.cells:
            estimates = [cell.estimate(metric) if cell.runs else None for metric in METRICS]
            moments = [number(getattr(e, a, None)) for e in estimates for a in ("mean", "std")]
            intervals = [number(getattr(e, a, None)) for e in estimates for a in ("low", "high")]
            wall = "" if cell.wall_time is None else f"{cell.wall_time.seconds:.1f}"
            writer.writerow([cell.benchmark, cell.method, len(cell.runs), cell.expected_seeds,
                             ",".join(map(str, cell.num_tasks))] + moments + [wall] + intervals
                            + [complete_text(cell.wall_time)])
        return out.getvalue()

    def paired_csv(self) -> str:
        """One row per (benchmark, method other than the baseline) of a benchmark with a finished baseline run."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["benchmark", "method", "baseline", "pairs", "seeds", "mean_difference", "std_difference",
                         "ci95_low", "ci95_high", "verdict"])
        for c in self.paired()[0]:
            writer.writerow([c.benchmark, c.method, c.baseline, len(c.differences), " ".join(map(str, c.differences)),
                             *(number(getattr(c.estimate, a, None)) for a in ("mean", "std", "low", "high")), c.verdict])
        return out.getvalue()

    def runs_csv(self) -> str:
        """One row per run of the grid, with its state and final summaries."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["benchmark", "method", "seed", "status", "tasks_completed", "num_tasks", *METRICS, "wall_time_s",
                         "folder", "problem", "wall_time_complete"])
        for run in self.runs:
            scores = summary(run.matrix, run.tasks_completed - 1) if run.tasks_completed else {}
            writer.writerow([run.benchmark, run.method, run.seed, run.status, run.tasks_completed,
                             "" if run.matrix is None else run.matrix.shape[0],
                             *(f"{scores[m]:.6g}" if scores else "" for m in METRICS),
                             "" if run.wall_time is None else f"{run.wall_time.seconds:.1f}", run.folder, run.problem,
                             complete_text(run.wall_time)])
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


def number(value: float | None) -> str:
    """A CSV field: 6 significant digits, empty for a value that does not exist."""
    return "" if value is None else f"{value:.6g}"


def write_report(roots: Path | Sequence[Path], out: Path | None = None, draw: bool = True,
                 baseline: str = BASELINE) -> tuple[Report, list[Path]]:
    """Find the runs below ``roots`` (a folder, or several making one table); write ``report.md``,
    ``report.csv``, ``report_runs.csv``, ``report_paired.csv`` (each method against ``baseline``) and the
    PNGs (under ``plots/``) into ``out`` (default: the one folder; required for several). Returns the report
    and the files."""
    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(root) for root in roots]
    if out is None and len(roots) != 1:
        raise ValueError(f"{len(roots)} folders given: say where their report goes (out)")
    runs, ignored = find_runs(roots)
    if not runs:
        hint = (f" ({len(ignored)} folder(s) with an accuracy matrix not counted, e.g. {ignored[0].folder}: "
                f"{ignored[0].reason})" if ignored else "")
        raise NoRunsError(f"no run folders <benchmark>/<method>/seed_<n>/, nor accuracy matrices beside their run's "
                          f"config.yaml, below {', '.join(str(root.resolve()) for root in roots)}{hint}")
    report = Report([root.resolve() for root in roots], runs, ignored, baseline)
    out = Path(out or roots[0])
    out.mkdir(parents=True, exist_ok=True)
    figures = report.draw(out / "plots") if draw else []
    files = [out / "report.md", out / "report.csv", out / "report_runs.csv", out / "report_paired.csv"]
    texts = (report.markdown(figures, out), report.cells_csv(), report.runs_csv(), report.paired_csv())
    for path, text in zip(files, texts):
        path.write_text(text)
    return report, files + figures
