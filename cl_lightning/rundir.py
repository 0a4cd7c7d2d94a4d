"""A run folder: where a run lives, the names and format of its files, and what they say of the run.

One owner for what ``fit`` (the accuracy matrix, MC-SGD's solutions), ``grid`` and ``sweep`` (which
launch fits into folders, :mod:`cl_lightning.launch`) and ``report`` (which reads them) must agree on:

- a fit's run folder: a new one for every new fit (Lightning's ``version_N``, or a named folder that
  holds no run: :func:`check_new_run`), the checkpoint's own for a resume; a population's members
  write inside it (``seed_<n>/``) or into folders it names (:func:`member_dirs`);
- the grid's layout ``<root>/<benchmark>/<method>/seed_<n>/``: Lightning's TensorBoardLogger with
  ``save_dir=<root>``, ``name=<benchmark>/<method>``, ``version=seed_<n>`` (:func:`placement`), so
  a run is identified without parsing its config; hidden folders (``.seed_<n>.attempt<k>``, a
  previous attempt set aside) are not runs;
- the files in it: ``config.yaml`` (LightningCLI), ``run.log`` (console output of the launched
  processes, each part starting with its command line and ending with its wall-time line), ``FAILED``
  (the reason a launched fit or a member failed), ``accuracy_matrix.json``/``.csv`` and MC-SGD's
  ``w_hat_accuracy_matrix.*``, ``checkpoints/last.ckpt`` (always the latest state) and
  ``solutions/w_hat_XX.pt``;
- the accuracy-matrix file format, written by :func:`write_matrix` and read by :func:`read_matrix`;
- the run's state read from its files: finished, failed, out of the device's memory, its wall time.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from cl_lightning.errors import OutputWriteError, ResultsWriteError, UserError
from cl_lightning.metrics.continual import summaries, summary

if TYPE_CHECKING:  # grid and sweep import this module without loading Lightning
    from lightning.pytorch import Trainer

CONFIG_FILE = "config.yaml"
#: The console output of the fit processes launched into the folder (``grid``, ``sweep``).
LOG_FILE = "run.log"
#: Written into the folder of a run whose launched fit failed: the reason, then the log's last lines.
FAILED_MARKER = "FAILED"
#: Stems of the accuracy matrices: ``<stem>.json`` (read back) and ``<stem>.csv`` (for people).
MATRIX_STEM = "accuracy_matrix"
W_HAT_MATRIX_STEM = "w_hat_accuracy_matrix"
MATRIX_FILE = f"{MATRIX_STEM}.json"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
#: A population's run folder lists its members' folders in this file.
MEMBERS_FILE = "members.json"
#: The file in a member's folder that names the population it was trained in.
POPULATION_FILE = "population.json"
#: Part of ``cl-lightning``'s message when the accelerator's memory is exhausted; ``grid`` and
#: ``sweep`` look for it (:func:`ran_out_of_memory`, :mod:`cl_lightning.launch.jobs`) to split a population.
OUT_OF_MEMORY = "the device ran out of memory"
SEED_FOLDER = re.compile(r"seed_(\d+)")
#: Ends each process's part of ``run.log`` (:func:`wall_time_line`); a resumed run has several.
WALL_TIME_LINE = re.compile(r"wall time of the whole command: ([0-9.]+) s")
#: Starts each process's part of ``run.log`` (:func:`attempt_line`).
ATTEMPT_LINE = re.compile(r"^\$ cl-lightning ", re.MULTILINE)
#: The line the fit prints after each task (``progress.TaskProgressBar``): the task's wall time.
TASK_LINE = re.compile(r"^task \d+/\d+: \d+ steps in ([0-9.]+) s", re.MULTILINE)


class MatrixFileError(UserError, ValueError):
    """An ``accuracy_matrix.json`` that cannot be read as an accuracy matrix."""


class ExistingRunError(UserError, FileExistsError):
    """A new fit would write into a folder that holds another run's results."""


# ---------------------------------------------------------------------------------- layout
def run_dir(trainer: Trainer) -> Path:
    """The run folder. ``trainer.log_dir`` is a collective under multi-process strategies (rank 0
    broadcasts it), so call this on every process, e.g. in ``setup``, never from rank 0 only."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def local_run_dir(trainer: Trainer) -> Path:
    """The run folder as :func:`run_dir` finds it, without its broadcast: for code that runs on rank 0 only."""
    return loggers_run_dir(trainer.loggers, trainer.default_root_dir)


def loggers_run_dir(loggers: Sequence[object], default_root_dir: str | Path | None) -> Path:
    """``trainer.log_dir``'s rule: the first logger's ``log_dir`` for TensorBoard and CSV loggers (the next
    ``version_N`` unless a version is named; nothing is created to find it), another logger's
    ``save_dir``, else ``default_root_dir``. Also before the Trainer exists (``preflight``)."""
    from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

    if loggers and isinstance(loggers[0], Logger):
        logger = loggers[0]
        folder = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
        if folder is not None:
            return Path(folder)
    return Path(default_root_dir or ".")


def member_dirs(folder: Path, seeds: Sequence[int], given: Sequence[str] | None = None) -> list[Path]:
    """Where each member of the population whose run folder is ``folder`` writes its results: a
    population of one writes into the run folder itself; member k of a larger population into
    ``given[k]`` when the run names its members' folders (``data.member_dirs``, as ``grid`` and
    ``sweep`` do), else into ``seed_<seeds[k]>`` inside the run folder. A new fit gets a new run
    folder (:func:`check_new_run`), so its members' folders are new too: no fit writes over another's."""
    folder = Path(folder)
    if len(seeds) == 1:
        return [folder]
    if given is not None:
        return [Path(d).resolve() for d in given]
    return [folder / f"seed_{seed}" for seed in seeds]


#: What makes a folder a run's (or a population member's): a new fit never writes into a folder holding one.
RUN_FILES = (CONFIG_FILE, MATRIX_FILE, MEMBERS_FILE, POPULATION_FILE, LAST_CHECKPOINT.parent.name)


def run_files(folder: Path) -> list[str]:
    """The files of a run that ``folder`` holds (:data:`RUN_FILES`), none for a new or empty folder."""
    return [name for name in RUN_FILES if (Path(folder) / name).exists()]


def checkpoint_run_folder(ckpt_path: str | Path) -> Path | None:
    """The run folder a checkpoint belongs to, ``<run>/checkpoints/<file>.ckpt`` beside the run's
    ``config.yaml`` (where ``fit`` writes them); None for a checkpoint anywhere else (a copy)."""
    path = Path(ckpt_path).absolute()
    folder = path.parent.parent
    return folder if path.parent.name == LAST_CHECKPOINT.parent.name and (folder / CONFIG_FILE).is_file() else None


def check_new_run(folder: Path, members: Sequence[Path], ckpt_path: str | Path | None) -> None:
    """Refuse a fit that would write into another run's files, before anything is created.

    ``folder`` is the fit's run folder and ``members`` its members' folders (:func:`member_dirs`);
    ``ckpt_path`` the checkpoint it resumes, if any: a resume from the folder's own ``checkpoints/``
    continues that run. Any other fit needs a run folder without a run's files (``version_N`` is
    always new; a folder named with ``--trainer.logger.init_args.version`` may hold one), and
    members' folders that hold none (or, on resume, hold this population's own members)."""
    folder = Path(folder).absolute()
    own = ckpt_path is not None and Path(ckpt_path).absolute().parent == folder / LAST_CHECKPOINT.parent
    found = run_files(folder)
    if found and not own:
        raise ExistingRunError(
            f"the run folder {folder} already holds a run ({', '.join(found)}): a new fit never writes into another "
            f"run's folder. Resume that run with `cl-lightning fit --config {folder / CONFIG_FILE} --ckpt_path "
            f"{folder / LAST_CHECKPOINT}`, or train into a new folder (leave --trainer.logger.init_args.version unset "
            "for the next version_N, or name another)"
        )
    if len(members) < 2:
        return
    for member in members:
        found = run_files(member)
        if found and not (own and _trained_by(member, folder)):
            raise ExistingRunError(
                f"the member folder {member} already holds a run ({', '.join(found)}): a new fit never writes into "
                "another run's folder. Give the members new folders (--member_dirs), or move that folder away"
            )


def _trained_by(member: Path, population: Path) -> bool:
    """Whether the member folder's ``population.json`` names ``population`` as the run that trains it."""
    try:
        record = json.loads((Path(member) / POPULATION_FILE).read_text())
        return Path(record["population"]).absolute() == Path(population).absolute()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def trainer_member_dirs(trainer: Trainer, folder: Path) -> list[Path]:
    """:func:`member_dirs` of the population the trainer fits (its datamodule's seeds and
    ``member_dirs``), whose run folder is ``folder`` (:func:`run_dir`, or :func:`local_run_dir` on rank 0)."""
    dm = trainer.datamodule
    return member_dirs(folder, dm.seeds, dm.member_dirs)


def run_folder(root: Path, benchmark: str, method: str, seed: int) -> Path:
    """Where the run of (benchmark, method, seed) lives below ``root``."""
    return Path(root) / benchmark / method / f"seed_{seed}"


def placement(root: Path, benchmark: str, method: str, seed: int) -> list[str]:
    """The ``fit`` overrides that put the run of (benchmark, method, seed) into :func:`run_folder`
    (plain LightningCLI options, so a job script can use them as they are)."""
    return ["--seed_everything", str(seed), *_logger_folder(root, benchmark, method, run_folder(root, benchmark, method, seed))]


def population_folder(root: Path, benchmark: str, method: str, seeds: Sequence[int]) -> Path:
    """Where the population of (benchmark, method) with ``seeds`` keeps its checkpoints and log; its
    members write into their :func:`run_folder` s beside it (:func:`member_dirs`)."""
    return Path(root) / benchmark / method / ("seeds_" + "-".join(map(str, seeds)))


def population_placement(root: Path, benchmark: str, method: str, seeds: Sequence[int], folder: Path | None = None,
                         members: Sequence[Path] | None = None) -> list[str]:
    """The ``fit`` overrides that train ``seeds`` of (benchmark, method) as one population in
    :func:`population_folder`, each member writing into its :func:`run_folder` (where ``report`` reads
    a grid's runs); or in ``folder`` (in ``<root>/<benchmark>/<method>/``) with member k writing into
    ``members[k]``."""
    folder = folder or population_folder(root, benchmark, method, seeds)
    members = members if members is not None else [run_folder(root, benchmark, method, seed) for seed in seeds]
    # JSON: a folder's name may hold commas and brackets (``mcsgd[lr=0.1,alpha0=0.25]``)
    return ["--seeds", "[" + ",".join(map(str, seeds)) + "]", *_logger_folder(root, benchmark, method, folder),
            "--member_dirs", json.dumps([str(member) for member in members])]


def _logger_folder(root: Path, benchmark: str, method: str, folder: Path) -> list[str]:
    """The TensorBoard logger overrides that make ``folder`` (in ``<root>/<benchmark>/<method>/``) the run folder."""
    return [
        "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.logger.init_args.name", f"{benchmark}/{method}",
        "--trainer.logger.init_args.version", folder.name,
    ]


def solution_path(folder: Path, kind: Literal["w_hat", "w_bar"], task: int) -> Path:
    """Where MC-SGD's ``save_solutions`` puts w_hat or w_bar of ``task`` (0-based; the file name is 1-based)."""
    return Path(folder) / "solutions" / f"{kind}_{task + 1:02d}.pt"


def is_hidden(folder: Path, root: Path) -> bool:
    """Whether ``folder`` is hidden below ``root`` (a previous attempt set aside): not a run."""
    return any(part.startswith(".") for part in folder.relative_to(root).parts)


def set_aside(folder: Path) -> Path:
    """Move a failed or checkpoint-less attempt's folder to ``.seed_<n>.attempt<k>`` next to it."""
    k = 1
    while (target := folder.with_name(f".{folder.name}.attempt{k}")).exists():
        k += 1
    folder.rename(target)
    return target


def set_aside_existing(folders: Sequence[Path]) -> None:
    """Set aside each of ``folders`` that exists: a population's attempt (its run folder) and its
    members' earlier attempts, before a population starts afresh."""
    for folder in folders:
        if folder.exists():
            set_aside(folder)


def check_writable(folder: str | Path, option: str) -> None:
    """Raise :class:`OutputWriteError` unless files can be created in ``folder`` (set by ``option``).

    Creates nothing that stays: the folder itself is only created later, by the run; here a
    temporary file is created and removed in its nearest existing ancestor (``os.access`` says
    "writable" for root on read-only mounts, so only a real write tells).
    """
    if "://" in str(folder):  # a remote logger folder (s3://, gs://, ...): nothing to check here
        return
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    fix = f"choose another folder with --{option} or make it writable."
    if not existing.is_dir():
        raise OutputWriteError(f"output folder {folder} cannot be created: {existing} is a file, not a folder; {fix}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        where = "" if existing == folder else f" (in {existing})"
        raise OutputWriteError(f"output folder {folder} is not writable{where}: {err.strerror}; {fix}") from err


# ---------------------------------------------------------------------------------- the matrix file
def write_atomically(files: dict[Path, str]) -> None:
    """Write every file to a temporary file first, then rename them all into place: a failed
    write (disk full, no permission) leaves every previous file as it was, and the set of files
    (``.csv`` and ``.json`` of one matrix) is never left half updated, except by a failed rename."""
    written: list[Path] = []
    try:
        for path, text in files.items():
            tmp = path.with_name(path.name + ".tmp")
            written.append(tmp)
            tmp.write_text(text)
        for path in files:
            os.replace(path.with_name(path.name + ".tmp"), path)
    except OSError as err:
        for tmp in written:
            tmp.unlink(missing_ok=True)
        names = ", ".join(str(p) for p in files)
        raise ResultsWriteError(
            f"could not write {names} ({err}); the previous version of the results is kept. Free disk space "
            "(or fix the folder's permissions), then resume from the run's last checkpoint: cl-lightning fit "
            "--config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt"
        ) from err


def write_matrix(folder: Path, stem: str, matrix: Tensor, task: int, split: str) -> None:
    """Write rows 1..task+1 of ``matrix`` with their summaries as ``<stem>.csv`` and ``<stem>.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = matrix[: task + 1].tolist()
    per_task = summaries(matrix, task)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["after_task"] + [f"task_{i + 1}" for i in range(matrix.shape[1])])
    for t, row in enumerate(rows):
        writer.writerow([t + 1] + ["" if math.isnan(v) else f"{v:.4f}" for v in row])
    record = {
        "split": split,
        "tasks_completed": task + 1,
        "num_tasks": matrix.shape[0],
        "matrix": [[None if math.isnan(v) else v for v in row] for row in rows],
        "per_task": per_task,
        **per_task[-1],
    }
    write_atomically({folder / f"{stem}.csv": out.getvalue(), folder / f"{stem}.json": json.dumps(record, indent=1)})


@dataclass(frozen=True)
class MatrixFile:
    """What an ``accuracy_matrix.json`` holds: the (T, T) matrix (rows not reached are NaN) and its split."""

    matrix: Tensor
    split: str

    @property
    def num_tasks(self) -> int:
        return self.matrix.shape[0]

    @property
    def tasks_completed(self) -> int:
        return int((~self.matrix.isnan()).any(dim=1).sum())

    @property
    def finished(self) -> bool:
        return self.tasks_completed == self.num_tasks

    def result(self) -> dict[str, float | int | str]:
        """Progress and the summaries after the last row written (average accuracy, forgetting, ...)."""
        scores = summary(self.matrix, self.tasks_completed - 1) if self.tasks_completed else {}
        return {"tasks_completed": self.tasks_completed, "num_tasks": self.num_tasks, "split": self.split, **scores}


def read_matrix(path: Path) -> MatrixFile:
    """The matrix written by :func:`write_matrix` at ``path`` (an ``accuracy_matrix.json``), checked."""
    fix = "rerun the run, or move its folder out of the report's folder"
    try:
        record = json.loads(Path(path).read_text())
        num_tasks, rows = int(record["num_tasks"]), record["matrix"]
        matrix = torch.full((num_tasks, num_tasks), float("nan"), dtype=torch.float64)
        if not isinstance(rows, list) or len(rows) > num_tasks:
            raise ValueError(f"'matrix' must be a list of at most num_tasks={num_tasks} rows")
        for t, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != num_tasks:
                raise ValueError(f"row {t + 1} must be a list of num_tasks={num_tasks} values")
            matrix[t] = torch.tensor([math.nan if v is None else float(v) for v in row], dtype=torch.float64)
            if math.isnan(matrix[t, t]):
                raise ValueError(f"row {t + 1} has no accuracy on task {t + 1}")
        split = str(record.get("split", "test"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise MatrixFileError(f"cannot read the accuracy matrix {path}: {err}; {fix}") from err
    return MatrixFile(matrix, split)


def read_result(folder: Path) -> dict[str, float | int | str] | None:
    """:meth:`MatrixFile.result` of the run in ``folder``, or None before its first row (or unreadable)."""
    try:
        matrix = read_matrix(Path(folder) / MATRIX_FILE)
    except MatrixFileError:
        return None
    return matrix.result() if matrix.tasks_completed else None


# ---------------------------------------------------------------------------------- run.log and FAILED
def attempt_line(fit_args: Sequence[str], resumed: bool) -> str:
    """What starts each launched ``fit`` process's part of ``run.log``: its command (:data:`ATTEMPT_LINE`)."""
    return ("\n--- resumed ---\n" if resumed else "") + "$ cl-lightning " + " ".join(map(str, fit_args)) + "\n\n"


def wall_time_line(seconds: float, exit_code: int) -> str:
    """The line appended to ``run.log`` after each launched ``fit`` process (:data:`WALL_TIME_LINE`)."""
    return f"\nwall time of the whole command: {seconds:.1f} s (exit code {exit_code})\n"


def mark_failed(folder: Path, reason: str) -> None:
    """Leave the ``FAILED`` marker of a launched fit that failed: the reason, then the last lines of its log."""
    tail = (folder / LOG_FILE).read_text(errors="replace").splitlines()[-30:]
    (folder / FAILED_MARKER).write_text(f"{reason}\n\nlast lines of {LOG_FILE}:\n" + "\n".join(tail) + "\n")


@dataclass(frozen=True)
class WallTime:
    """What the fit processes of a run folder took, from its ``run.log``."""

    #: Seconds, summed over the attempts.
    seconds: float
    #: Every attempt logged its wall time. False when an attempt was killed with its launcher
    #: (SIGKILL, a machine that went down): it counts the tasks it logged as finished, without its
    #: start-up and the task it was in, so ``seconds`` is a lower bound.
    complete: bool

    def share(self, members: int) -> WallTime:
        """One member's part of a population's wall time."""
        return WallTime(self.seconds / members, self.complete)


def wall_time(folder: Path) -> WallTime | None:
    """The wall time of the fit processes launched into ``folder`` (all attempts); None without a log
    or any time in it."""
    try:
        log = (Path(folder) / LOG_FILE).read_text(errors="replace")
    except OSError:
        return None
    starts = [m.start() for m in ATTEMPT_LINE.finditer(log)]
    attempts = [log[a:b] for a, b in zip([0, *starts], [*starts, len(log)]) if log[a:b].strip()]
    seconds, complete = 0.0, True
    for attempt in attempts:
        whole = WALL_TIME_LINE.search(attempt)
        if whole:
            seconds += float(whole.group(1))
        else:
            seconds += sum(float(m.group(1)) for m in TASK_LINE.finditer(attempt))
            complete = False
    return WallTime(seconds, complete) if seconds > 0 else None


# ---------------------------------------------------------------------------------- the run's state
def has_failed(folder: Path) -> bool:
    return (Path(folder) / FAILED_MARKER).exists()


def ran_out_of_memory(folder: Path) -> bool:
    """Whether the failed run in ``folder`` stopped because the device's memory was exhausted (its
    ``FAILED`` marker quotes the error: ``cl-lightning``'s message, or PyTorch's for a crash elsewhere)."""
    marker = Path(folder) / FAILED_MARKER
    text = marker.read_text(errors="replace") if marker.exists() else ""
    return OUT_OF_MEMORY in text or "CUDA out of memory" in text


def members_of(folder: Path) -> list[Path] | None:
    """The member folders of the population whose run folder is ``folder`` (its ``members.json``,
    written when the fit starts), or None for a plain run's folder."""
    record = Path(folder) / MEMBERS_FILE
    if not record.exists():
        return None
    return [Path(f) for f in json.loads(record.read_text())["folders"]]


def population_of(member: Path) -> tuple[Path, int] | None:
    """The run folder of the population that trained the member in ``member`` (its ``population.json``)
    and the population's number of members; None for a plain run. It is looked for where it lies
    relative to the member (so a tree of runs copied or moved elsewhere reads its own copy), else
    where it was written."""
    record_file = Path(member) / POPULATION_FILE
    if not record_file.exists():
        return None
    record = json.loads(record_file.read_text())
    written = Path(record["population"])
    relative = os.path.relpath(written, Path(record["folders"][record["member"]]))
    population = Path(os.path.normpath(Path(member).absolute() / relative))
    return (population if population.is_dir() else written), len(record["folders"])


def mark_unfinished_members(folder: Path, members: Sequence[Path]) -> list[Path]:
    """After the population in ``folder`` ended: give each member that did not finish (the divergence
    guard stopped it, or the run failed) a ``FAILED`` marker of its own, as its plain run would have;
    return those members."""
    unfinished = [member for member in members if not is_finished(member)]
    for member in unfinished:
        if has_failed(member):  # the divergence guard wrote why it stopped the member
            continue
        member.mkdir(parents=True, exist_ok=True)
        (member / FAILED_MARKER).write_text(f"did not finish in the population run {folder}; see {folder / LOG_FILE}\n")
    return unfinished


def is_finished(folder: Path) -> bool:
    """A run whose folder holds an accuracy matrix with all T rows and no ``FAILED`` marker; a
    population whose members all are."""
    members = members_of(folder)
    if members is not None:
        return not has_failed(folder) and all(is_finished(member) for member in members)
    if has_failed(folder) or not (Path(folder) / MATRIX_FILE).exists():
        return False
    try:
        return read_matrix(Path(folder) / MATRIX_FILE).finished
    except MatrixFileError:
        return False
