"""Grid files: which settings a sweep tries, on which seeds, and how it selects.

A grid file is YAML::

    params:                      # dotted LightningCLI keys -> the values to try
      model.lr: [0.1, 0.01]
      trainer.callbacks.init_args.alpha0: [0.1, 0.25]
    samples: 16                  # optional: this many settings drawn from the product (default: all of it)
    sample_seed: 0               # the draw's seed (default 0)
    seeds: [0]                   # search: each setting runs once per seed, scored by the mean over them
    final_seeds: [0, 1, 2, 3, 4] # the best setting is rerun on these (default: seeds)
    val_fraction: 0.1            # share of the training data held out to score the search (default 0.1)

The settings are the product of the ``params`` lists, in file order; with ``samples``, a uniform draw
of that many of them without replacement (a random search on a grid), so that methods whose spaces
differ in size get the same budget. The draw depends on the file alone (``sample_seed``), so a rerun
of the sweep tries, and resumes, the same settings. A key is what follows
``--`` on the ``cl-lightning fit`` command line; ``trainer.callbacks.init_args.<arg>`` sets an
argument of the config's last callback (the method), as on the command line.
"""

from __future__ import annotations

import difflib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cl_lightning.errors import UserError

#: The keys a grid file may hold at its top level.
TOP_LEVEL = ("params", "samples", "sample_seed", "seeds", "final_seeds", "val_fraction")
DEFAULT_VAL_FRACTION = 0.1

#: One point of the grid: (dotted key, value) pairs in the file's key order.
Setting = tuple[tuple[str, Any], ...]


class GridFileError(UserError, ValueError):
    """A grid file that cannot be read or that asks for something a sweep cannot do."""


@dataclass(frozen=True)
class Grid:
    """A parsed grid file."""

    path: Path
    params: dict[str, list[Any]]
    seeds: list[int]
    final_seeds: list[int]
    val_fraction: float
    samples: int | None = None
    sample_seed: int = 0

    @property
    def size(self) -> int:
        """The number of settings of the full product."""
        return math.prod(len(values) for values in self.params.values())

    def settings(self) -> list[Setting]:
        """The product of the value lists, first key slowest; with ``samples``, that many of them drawn
        uniformly without replacement from ``sample_seed``, kept in product order."""
        keys = list(self.params)
        if self.samples is None or self.samples >= self.size:
            chosen = range(self.size)
        else:
            chosen = sorted(random.Random(self.sample_seed).sample(range(self.size), self.samples))
        lists = list(self.params.values())
        return [tuple(zip(keys, self._values(lists, i))) for i in chosen]

    @staticmethod
    def _values(lists: list[list[Any]], index: int) -> list[Any]:
        """The ``index``-th element of the product of ``lists`` (first list slowest), without building it."""
        values = []
        for values_of in reversed(lists):
            index, position = divmod(index, len(values_of))
            values.append(values_of[position])
        return values[::-1]


def _seed_list(raw: Any, name: str, path: Path) -> list[int]:
    if not isinstance(raw, list) or not raw or not all(isinstance(s, int) and not isinstance(s, bool) for s in raw):
        raise GridFileError(f"{path}: '{name}' must be a non-empty list of integers, e.g. {name}: [0, 1, 2], got {raw!r}")
    if len(set(raw)) != len(raw):
        raise GridFileError(f"{path}: '{name}' lists a seed twice: {raw}")
    return list(raw)


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; every problem is a :class:`GridFileError` naming the fix."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise GridFileError(f"cannot read the grid file {path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise GridFileError(f"the grid file {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise GridFileError(f"{path}: a grid file is a mapping with {', '.join(TOP_LEVEL)}; see docs/sweep.md")
    unknown = [key for key in raw if key not in TOP_LEVEL]
    if unknown:
        raise GridFileError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; a grid file holds {', '.join(TOP_LEVEL)} "
                            "(the settings to try go under 'params')")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise GridFileError(f"{path}: 'params' must map dotted keys to lists of values, e.g. params: {{model.lr: [0.1, 0.01]}}")
    for key, values in params.items():
        if not isinstance(key, str) or not key.strip():
            raise GridFileError(f"{path}: parameter names must be dotted keys such as model.lr, got {key!r}")
        if not isinstance(values, list) or not values:
            raise GridFileError(f"{path}: params.{key} must be a non-empty list of values to try, got {values!r}")
        if key.split(".")[-1] == "val_fraction" or key == "seed_everything":
            raise GridFileError(f"{path}: {key} is set by the sweep itself; use the grid file's "
                                f"{'val_fraction' if key.endswith('val_fraction') else 'seeds'} instead")
    seeds = _seed_list(raw.get("seeds"), "seeds", path)
    final_seeds = _seed_list(raw.get("final_seeds", seeds), "final_seeds", path)
    val_fraction = raw.get("val_fraction", DEFAULT_VAL_FRACTION)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise GridFileError(f"{path}: val_fraction must be a number in (0, 1) (selection needs a validation split), "
                            f"got {val_fraction!r}")
    samples, sample_seed = raw.get("samples"), raw.get("sample_seed", 0)
    for name, value, low in (("samples", samples, 1), ("sample_seed", sample_seed, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise GridFileError(f"{path}: {name} must be an integer of at least {low}, got {value!r}")
    return Grid(path, {str(k): list(v) for k, v in params.items()}, seeds, final_seeds, float(val_fraction),
                samples, sample_seed)


def check_keys(grid: Grid, config: dict[str, Any], config_path: Path) -> None:
    """Refuse keys that the resolved base config does not have (a typo would otherwise make every
    trial fail the same way). A list on the path (``trainer.callbacks``) is entered at its last
    element, as LightningCLI does for ``--trainer.callbacks.init_args.<arg>``."""
    for key in grid.params:
        node: Any = config
        for part in key.split("."):
            if isinstance(node, list) and node:
                node = node[-1]
            if not isinstance(node, dict) or part not in node:
                close = difflib.get_close_matches(key, sorted(_dotted_keys(config)), n=3)
                hint = f"; did you mean {' or '.join(close)}?" if close else ""
                raise GridFileError(f"{grid.path}: params.{key} is not a setting of {config_path}{hint} "
                                    f"(see: cl-lightning fit --config {config_path} --print_config)")
            node = node[part]


def _dotted_keys(config: Any, prefix: str = "") -> list[str]:
    if isinstance(config, list) and config:
        return _dotted_keys(config[-1], prefix)
    if not isinstance(config, dict):
        return [prefix[:-1]] if prefix else []
    return [key for name, value in config.items() for key in _dotted_keys(value, f"{prefix}{name}.")] + (
        [prefix[:-1]] if prefix else [])


def cli_value(value: Any) -> str:
    """A value as LightningCLI parses it back from the command line: YAML (PyYAML reads ``1e-05``
    as a string, ``1.0e-05`` as a float), strings as they are."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()


def override_args(setting: Setting) -> list[str]:
    """The ``--key value`` arguments of a setting."""
    return [arg for key, value in setting for arg in (f"--{key}", cli_value(value))]


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key's shortest dotted suffix that no other key ends with (``lr`` alone when only one
    key ends in ``lr``; ``model.lr`` and ``init_args.lr`` when two do)."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        names[key] = suffix
    return names


def _short_value(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return cli_value(value).replace("/", "_").replace(" ", "")


def setting_label(setting: Setting, names: dict[str, str]) -> str:
    """``lr=0.1,batch_size=10``: the setting in run-folder names and tables."""
    return ",".join(f"{names[key]}={_short_value(value)}" for key, value in setting)
