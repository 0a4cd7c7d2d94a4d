"""Check a checkpoint given with ``--ckpt_path`` against the run's config, before anything runs.

Without these checks a damaged checkpoint fails deep inside ``torch.load`` with a zip-reader
error, and a checkpoint of a *different* run resumes silently wrong: LightningCLI re-reads the
model settings from the checkpoint (overriding the config's, Lightning PR #21455), ignores the
checkpoint's data settings, and Lightning only warns when the checkpoint holds a callback the
run lacks (a method whose memory or w_bar would then be dropped) and says nothing when the run
has a method the checkpoint lacks (the method then starts mid-sequence from nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from cl_lightning.cli.hparams import MODEL_PLUMBING
from cl_lightning.errors import CheckpointError
from cl_lightning.methods.registry import method_callbacks, method_class, state_keys

#: ``ckpt_path`` values that Lightning resolves itself (no file to check).
SPECIAL_PATHS = ("last", "best", "hpc", "registry")
#: Data settings that may differ on resume without changing the run.
FREE_DATA_SETTINGS = ("root", "download", "eval_batch_size", "eval_future_tasks")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning training checkpoint, or raise :class:`CheckpointError` saying why not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found.{_alternatives(path)}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, KeyError, UnpicklingError, EOFError, ... for bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        reason = f"{type(err).__name__}: {first.split('. ')[0][:120]}" if first else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({reason}): it is truncated (the run may have been killed "
            f"while writing it) or not a checkpoint.{_alternatives(path)}"
        ) from err
    if not isinstance(checkpoint, dict) or not {"state_dict", "loops", "callbacks"} <= checkpoint.keys():
        raise CheckpointError(f"{path} is not a training checkpoint written by cl-lightning fit (it lacks the "
                              f"weights, loop or callback states).{_alternatives(path)}")
    return checkpoint


def check_checkpoint(path: str, config: dict[str, Any], subcommand: str) -> dict[str, Any] | None:
    """Check ``--ckpt_path`` against the subcommand's parsed ``config`` (as a dict).

    Raises :class:`CheckpointError` for an unreadable file and, when resuming ``fit``, for a
    checkpoint whose data settings or method callbacks differ from the config's; warns when the
    config's model settings differ (LightningCLI replaces them with the checkpoint's). Returns the
    checkpoint read, or None for a path Lightning resolves itself (``last``, ``best``, ...).
    """
    if str(path) in SPECIAL_PATHS and not Path(path).is_file():
        return None
    checkpoint = load_checkpoint(path)
    _warn_model_overridden(checkpoint.get("hyper_parameters", {}), config.get("model") or {})
    if subcommand != "fit":
        return checkpoint
    fix = _resume_hint(Path(path))
    if _saved_before_epoch_end(checkpoint):
        epochs_per_task = checkpoint.get("datamodule_hyper_parameters", {}).get("epochs_per_task", 1)
        raise CheckpointError(
            f"checkpoint {path} was written on the last training step of epoch {checkpoint['epoch']}, before that "
            "epoch's evaluation (a step checkpoint of an older cl-lightning): resuming it, Lightning would skip "
            f"that evaluation and leave task {checkpoint['epoch'] // epochs_per_task + 1}'s accuracy-matrix row "
            f"empty. Resume from the checkpoint written after that task or an earlier one.{_alternatives(Path(path))}"
        )
    data_diff = _differences(checkpoint.get("datamodule_hyper_parameters", {}), _init_args(config.get("data")),
                             ignore=FREE_DATA_SETTINGS)
    if data_diff:
        raise CheckpointError(f"checkpoint {path} was written by a run with other data settings ({data_diff}): resuming "
                              f"would continue a different task sequence. {fix}")
    saved = state_keys(checkpoint["callbacks"])
    configured = sorted(method_class(c["class_path"]).__qualname__ for c in method_callbacks(_callbacks(config)))
    if saved != configured:
        raise CheckpointError(
            f"checkpoint {path} was written by a run with method callbacks {saved or 'none (naive SGD)'} but this config "
            f"has {configured or 'none (naive SGD)'}: the method's state (memory, anchors, ...) would be lost or "
            f"missing. {fix}"
        )
    return checkpoint


def finished_run_message(path: str, checkpoint: dict[str, Any]) -> str | None:
    """What to tell a user who resumes a finished run (every task evaluated) from ``checkpoint``
    (read from ``path``), or None if it is not one.

    Lightning would load the checkpoint, train nothing and end; the accuracy matrix would then
    announce files in the new run folder that nothing wrote.
    """
    state = checkpoint["callbacks"].get("AccuracyMatrix")
    matrix = state.get("matrix") if isinstance(state, dict) else None
    # [N, T, T]: finished when every task's row was evaluated (by the members still training)
    if not isinstance(matrix, torch.Tensor) or not (~matrix.isnan()).any(dim=2).any(dim=0).all():
        return None
    run = Path(path).parent.parent
    results = f" Its results: {run / 'accuracy_matrix.csv'}." if (run / "accuracy_matrix.csv").is_file() else ""
    config = run / "config.yaml"
    test = f"cl-lightning test --config {config if config.is_file() else '<run>/config.yaml'} --ckpt_path {path}"
    return f"nothing to resume: checkpoint {path} holds a finished run (all {matrix.shape[1]} tasks trained and " \
           f"evaluated).{results} To evaluate its model: {test}"


def _saved_before_epoch_end(checkpoint: dict[str, Any]) -> bool:
    """Whether the checkpoint was written in ``on_train_batch_end`` of an epoch's last batch (the
    state Lightning's ``FitLoop.reset`` resumes as a completed epoch, skipping its validation)."""
    batches = checkpoint["loops"].get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    current = batches.get("current", {})
    return bool(batches.get("is_last_batch")) and current.get("completed") == current.get("processed", 0) - 1


def _warn_model_overridden(saved: dict[str, Any], model: dict[str, Any]) -> None:
    # Only settings of the model are compared: the members' seeds are the datamodule's to check (a plain run's
    # config leaves them null), and population_member selects a member's weights from the checkpoint.
    diff = _differences(saved, _init_args(model), ignore=MODEL_PLUMBING)
    if diff:
        rank_zero_warn(f"--ckpt_path: the checkpoint's model settings replace the config's ({diff}); the run uses "
                       "the checkpoint's, as the weights require.")


def _differences(saved: dict[str, Any], configured: dict[str, Any], ignore: tuple[str, ...] = (), prefix: str = "") -> str:
    """``key: checkpoint value, config value`` for every setting present in both that differs
    (nested settings by their dotted name)."""
    found = []
    for key in saved:
        if key.startswith("_") or key in ignore or key not in configured or saved[key] == configured[key]:
            continue
        if isinstance(saved[key], dict) and isinstance(configured[key], dict):
            found.append(_differences(saved[key], configured[key], prefix=f"{prefix}{key}."))
        else:
            found.append(f"{prefix}{key}: checkpoint {saved[key]!r}, config {configured[key]!r}")
    return "; ".join(found)


def _init_args(section: Any) -> dict[str, Any]:
    """The constructor arguments of a config section (subclass mode nests them in ``init_args``)."""
    if not isinstance(section, dict):
        return {}
    return section.get("init_args", section) if "class_path" in section else section


def _callbacks(config: dict[str, Any]) -> list[dict[str, Any]]:
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    return callbacks if isinstance(callbacks, list) else [callbacks]


def _resume_hint(path: Path) -> str:
    config = path.parent.parent / "config.yaml"
    if config.is_file():
        return f"Resume with the run's own config: cl-lightning fit --config {config} --ckpt_path {path}"
    return "Resume with the config.yaml saved in the checkpoint's run folder."


def _alternatives(path: Path) -> str:
    folder = path.parent
    others = sorted((p for p in folder.glob("*.ckpt") if p != path), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not others:
        return ""
    return f" Checkpoints in {folder}, oldest first: {', '.join(p.name for p in others)}."
