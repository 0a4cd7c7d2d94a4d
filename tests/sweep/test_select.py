"""Selection reads validation scores only; final runs belong to the current selection."""

import json

import pytest

from cl_lightning.sweep.run import install_best
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


def test_final_runs_of_a_previous_selection_are_moved_aside(tmp_path):
    (tmp_path / "final" / "permuted_digits").mkdir(parents=True)
    install_best(tmp_path, "model: {lr: 0.1}\n")
    assert (tmp_path / "final").exists()  # first selection: nothing to replace
    install_best(tmp_path, "model: {lr: 0.1}\n")
    assert (tmp_path / "final").exists()  # same selection on a rerun: the finished final runs are kept
    install_best(tmp_path, "model: {lr: 0.01}\n")
    assert not (tmp_path / "final").exists() and (tmp_path / ".final.replaced1" / "permuted_digits").exists()
    assert (tmp_path / "best.yaml").read_text() == "model: {lr: 0.01}\n"
