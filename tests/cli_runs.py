"""Small command-line runs on tiny dataset files and what their TensorBoard events hold, shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

CONFIGS = Path(__file__).parents[1] / "configs"


def tiny_run_args(config: str, data_root: Path, out: Path, tasks: int = 3) -> list[str]:
    return [
        "--config", str(CONFIGS / config),
        "--data.root", str(data_root),
        "--data.num_tasks", str(tasks),
        "--data.batch_size", "32",
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]


def hparams_of(events: EventAccumulator) -> tuple[dict, list[str]]:
    """The HParams row of a run's events: {column: value} and the metric tags."""
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    values = {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
              for name, value in start.hparams.items()}
    return values, [m.name.tag for m in experiment.metric_infos]
