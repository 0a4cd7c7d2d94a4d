"""What a run's TensorBoard HParams tab shows: the science of a run, one column per setting.

A whole LightningCLI config flattened (what was logged before) puts plumbing first
(``accuracy_matrix/print_table``, ``checkpoint/*``, trainer internals) and hides the method's
settings in one long ``trainer/callbacks`` string, so runs cannot be sorted by ``alpha0``. Here
the method, each of its settings, the model, the benchmark and the seed are separate columns;
checkpointing, the progress bar, printing, the logger and the trainer's machinery are left out.

TensorBoard shows the first five columns until one picks others, so the names sort in reading
order: ``method``, ``method/*``, ``model/*``, ``seed``, then the task sequence (the config's ``data``
section) as ``sequence/*``. A population's members differ in a few of them (``seed``, a per-member
``model/lr``), which would sort behind the five equal ones and stay hidden, so
:func:`log_population` puts those first. TensorBoard takes the columns from the experiment summary
a run logged (each member logs one; it reads the first it finds) and sorts those whose ``differs``
flag is set to the top, then by name (tensorflow/tensorboard#6500 and #6601; 2.21's
``_sort_and_reduce_to_hparams_limit`` in ``plugins/hparams/backend_context.py``); versions without
the flag show them in the order they were logged (``kNumHParamsToDisplayByDefault`` in
``tf-hparams-query-pane.ts``). So the differing columns are both flagged and logged first.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `report` imports this module without loading Lightning
    from lightning.pytorch.loggers import TensorBoardLogger

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
    ``method/<setting>`` for each of their init arguments. Other callbacks are not the method."""
    from cl_lightning.methods.registry import method_callbacks  # Lightning: only once a config names callbacks

    callbacks = config.get("trainer", {}).get("callbacks") or []
    callbacks = method_callbacks(callbacks) if callbacks else []
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


def differing(rows: Sequence[dict[str, Scalar]]) -> list[str]:
    """The columns whose value is not the same in every row (absent counts as a value), in column order."""
    columns = dict.fromkeys(name for row in rows for name in row)
    return [name for name in columns if len({row.get(name) for row in rows}) > 1]


def population_rows(configs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Scalar]], list[str]]:
    """Each member's row (:func:`science` of its config) with the columns that differ across the
    members first, and those columns (``seed``, ``model/lr``, ... for a population of several seeds)."""
    rows = [science(config) for config in configs]
    first = differing(rows)
    return [{**{name: row[name] for name in first if name in row}, **row} for row in rows], first


def log_row(logger: TensorBoardLogger, row: dict[str, Scalar], differs: Collection[str] = ()) -> None:
    """Log ``row`` as the run's HParams row with :data:`METRICS`, as Lightning's ``log_hyperparams`` does,
    with the columns in ``differs`` flagged as differing in the experiment summary: TensorBoard
    shows those first (module docstring), which ``log_hyperparams`` cannot say."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams

    metrics = dict.fromkeys(METRICS, 0.0)
    logger.hparams.update(row)  # the run's hparams.yaml, as log_hyperparams keeps it
    logger.log_metrics(metrics)
    experiment, start, end = hparams(row, metrics)
    value = experiment.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    if "differs" in api_pb2.HParamInfo.DESCRIPTOR.fields_by_name:  # a TensorBoard with tensorflow/tensorboard#6500
        for info in data.experiment.hparam_infos:
            info.differs = info.name in differs
    value.metadata.plugin_data.content = data.SerializeToString()
    writer = logger.experiment._get_file_writer()
    for summary in (experiment, start, end):
        writer.add_summary(summary)


def log_population(loggers: Sequence[TensorBoardLogger | None], configs: Sequence[dict[str, Any]]) -> None:
    """Log member k's row (:func:`population_rows` of the members' ``configs``) into ``loggers[k]``
    (None: a member without a TensorBoard logger), the columns that differ across the members first."""
    rows, differs = population_rows(configs)
    for logger, row in zip(loggers, rows):
        if logger is not None:
            log_row(logger, row, differs)
