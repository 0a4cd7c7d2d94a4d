"""PNG figures of the report and of the linear-path analysis.

Drawn on ``matplotlib.figure.Figure`` directly (the Agg canvas), never through ``pyplot``: no
display is needed and no global figure state is left behind in a process that draws hundreds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cl_lightning.metrics.heatmap import matrix_figure


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def average_accuracy_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, int]], title: str, path: Path) -> Path:
    """A_t after each task t, one line per method (mean over seeds), shaded ± std.

    ``curves[method] = (mean, std, seeds)``; std is NaN where fewer than two seeds exist.
    """
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for method, (mean, std, seeds) in curves.items():
        tasks = np.arange(1, len(mean) + 1)
        (line,) = ax.plot(tasks, mean, marker="o", markersize=3, label=f"{method} ({seeds} seed{'s' * (seeds != 1)})")
        ax.fill_between(tasks, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="after task t", ylabel="average accuracy A_t (%)", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def matrix_heatmap(matrix: np.ndarray, title: str, path: Path) -> Path:
    """The accuracy matrix a[t][i] (row: after task t, column: task i), as TensorBoard shows it."""
    return _save(matrix_figure(matrix, title), path)


#: Panels per row of the small-multiples figure.
PANEL_COLUMNS = 5


def task_accuracy_evolution(matrix: np.ndarray, title: str, path: Path) -> Path:
    """Accuracy of each task i after every later task t (column i of the matrix from row i on), as
    small multiples: one panel per task, its line in colour over the other tasks' lines in light grey,
    so each task's forgetting can be read off, which one panel of 10+ viridis lines did not allow."""
    size = len(matrix)
    columns = min(size, PANEL_COLUMNS)
    rows = -(-size // columns)
    fig = Figure(figsize=(2.1 * columns + 0.6, 1.6 * rows + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)).ravel()
    curves = [(np.arange(i + 1, size + 1), matrix[i:, i]) for i in range(size)]
    for i, ax in enumerate(axes):
        if i >= size:
            ax.set_axis_off()
            continue
        for tasks, accuracy in curves:
            ax.plot(tasks, accuracy, color="0.85", linewidth=0.8)
        ax.plot(*curves[i], marker="o", markersize=2.5, color="C0")
        ax.set_title(f"task {i + 1}", fontsize=8, pad=2)
        ax.set(ylim=(0, 100), xlim=(0.5, size + 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        ax.tick_params(labelsize=7, labelbottom=i + columns >= size)  # the lowest panel of each column
        ax.grid(alpha=0.3)
    fig.supxlabel("after task t", fontsize=9)
    fig.supylabel("accuracy on task i (%)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def linear_path(alphas: np.ndarray, series: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str, path: Path) -> Path:
    """Loss (left) and accuracy (right) along a path, one line per ``(label, loss, accuracy)``."""
    fig = Figure(figsize=(10, 3.8))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for label, loss, accuracy in series:
        loss_ax.plot(alphas, loss, label=label)
        acc_ax.plot(alphas, accuracy, label=label)
    loss_ax.set(xlabel="α (0: start, 1: end)", ylabel="test loss", title="loss")
    acc_ax.set(xlabel="α (0: start, 1: end)", ylabel="accuracy (%)", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)
