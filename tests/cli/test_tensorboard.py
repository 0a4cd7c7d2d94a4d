"""What a researcher sees in TensorBoard after a real digits fit through ``cl-lightning``: the
accuracy-matrix heatmap (Images tab) and the run's science as HParams columns."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runs import hparams_of
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cl_lightning.cli.lightning_cli import main
from cl_lightning.metrics.heatmap import MAX_PIXELS

MCSGD = str(Path(__file__).parents[2] / "configs" / "mcsgd" / "permuted_digits.yaml")


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> EventAccumulator:
    """The events of a 2-task MC-SGD run on the digits."""
    out = tmp_path_factory.mktemp("tensorboard")
    main(["fit", "--config", MCSGD, "--data.num_tasks", "2", "--trainer.callbacks.alpha0", "0.3",
          "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--accuracy_matrix.print_table", "false"])
    accumulator = EventAccumulator(str(out / "lightning_logs" / "version_0"), size_guidance={"images": 0})
    return accumulator.Reload()


@pytest.mark.slow
def test_heatmap_logged_after_each_task_within_the_pixel_cap(events):
    images = events.Images("cl/accuracy_matrix")
    assert [image.step for image in images] == [1, 2]
    for image in images:
        assert (image.height, image.width) <= MAX_PIXELS and image.height >= 300  # readable, bounded


@pytest.mark.slow
def test_hparams_are_the_science_one_column_each(events):
    values, metrics = hparams_of(events)
    assert values["method"] == "MCSGD"
    assert values["method/alpha0"] == 0.3 and values["method/lr"] == 0.005 and values["method/weighting"] == "reference"
    assert values["model/lr"] == 0.1 and values["model/lr_decay"] == 0.8 and values["model/momentum"] == 0.8
    assert values["model/net"] == "MLP" and values["model/net/dropout"] == 0.25
    assert values["sequence/benchmark"] == "permuted" and values["sequence/source"] == "digits"
    assert values["sequence/num_tasks"] == 2 and values["sequence/epochs_per_task"] == 1
    assert values["sequence/batch_size"] == 16
    assert values["seed"] == 0
    assert metrics == ["hp/average_accuracy", "hp/forgetting"]
    plumbing = [name for name in values if name.split("/")[0] in
                ("trainer", "checkpoint", "progress_bar", "accuracy_matrix", "finite_guard", "num_threads", "ckpt_path")]
    assert plumbing == []
    assert events.Scalars("hp/average_accuracy")[-1].step == 2  # the final metrics' values
    shown_first = sorted(values)[:5]  # TensorBoard sorts the columns by name and shows five at first
    assert shown_first == ["method", "method/alpha0", "method/backend", "method/batch_size", "method/epochs"]
