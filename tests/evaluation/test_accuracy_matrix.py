import json

import numpy as np
import pytest
import torch

from cl_lightning.evaluation.accuracy_matrix import AccuracyMatrix, format_table, heatmap, heatmap_due
from cl_lightning.metrics.heatmap import MAX_PIXELS, matrix_figure, tick_positions

NAN = float("nan")
MATRIX = torch.tensor([[90.0, NAN, NAN], [70.0, 80.0, NAN], [60.0, 75.0, 85.0]], dtype=torch.float64)


def test_heatmap_is_a_labelled_figure_with_missing_cells_grey():
    image = heatmap(MATRIX, 1)
    assert image.dtype == np.uint8 and image.shape[2] == 3 and 300 <= image.shape[0] <= MAX_PIXELS[0]
    assert (image == 0xE6).all(axis=2).sum() > 1000  # the cells not evaluated yet, light grey


@pytest.mark.parametrize("num_tasks", [20, 100, 1000])
def test_heatmap_stays_within_the_pixel_cap_for_long_sequences(num_tasks):
    matrix = torch.rand(num_tasks, num_tasks, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 100
    image = heatmap(matrix.tril() + torch.triu(torch.full_like(matrix, NAN), 1), num_tasks - 1)
    assert image.shape[:2] <= MAX_PIXELS


def test_long_sequences_label_every_kth_task_and_print_no_numbers():
    assert tick_positions(10).tolist() == list(range(10))
    assert tick_positions(1000).tolist() == [0, *range(49, 1000, 50)]  # tasks 1, 50, 100, ..., 1000
    assert len(matrix_figure(MATRIX.numpy(), "t").axes[0].texts) == 6  # every evaluated cell
    assert len(matrix_figure(torch.full((30, 30), 50.0).numpy(), "t").axes[0].texts) == 0


def test_heatmap_logged_every_task_then_every_kth_past_fifty_tasks():
    assert [t for t in range(10) if heatmap_due(t, 10)] == list(range(10))
    due = [t + 1 for t in range(1000) if heatmap_due(t, 1000)]
    assert len(due) == 50 and due[:2] == [20, 40] and due[-1] == 1000
    assert [t + 1 for t in range(75) if heatmap_due(t, 75)] == [*range(2, 75, 2), 75]


def test_long_table_shows_first_and_last_tasks_and_names_the_full_csv():
    matrix = torch.full((1000, 1000), 50.0, dtype=torch.float64)
    lines = format_table(matrix, 1000, "title", full="run/accuracy_matrix.csv").splitlines()
    assert len(lines) < 30 and max(len(line) for line in lines) < 160
    assert "T10" in lines[1] and "T991" in lines[1] and "T11" not in lines[1] and "..." in lines[1]
    assert lines[-1].endswith("the full matrix: run/accuracy_matrix.csv)")


def test_table_lists_rows_and_summary():
    text = format_table(MATRIX, 3, "title")
    assert "task 3" in text and "85.0" in text and "average accuracy 73.33 %" in text
    assert "forgetting 0.175" in text


def test_files_written_and_rewritten(tmp_path):
    callback = AccuracyMatrix()
    callback.matrix = MATRIX.unsqueeze(0).clone()  # a population of one
    callback.write(tmp_path, 1)
    record = json.loads((tmp_path / "accuracy_matrix.json").read_text())
    assert record["tasks_completed"] == 2 and record["matrix"] == [[90.0, None, None], [70.0, 80.0, None]]
    callback.write(tmp_path, 2)
    lines = (tmp_path / "accuracy_matrix.csv").read_text().splitlines()
    assert lines[0] == "after_task,task_1,task_2,task_3"
    assert lines[3] == "3,60.0000,75.0000,85.0000"
    assert json.loads((tmp_path / "accuracy_matrix.json").read_text())["forgetting"] == 0.175


def test_state_round_trip():
    callback = AccuracyMatrix()
    callback.matrix, callback.split = torch.stack([MATRIX, MATRIX - 10]), "val"  # two members
    restored = AccuracyMatrix()
    restored.load_state_dict(callback.state_dict())
    assert torch.equal(restored.matrix.nan_to_num(-1), callback.matrix.nan_to_num(-1)) and restored.split == "val"
    assert restored.completed_tasks == 3


def end_of_fit(matrices: torch.Tensor, tmp_path) -> AccuracyMatrix:
    """The callback at the end of ``fit`` of a population with these matrices, seeds 0..N-1."""
    callback = AccuracyMatrix()
    callback.matrix, callback.seeds = matrices, list(range(len(matrices)))
    callback.folders = [tmp_path / f"seed_{seed}" for seed in callback.seeds]
    return callback


def test_a_large_population_prints_a_summary_not_every_matrix(tmp_path, capsys):
    matrices = MATRIX.repeat(200, 1, 1)  # A 73.33, F 0.175
    matrices[17, 2] = torch.tensor([30.0, 45.0, 55.0])  # A 43.33, F 0.475
    matrices[2, 2] = torch.tensor([90.0, 80.0, 85.0])  # A 85.00, F 0
    matrices[5, 2] = NAN  # stopped by the divergence guard after task 2
    end_of_fit(matrices, tmp_path).on_fit_end(None, None)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        "Population of 200 members after task 3/3 (test split):",
        "  average accuracy mean 73.24 %  min 43.33 % (seed 17)  max 85.00 % (seed 2)",  # (197 * 73.33 + 43.33 + 85) / 199
        "  forgetting       mean 0.176  min 0.000 (seed 2)  max 0.475 (seed 17)",
        "  1 member(s) stopped before task 3 and left out: seeds 5",
    ]
    assert len(lines) == 5 and lines[4].startswith(f"written to {tmp_path / 'seed_0' / 'accuracy_matrix.csv'} and the other")


def test_a_few_members_print_their_matrices(tmp_path, capsys):
    end_of_fit(MATRIX.repeat(3, 1, 1), tmp_path).on_fit_end(None, None)
    printed = capsys.readouterr().out
    assert "Member 2 (seed 2): Accuracy matrix" in printed and printed.count("average accuracy 73.33 %") == 3
