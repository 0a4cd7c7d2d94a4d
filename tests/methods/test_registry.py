"""The one rule that finds a run's methods: the callbacks whose class subclasses ``Method``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cl_lightning.methods.registry import is_method, method_callbacks, method_class, package_methods, registered_methods


def test_the_source_reading_agrees_with_the_imported_classes() -> None:
    imported = {f"{cls.__module__}.{cls.__qualname__}" for cls in registered_methods() if cls.__module__.startswith("cl_lightning.")}
    assert package_methods() == imported
    assert {"cl_lightning.methods.mcsgd.MCSGD", "cl_lightning.methods.derpp.DERPP"} <= imported


def test_only_methods_are_methods_by_path_or_short_name() -> None:
    assert is_method("cl_lightning.methods.ewc.EWC") and is_method("AGEM")
    for other in ("cl_lightning.methods.memory.EpisodicMemory", "cl_lightning.callbacks.guards.FiniteGuard",
                  "lightning.pytorch.callbacks.LearningRateMonitor", "no.such.Class", "Nothing"):
        assert not is_method(other) and method_class(other) is None
    callbacks = [{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
                 {"class_path": "cl_lightning.methods.er.ER", "init_args": {"memory_size": 10}}]
    assert method_callbacks(callbacks) == callbacks[1:]
    assert method_callbacks(callbacks[1]) == callbacks[1:] and method_callbacks(None) == []


@pytest.mark.slow  # a fresh interpreter, to see what it imports
def test_the_rule_on_a_config_imports_neither_torch_nor_lightning() -> None:
    code = ("import sys; from cl_lightning.methods.registry import method_callbacks; "
            "assert method_callbacks([{'class_path': 'cl_lightning.methods.mcsgd.MCSGD'}]); "
            "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
