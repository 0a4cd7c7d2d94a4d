"""The one rule that finds a run's method(s): the callbacks whose class is a :class:`~cl_lightning.methods.base.Method`.

Checkpoint checks (the method's state must be in the checkpoint), sweeps (which settings members of
one population may differ in), HParams and ``report`` (the method's name and settings) all ask
this module, so a new method is found everywhere as soon as its file exists: every module of this
package is imported by :func:`registered_methods`, and a method outside the package (a user's own,
given by its import path in a config) by :func:`method_class`.

:func:`is_method` answers for the package's own classes from their source (:func:`package_methods`), without
importing them: ``report`` and ``sweep`` read configs and need the rule, not torch and Lightning.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cl_lightning.methods

if TYPE_CHECKING:  # imported where a class is needed: is_method answers without Lightning
    from cl_lightning.methods.base import Method

PACKAGE = "cl_lightning.methods"


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
    from cl_lightning.methods.base import Method

    _import_methods()
    return tuple(sorted(set(_subclasses(Method)), key=lambda cls: cls.__name__))


@cache
def package_methods() -> frozenset[str]:
    """The class paths (``cl_lightning.methods.<module>.<Class>``) of this package's methods, read from the
    source: the classes whose bases are ``Method`` or, transitively, another such class of the package."""
    bases: dict[str, tuple[str, set[str]]] = {}
    for path in sorted(Path(cl_lightning.methods.__file__).parent.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                names = {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                         if isinstance(b, (ast.Name, ast.Attribute))}
                bases[node.name] = (f"{PACKAGE}.{path.stem}", names)
    methods = {"Method"}
    while new := {name for name, (_, names) in bases.items() if names & methods} - methods:
        methods |= new
    return frozenset(f"{bases[name][0]}.{name}" for name in methods - {"Method"})


def is_method(class_path: str) -> bool:
    """Whether a config's ``class_path`` (or short name, ``MCSGD``) names a method: this package's from its
    source, any other class by importing it."""
    if class_path.startswith(f"{PACKAGE}.") or "." not in class_path:
        return any(class_path in (path, path.rsplit(".", 1)[-1]) for path in package_methods())
    return method_class(class_path) is not None


@cache
def method_class(class_path: str) -> type[Method] | None:
    """The method class at ``class_path`` (a config's ``class_path``, or a short name such as ``MCSGD``),
    or None if it names no method (another callback, or nothing importable)."""
    from cl_lightning.methods.base import Method

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
    return [c for c in callbacks or [] if isinstance(c, dict) and is_method(str(c.get("class_path", "")))]


def state_keys(checkpoint_callbacks: Iterable[str]) -> list[str]:
    """The keys of a checkpoint's ``callbacks`` that hold a method's state (Lightning keys a
    callback's state by its class's qualified name, plus its ``state_key`` arguments if any)."""
    names = {cls.__qualname__ for cls in registered_methods()}
    return sorted(key for key in checkpoint_callbacks if key.split("{", 1)[0] in names)
