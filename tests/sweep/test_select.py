"""Selection reads validation scores only."""

import json

import pytest

from cl_lightning.sweep.select import SelectionError, score
from cl_lightning.sweep.trial import TrialSpec


def test_selection_refuses_a_run_scored_on_the_test_split(tmp_path):
    spec = TrialSpec(tmp_path, "permuted_digits", "naive[lr=0.1]", 0)
    spec.folder.mkdir(parents=True)
    record = {"split": "test", "tasks_completed": 1, "num_tasks": 1, "matrix": [[90.0]], "average_accuracy": 90.0,
              "forgetting": 0.0}
    (spec.folder / "accuracy_matrix.json").write_text(json.dumps(record))
    with pytest.raises(SelectionError, match="measured on the test split; a sweep selects on the val split only"):
        score((("model.lr", 0.1),), "lr=0.1", [spec])
    record["split"] = "val"
    (spec.folder / "accuracy_matrix.json").write_text(json.dumps(record))
    assert score((("model.lr", 0.1),), "lr=0.1", [spec]).scores == [90.0]
