"""The accuracy matrix as the figure a reader wants: one drawing for TensorBoard and the report.

Row t = the model after task t, column i = task i, the accuracy printed in each cell while the
cells are big enough to read, a colour bar and a title. The figure's size grows with the number of
tasks up to a cap, so drawing it costs about the same for 100 tasks as for 1,000 (issue 14: the
earlier 16-pixels-per-task image reached 16000x16000 pixels and 20-33 s per task at 1,000 tasks).
Drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through ``pyplot``.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: Dots per inch of the figure: with :data:`MAX_SIDE_INCHES` it caps the image's pixel size.
DPI = 100
#: Side of the matrix's square (inches) for 1 task, what each task adds, and the cap.
MIN_SIDE_INCHES, INCHES_PER_TASK, MAX_SIDE_INCHES = 3.0, 0.36, 8.0
#: Fixed margins around the square (inches): left (row labels), bottom (column labels), top
#: (title), right (colour bar and its label). Fixed rather than a layout engine's, which measures
#: every printed number and doubled the drawing time.
LEFT, BOTTOM, TOP, RIGHT = 0.75, 0.75, 0.4, 1.3
#: Largest image the figure can become, (height, width) in pixels.
MAX_PIXELS = (round((BOTTOM + MAX_SIDE_INCHES + TOP) * DPI), round((LEFT + MAX_SIDE_INCHES + RIGHT) * DPI))
#: Each cell shows its accuracy up to this many tasks; past it the numbers would not be legible.
MAX_ANNOTATED_TASKS = 25
#: At most this many tick labels per axis: past it only every k-th task is labelled.
MAX_TICK_LABELS = 25


def tick_positions(num_tasks: int) -> np.ndarray:
    """0-based positions of the labelled tasks: all of them, or task 1 and every multiple of a round
    step (2, 5, 10, 20, 50, ...) chosen so that at most :data:`MAX_TICK_LABELS` are labelled."""
    step = next(s * 10**k for k in range(12) for s in (1, 2, 5) if num_tasks / (s * 10**k) <= MAX_TICK_LABELS)
    return np.unique([0, *range(step - 1, num_tasks, step)])


def matrix_figure(matrix: np.ndarray, title: str) -> Figure:
    """The accuracy matrix a[t][i] (%) as a heatmap; NaN (not evaluated yet) cells are left light grey."""
    size = len(matrix)
    side = min(MIN_SIDE_INCHES + INCHES_PER_TASK * size, MAX_SIDE_INCHES)
    width, height = LEFT + side + RIGHT, BOTTOM + side + TOP
    fig = Figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((LEFT / width, BOTTOM / height, side / width, side / height))
    bar = fig.add_axes(((LEFT + side + 0.2) / width, BOTTOM / height, 0.2 / width, side / height))
    cmap = colormaps["viridis"].with_extremes(bad="#e6e6e6")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=100, interpolation="nearest", aspect="auto")
    fig.colorbar(image, cax=bar, label="accuracy (%)")
    ticks = tick_positions(size)
    labels = [str(i + 1) for i in ticks]
    ax.set_xticks(ticks, labels, fontsize=8, rotation=90 if size > 99 else 0)
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set(xlabel="accuracy on task i", ylabel="after training task t")
    ax.set_title(title, fontsize=9)
    if size <= MAX_ANNOTATED_TASKS:
        _annotate(ax, matrix)
    return fig


def _annotate(ax, matrix: np.ndarray) -> None:
    """Print each evaluated cell's accuracy, dark on the bright end of viridis and white on the dark end."""
    size = len(matrix)
    fontsize = 8 if size <= 10 else 6 if size <= 18 else 5
    decimals = 1 if size <= 12 else 0
    for t, i in zip(*np.nonzero(~np.isnan(matrix))):
        value = matrix[t, i]
        ax.text(i, t, f"{value:.{decimals}f}", ha="center", va="center", fontsize=fontsize,
                color="black" if value > 60 else "white")


def pixels(fig: Figure) -> np.ndarray:
    """The figure drawn by the Agg canvas as an RGB ``uint8`` array (height, width, 3)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
