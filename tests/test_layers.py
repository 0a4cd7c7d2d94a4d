"""The package's layers: no module imports a layer above its own.

From the bottom up (a module may import its own layer and those below it):

1. ``errors``, ``seeding``: what every layer shares.
2. ``data`` (the task sequence), ``metrics`` (formulas and the per-task metric: tensors in,
   numbers out), and the run's plumbing that knows no continual learning: ``guards``, ``saving``,
   ``signals``, ``rundir`` (the run folder).
3. ``models``: the networks, the LightningModule, per-member settings and random numbers, and
   ``member_outputs``: what each member of a population writes (its config, its logger).
4. ``evaluation`` (a model on the task sequence: the accuracy-matrix callback, evaluation outside
   Lightning's loop) and ``progress`` (the task progress bar).
5. ``methods``: the continual-learning callbacks.
6. ``checkpoints``, ``preflight`` and ``hparams``: checks of a run's inputs and its HParams row, which
   know the methods.
7. The commands: ``cli`` (with ``console``, its entry point, and ``cli_errors``), ``__main__``, ``grid``,
   ``analysis``, ``sweep``, and ``launch`` (how ``grid`` and ``sweep`` run ``fit`` processes).

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
    {"data", "metrics", "guards", "saving", "signals", "rundir"},
    {"models", "member_outputs"},
    {"evaluation", "progress"},
    {"methods"},
    {"checkpoints", "preflight", "hparams"},
    {"cli", "cli_errors", "console", "__main__", "grid", "analysis", "sweep", "launch"},
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
