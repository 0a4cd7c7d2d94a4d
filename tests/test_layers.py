"""The package's layers: no module imports a layer above its own.

From the bottom up (a module may import its own layer and those below it):

1. ``errors``, ``seeding``: what every layer shares.
2. ``data`` (the task sequence), ``metrics`` (formulas and the per-task metric: tensors in,
   numbers out), ``rundir`` (the run folder) and ``callbacks``: the run's plumbing that knows no
   continual learning (the divergence guard, checkpoint saving, signals, the progress line).
3. ``models``: the networks, the LightningModule, per-member settings and random numbers, and
   ``member_outputs``: what each member of a population writes (its config, its logger).
4. ``evaluation``: a model on the task sequence (the accuracy-matrix callback, evaluation outside
   Lightning's loop).
5. ``methods``: the continual-learning callbacks.
6. The commands: ``cli`` (the entry point, LightningCLI and the checks of a run's inputs, which
   know the methods), ``__main__``, ``launch`` (``grid``, and how ``grid`` and ``sweep`` run ``fit``
   processes), ``analysis``, ``sweep``.

So metrics can be reused without a model, models without a method, and analysis code depends on
the pieces it measures, never the other way round. Imports inside functions count too. A new
module must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import cl_lightning

PACKAGE = Path(cl_lightning.__file__).parent
TESTS = Path(__file__).parent

LAYERS: list[set[str]] = [
    {"errors", "seeding"},
    {"data", "metrics", "rundir", "callbacks"},
    {"models", "member_outputs"},
    {"evaluation"},
    {"methods"},
    {"cli", "__main__", "launch", "analysis", "sweep"},
]


def layer(module: str) -> int:
    """Layer of a dotted module name inside the package, e.g. ``cl_lightning.metrics.continual``."""
    part = module.split(".")[1]
    for level, names in enumerate(LAYERS):
        if part in names:
            return level
    raise AssertionError(f"{module} has no layer: add {part!r} to LAYERS in {Path(__file__).name}")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The package's modules that the file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name.startswith("cl_lightning.")}


def upward_imports() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        name = module_name(path)
        for target in sorted(imported(path)):
            if layer(target) > layer(name):
                found.append(f"{name} (layer {layer(name) + 1}) imports {target} (layer {layer(target) + 1})")
    return found


def test_no_module_imports_a_layer_above_it() -> None:
    found = upward_imports()
    assert not found, "\n".join(found)


def test_the_tests_mirror_the_package() -> None:
    """Each test folder is named after the package's subpackage or module it tests."""
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    units = {p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert folders - units == set()
