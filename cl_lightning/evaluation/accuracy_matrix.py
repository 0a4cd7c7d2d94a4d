"""The accuracy matrix: collected after every task, logged, written to the run folder, printed."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from typing_extensions import override

from cl_lightning.errors import CheckpointError
from cl_lightning.member_outputs import member_loggers
from cl_lightning.metrics.continual import summary
from cl_lightning.metrics.heatmap import matrix_figure, pixels
from cl_lightning.models.population import member_rows
from cl_lightning.rundir import run_dir, trainer_member_dirs, write_atomically, write_matrix

#: At most about this many heatmaps per run: past as many tasks, the heatmap is logged every k-th
#: task (and after the last), so a 1,000-task run's events file and time do not grow with each task.
MAX_HEATMAPS = 50
#: The console table shows at most this many rows and columns (the paper's 20-task sequences whole);
#: past it the first and last half.
MAX_TABLE_TASKS = 20


def heatmap_due(task: int, num_tasks: int) -> bool:
    """Whether the heatmap is logged after ``task`` (0-based): every task, or every k-th for long sequences."""
    every = math.ceil(num_tasks / MAX_HEATMAPS)
    return (task + 1) % every == 0 or task + 1 == num_tasks


def heatmap(matrix: Tensor, task: int) -> np.ndarray:
    """RGB image (height, width, 3) of rows 1..task+1 of a matrix of accuracies in %, with task labels,
    a colour bar and a title with the average accuracy and forgetting after ``task``; at most
    :data:`~cl_lightning.metrics.heatmap.MAX_PIXELS`, whatever the number of tasks."""
    s = summary(matrix, task)
    title = (f"after task {task + 1}/{matrix.shape[0]}: average accuracy {s['average_accuracy']:.2f} %, "
             f"forgetting {s['forgetting']:.3f}")
    return pixels(matrix_figure(matrix.numpy(), title))


def _shown(count: int) -> list[int | None]:
    """Indices shown of ``count`` rows or columns: all, or the first and last halves of
    :data:`MAX_TABLE_TASKS` with ``None`` where the rest are left out."""
    if count <= MAX_TABLE_TASKS:
        return list(range(count))
    half = MAX_TABLE_TASKS // 2
    return [*range(half), None, *range(count - half, count)]


def format_table(matrix: Tensor, rows: int, title: str, full: str = "the run's accuracy_matrix.csv") -> str:
    """The first ``rows`` rows of the matrix as a fixed-width table with their summaries. A long
    sequence shows its first and last tasks only and says where the full matrix (``full``) is."""
    columns = _shown(matrix.shape[1])
    lines = [title, "after \\ on " + "".join("    ..." if i is None else f"{f'T{i + 1}':>7}" for i in columns)]
    for t in _shown(rows):
        if t is None:
            lines.append("...")
            continue
        row = matrix[t].tolist()
        cells = "".join("    ..." if i is None else "      ." if math.isnan(row[i]) else f"{row[i]:7.1f}" for i in columns)
        lines.append(f"task {t + 1:<6}" + cells)
    if rows:
        s = summary(matrix, rows - 1)
        lines.append(
            f"average accuracy {s['average_accuracy']:.2f} %  forgetting {s['forgetting']:.3f}  "
            f"learning accuracy {s['learning_accuracy']:.2f} %  BWT {s['backward_transfer']:+.2f}"
        )
    if max(rows, matrix.shape[1]) > MAX_TABLE_TASKS:
        lines.append(f"(first and last {MAX_TABLE_TASKS // 2} tasks of {matrix.shape[1]} shown; the full matrix: {full})")
    return "\n".join(lines)


#: The end of ``fit`` prints every member's matrix up to this many members, past it :func:`population_summary`:
#: a population of 200 printed 2,632 lines.
MAX_PRINTED_MATRICES = 3


def population_summary(matrices: Tensor, seeds: list[int], rows: int, split: str) -> str:
    """A few lines for a population's ``[N, T, T]`` matrices after ``rows`` tasks: the mean, lowest and
    highest final average accuracy and forgetting over the members, with the seeds of the extremes,
    and the members left out (stopped by the divergence guard before that row)."""
    scores = {seed: summary(matrix, rows - 1) for seed, matrix in zip(seeds, matrices)}
    stopped = [seed for seed, s in scores.items() if math.isnan(s["average_accuracy"])]
    scores = {seed: s for seed, s in scores.items() if seed not in stopped}
    lines = [f"Population of {len(seeds)} members after task {rows}/{matrices.shape[1]} ({split} split):"]
    for name, label, unit, digits in (("average_accuracy", "average accuracy", " %", 2), ("forgetting", "forgetting", "", 3)):
        values = {seed: s[name] for seed, s in scores.items()}
        if values:
            low, high = min(values, key=values.get), max(values, key=values.get)
            lines.append(f"  {label:<17}mean {sum(values.values()) / len(values):.{digits}f}{unit}  min {values[low]:.{digits}f}"
                         f"{unit} (seed {low})  max {values[high]:.{digits}f}{unit} (seed {high})")
    if stopped:
        lines.append(f"  {len(stopped)} member(s) stopped before task {rows} and left out: seeds {', '.join(map(str, stopped))}")
    return "\n".join(lines)


class AccuracyMatrix(Callback):
    """Builds a[t][i] = accuracy on task i of the model kept after task t, for every population member.

    Row t is read after the evaluation that follows task t's last epoch, so for a method that
    replaces the model at the task end (MC-SGD's w_bar_t) the row measures that model. After
    each task it logs to the logger, with the task number as the step, ``cl/*`` summaries,
    ``matrix/task_XX`` (accuracy of task XX after each task) and, on TensorBoard, the
    ``cl/accuracy_matrix`` heatmap (after every task, or every k-th past :data:`MAX_HEATMAPS`
    tasks, so its cost per task stays flat); it rewrites ``accuracy_matrix.csv`` / ``.json`` in each
    member's folder (:func:`~cl_lightning.rundir.member_dirs`); a population of two or more logs the
    members' mean ``cl/*`` summaries into its own run folder's logger, the run around its members'
    in TensorBoard. The matrices are part of the
    checkpoint, so a resumed run continues them. A member the divergence guard stopped keeps the
    rows of the tasks it completed.

    Args:
        print_table: Print the matrix at the end of ``fit`` and the per-task accuracies at the
            end of ``test``.
    """

    def __init__(self, print_table: bool = True) -> None:
        self.print_table = print_table
        #: ``[N, T, T]``: member k's accuracy matrix in ``matrix[k]``.
        self.matrix: Tensor | None = None
        self.split = "test"
        self.seeds: list[int] | None = None  # the members' seeds (set up from the datamodule)
        self.population_member: int | None = None  # a member's place in a population's checkpoint (the module's)

    @property
    def completed_tasks(self) -> int:
        """Number of rows filled in so far (by any member)."""
        return 0 if self.matrix is None else int((~self.matrix.isnan()).any(dim=2).any(dim=0).sum())

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        self.matrix = torch.full((dm.size, dm.num_tasks, dm.num_tasks), float("nan"), dtype=torch.float64)
        self.split = dm.eval_split
        self.seeds = list(dm.seeds)
        self.population_member = pl_module.hparams.get("population_member")
        self.folders = trainer_member_dirs(trainer, run_dir(trainer))

    def _check_restored(self, trainer: Trainer) -> None:
        """A checkpoint's matrices (loaded after ``setup``) must match the configured sequence."""
        dm = trainer.datamodule
        if self.matrix.shape != (dm.size, dm.num_tasks, dm.num_tasks):
            raise CheckpointError(
                f"the checkpoint holds accuracy matrices of {self.matrix.shape[0]} member(s) and {self.matrix.shape[1]} "
                f"tasks but this run has {dm.size} member(s) (seeds) and data.num_tasks {dm.num_tasks}: resume or test "
                "with the run's own config.yaml"
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_restored(trainer)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_restored(trainer)

    # ------------------------------------------------------------------ fit
    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._print_validation(trainer, pl_module)
            return
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if not dm.is_task_end(trainer.current_epoch):
            return
        task = dm.task_of_epoch(trainer.current_epoch)
        accuracy = pl_module.task_accuracy["val"]
        self.matrix[:, task, : accuracy.shape[1]] = accuracy
        self._publish(trainer, task)

    @rank_zero_only
    def _publish(self, trainer: Trainer, task: int) -> None:
        population: list[dict[str, float]] = []
        for k, (folder, logger) in enumerate(zip(self.folders, member_loggers(trainer))):
            matrix = self.matrix[k]
            if matrix[task].isnan().all():  # a member the guard stopped
                continue
            self.write(folder, task, k)
            scores = summary(matrix, task)
            population.append(scores)
            if logger is None:
                continue
            step = task + 1
            metrics = {f"cl/{name}": value for name, value in scores.items()}
            metrics |= {f"matrix/task_{i + 1:02d}": v for i, v in enumerate(matrix[task].tolist()) if not math.isnan(v)}
            metrics |= {"hp/average_accuracy": scores["average_accuracy"], "hp/forgetting": scores["forgetting"]}
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, TensorBoardLogger) and heatmap_due(task, matrix.shape[0]):
                logger.experiment.add_image("cl/accuracy_matrix", heatmap(matrix, task), global_step=step,
                                            dataformats="HWC")
        if len(self.folders) > 1 and trainer.logger is not None and population:
            # The population's own run (its run folder, around its members'): the members' mean summaries.
            trainer.logger.log_metrics({f"cl/{name}": sum(s[name] for s in population) / len(population)
                                        for name in population[0]}, step=task + 1)

    def write(self, folder: Path, task: int, member: int = 0) -> None:
        """Write rows 1..task+1 of ``member``'s matrix as ``accuracy_matrix.csv`` and ``.json``."""
        write_matrix(folder, "accuracy_matrix", self.matrix[member], task, self.split)

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = self.completed_tasks
        if not (self.print_table and rows):
            return
        if len(self.folders) > MAX_PRINTED_MATRICES:  # each member's matrix is in its folder
            print(population_summary(self.matrix, self.seeds, rows, self.split))
        else:
            for k, folder in enumerate(self.folders):
                title = f"Accuracy matrix (%, {self.split} split): row = after task t, column = task i"
                if len(self.folders) > 1:
                    title = f"Member {k} (seed {self.seeds[k]}): " + title
                print(format_table(self.matrix[k], rows, title, full=str(folder / "accuracy_matrix.csv")))
        print(f"written to {self.folders[0] / 'accuracy_matrix.csv'}" + (" and the other members' folders" if len(self.folders) > 1 else "")
              + f" (and .json); TensorBoard: tensorboard --logdir {os.path.commonpath([f.parent for f in self.folders])}")

    # ------------------------------------------------------------------ test
    @override
    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        num_tasks = trainer.datamodule.num_tasks
        for k, folder in enumerate(self.folders):
            accuracy = pl_module.task_accuracy["test"][k].tolist()
            record: dict[str, Any] = {
                "checkpoint": trainer.ckpt_path,
                "accuracy": accuracy,
                "average_accuracy": sum(accuracy) / num_tasks,
            }
            folder.mkdir(parents=True, exist_ok=True)
            write_atomically({folder / "test_accuracy.json": json.dumps(record, indent=1)})
            if self.print_table:
                if self.completed_tasks:
                    print(format_table(self.matrix[k], self.completed_tasks,
                                       f"Accuracy matrix stored in the checkpoint ({self.split} split)"))
                print("Test accuracy (%) of this model on every task:")
                print("  ".join("..." if i is None else f"T{i + 1} {accuracy[i]:.1f}" for i in _shown(num_tasks)))
                print(f"average accuracy {record['average_accuracy']:.2f} %  -> {folder / 'test_accuracy.json'}")

    # ------------------------------------------------------------------ validate
    @rank_zero_only
    def _print_validation(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``validate``: each member's accuracy on every task its checkpoint has seen, one line each."""
        if not self.print_table:
            return
        dm = trainer.datamodule
        accuracy = pl_module.task_accuracy["val"][:, : dm.tasks_seen]
        print(f"Accuracy (%, {dm.eval_split} split) of this model on the {accuracy.shape[1]} task(s) it has seen:")
        for k, seed in enumerate(self.seeds):
            row = accuracy[k].tolist()
            who = f"seed {seed}: " if len(self.seeds) > 1 else ""
            print(who + "  ".join("..." if i is None else f"T{i + 1} {row[i]:.1f}" for i in _shown(len(row)))
                  + f"  average {sum(row) / len(row):.2f} %")

    # ------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"matrix": self.matrix, "split": self.split, "seeds": self.seeds}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.matrix = state_dict["matrix"]
        self.split = state_dict["split"]
        saved = state_dict.get("seeds")
        if saved and self.seeds and saved != self.seeds and set(self.seeds) <= set(saved):  # members of a population
            self.matrix = self.matrix[member_rows(saved, self.seeds, self.population_member)]
