"""The report's figures can be read: one panel per task instead of 10+ lines of one colour map."""

from __future__ import annotations

import numpy as np
import pytest
from sequence_runs import fit_permuted_digits

from cl_lightning.analysis import plots


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plot functions draw, kept instead of (as well as) saved."""
    drawn = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or save(fig, path))
    return drawn


def test_task_accuracy_evolution_is_one_panel_per_task(tmp_path, figures):
    matrix, _ = fit_permuted_digits(tmp_path, num_tasks=7, hidden=(32,))
    path = plots.task_accuracy_evolution(matrix.numpy(), "naive", tmp_path / "evolution.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    panels = [ax for ax in figures[0].axes if ax.axison]
    assert [ax.get_title() for ax in panels] == [f"task {i + 1}" for i in range(7)]
    for i, ax in enumerate(panels):
        highlighted = [line for line in ax.get_lines() if line.get_color() == "C0"]
        assert len(highlighted) == 1  # task i in colour, the others grey behind it
        assert np.allclose(highlighted[0].get_ydata(), matrix[i:, i].numpy())
        assert highlighted[0].get_xdata().tolist() == list(range(i + 1, 8))
