"""What a run's TensorBoard HParams tab shows: the science of a run, one column per setting.

A whole LightningCLI config flattened (what was logged before) puts plumbing first
(``accuracy_matrix/print_table``, ``checkpoint/*``, trainer internals) and hides the method's
settings in one long ``trainer/callbacks`` string, so runs cannot be sorted by ``alpha0``. Here
the method, each of its settings, the model, the benchmark and the seed are separate columns;
checkpointing, the progress bar, printing, the logger and the trainer's machinery are left out.

TensorBoard orders the columns by name and shows the first five until one picks others, so the
names sort in reading order: ``method``, ``method/*``, ``model/*``, ``seed``, then the task
sequence (the config's ``data`` section) as ``sequence/*``.
"""

from __future__ import annotations

from typing import Any

Scalar = int | float | str | bool

#: Data settings that change what is learnt, whatever the benchmark; ``root``, ``download``,
#: ``eval_batch_size`` and ``shuffle`` only change where or how fast.
DATA_SETTINGS = ("source", "benchmark", "num_tasks", "epochs_per_task", "batch_size", "joint",
                 "val_fraction", "train_examples_per_task")
#: The settings one benchmark adds (the others ignore them, so they would only be noise).
BENCHMARK_SETTINGS = {"rotated": ("degrees_per_task",), "split": ("classes_per_task", "class_order")}

#: The final metrics of the tab; the accuracy matrix logs their values after each task.
METRICS = ("hp/average_accuracy", "hp/forgetting")


def _scalar(value: Any) -> Scalar:
    """TensorBoard's hparams hold numbers, strings and booleans: anything else (a list, None) as text."""
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def _class_name(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def method_columns(config: dict[str, Any]) -> dict[str, Scalar]:
    """``method`` (the method callbacks' class names, ``naive`` or ``multitask`` without one) and
    ``method/<setting>`` for each of their init arguments."""
    callbacks = config.get("trainer", {}).get("callbacks") or []
    if not callbacks:
        return {"method": "multitask" if config.get("data", {}).get("joint") else "naive"}
    columns: dict[str, Scalar] = {"method": "+".join(_class_name(c["class_path"]) for c in callbacks)}
    for callback in callbacks:
        prefix = "method/" if len(callbacks) == 1 else f"method/{_class_name(callback['class_path'])}/"
        columns |= {f"{prefix}{name}": _scalar(v) for name, v in (callback.get("init_args") or {}).items()}
    return columns


#: Model arguments that place a run in a population rather than change what it learns (the seed has its own column).
MODEL_PLUMBING = ("seeds", "population_member")


def model_columns(model: dict[str, Any]) -> dict[str, Scalar]:
    """``model/<setting>`` (lr, momentum, lr_decay, ...), ``model/net`` (the class) and
    ``model/net/<setting>`` (hidden sizes, dropout, ...)."""
    columns: dict[str, Scalar] = {}
    for name, value in model.items():
        if name in MODEL_PLUMBING:
            continue
        if isinstance(value, dict) and "class_path" in value:
            columns[f"model/{name}"] = _class_name(value["class_path"])
            columns |= {f"model/{name}/{k}": _scalar(v) for k, v in (value.get("init_args") or {}).items()}
        else:
            columns[f"model/{name}"] = _scalar(value)
    return columns


def data_columns(data: dict[str, Any]) -> dict[str, Scalar]:
    """``sequence/<setting>`` for the ``data`` settings in :data:`DATA_SETTINGS` and the benchmark's own."""
    names = DATA_SETTINGS + BENCHMARK_SETTINGS.get(data.get("benchmark"), ())
    return {f"sequence/{name}": _scalar(data[name]) for name in names if name in data}


def science(config: dict[str, Any]) -> dict[str, Scalar]:
    """The HParams columns of a run from its LightningCLI config (as ``parser.dump`` gives it):
    method, method settings, model, data and ``seed`` (the data's own seed when set, else
    ``seed_everything``)."""
    data = config.get("data", {})
    seed = data.get("seed") if data.get("seed") is not None else config.get("seed_everything")
    return {**method_columns(config), **model_columns(config.get("model", {})), **data_columns(data),
            "seed": _scalar(seed)}
