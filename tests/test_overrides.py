"""Every method that overrides a Lightning or torchmetrics hook is marked ``@override``.

Lightning's own style (``typing_extensions.override``): a reader sees at once which methods are
hooks, and a type checker flags a hook whose name or base went away. It matters most for
``TaskAwareCallback``'s subclasses, which must call ``super()`` in the hooks they share with it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import cl_lightning

FRAMEWORKS = ("lightning", "torchmetrics")


def package_classes() -> list[type]:
    classes = []
    for info in pkgutil.walk_packages(cl_lightning.__path__, "cl_lightning."):
        if info.name == "cl_lightning.__main__":  # importing it runs the CLI
            continue
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError as err:  # an optional extra (ray for `sweep`) not installed
            if err.name.split(".")[0] == "cl_lightning":
                raise
            continue
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == info.name]
    return classes


def unmarked_overrides() -> list[str]:
    found = []
    for cls in package_classes():
        bases = [b for b in cls.__mro__[1:] if b is not object]
        if not any(b.__module__.split(".")[0] in FRAMEWORKS for b in bases):
            continue
        for name, member in vars(cls).items():
            function = member.fget if isinstance(member, property) else member
            if not inspect.isfunction(function) or (name.startswith("__") and name.endswith("__")):
                continue
            if any(name in vars(b) for b in bases) and not getattr(function, "__override__", False):
                found.append(f"{cls.__module__}.{cls.__qualname__}.{name}")
    return found


def test_hook_overrides_are_marked() -> None:
    found = unmarked_overrides()
    assert not found, "mark with @override (from typing_extensions import override):\n" + "\n".join(found)
