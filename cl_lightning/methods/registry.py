"""The one rule that finds a run's method(s): the callbacks whose class is a :class:`~cl_lightning.methods.base.Method`.

Checkpoint checks (the method's state must be in the checkpoint), sweeps (which settings members of
one population may differ in), HParams and ``report`` (the method's name and settings) all ask
this module, so a new method is found everywhere as soon as its file exists: every module of this
package is imported by :func:`registered_methods`, and a method outside the package (a user's own,
given by its import path in a config) by :func:`method_class`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from functools import cache
from typing import Any

import cl_lightning.methods
from cl_lightning.methods.base import Method


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


@cache
def _import_methods() -> None:
    for module in pkgutil.iter_modules(cl_lightning.methods.__path__):
        importlib.import_module(f"cl_lightning.methods.{module.name}")


def registered_methods() -> tuple[type[Method], ...]:
    """Every method class of :mod:`cl_lightning.methods` (importing each of its modules once, which also
    gives the command line their short names: ``--trainer.callbacks+=MCSGD``) and of the modules
    imported so far, by name."""
    _import_methods()
    return tuple(sorted(set(_subclasses(Method)), key=lambda cls: cls.__name__))


@cache
def method_class(class_path: str) -> type[Method] | None:
    """The method class at ``class_path`` (a config's ``class_path``, or a short name such as ``MCSGD``),
    or None if it names no method (another callback, or nothing importable)."""
    module, _, name = class_path.rpartition(".")
    if not module:
        return next((cls for cls in registered_methods() if cls.__name__ == name), None)
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, Method) else None


def method_callbacks(callbacks: Iterable[Any] | None) -> list[dict[str, Any]]:
    """The entries of a config's ``trainer.callbacks`` (dicts with ``class_path``) that are methods."""
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    return [c for c in callbacks or [] if isinstance(c, dict) and method_class(str(c.get("class_path", "")))]


def state_keys(checkpoint_callbacks: Iterable[str]) -> list[str]:
    """The keys of a checkpoint's ``callbacks`` that hold a method's state (Lightning keys a
    callback's state by its class's qualified name, plus its ``state_key`` arguments if any)."""
    names = {cls.__qualname__ for cls in registered_methods()}
    return sorted(key for key in checkpoint_callbacks if key.split("{", 1)[0] in names)
