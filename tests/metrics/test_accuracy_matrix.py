import json

import torch

from cl_lightning.metrics.accuracy_matrix import AccuracyMatrix, format_table, heatmap

NAN = float("nan")
MATRIX = torch.tensor([[90.0, NAN, NAN], [70.0, 80.0, NAN], [60.0, 75.0, 85.0]], dtype=torch.float64)


def test_heatmap_shape_and_missing_cells_grey():
    image = heatmap(MATRIX, cell=4)
    assert image.shape == (3, 12, 12)
    assert torch.all(image[:, 0, 4] == 0.5)  # row 1, column 2: not evaluated
    assert image.min() >= 0 and image.max() <= 1


def test_table_lists_rows_and_summary():
    text = format_table(MATRIX, 3, "title")
    assert "task 3" in text and "85.0" in text and "average accuracy 73.33 %" in text
    assert "forgetting 0.175" in text


def test_files_written_and_rewritten(tmp_path):
    callback = AccuracyMatrix()
    callback.matrix = MATRIX.clone()
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
    callback.matrix, callback.split = MATRIX.clone(), "val"
    restored = AccuracyMatrix()
    restored.load_state_dict(callback.state_dict())
    assert torch.equal(restored.matrix.nan_to_num(-1), MATRIX.nan_to_num(-1)) and restored.split == "val"
    assert restored.completed_tasks == 3
