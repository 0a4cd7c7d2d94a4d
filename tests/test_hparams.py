"""The HParams columns chosen from the configs this project ships (the CLI's run is in tests/cli/test_tensorboard.py)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from cl_lightning.cli import cli_main
from cl_lightning.hparams import science

CONFIGS = Path(__file__).parents[1] / "configs"


def parsed(config: str, *extra: str) -> dict:
    """The config as LightningCLI resolves it (defaults filled in), via ``--print_config``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIGS / config), *extra, "--print_config"])
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize(("config", "method"), [("naive/permuted_digits.yaml", "naive"),
                                                ("multitask/permuted_digits.yaml", "multitask"),
                                                ("ewc/permuted_digits.yaml", "EWC")])
def test_method_named_from_its_callback_or_the_data(config, method):
    assert science(parsed(config))["method"] == method


def test_benchmark_settings_only_for_their_benchmark():
    rotated = science(parsed("naive/permuted_digits.yaml", "--data.benchmark", "rotated"))
    assert rotated["sequence/degrees_per_task"] == 9.0 and "sequence/classes_per_task" not in rotated
    assert "sequence/degrees_per_task" not in science(parsed("naive/permuted_digits.yaml"))


def test_every_column_is_a_scalar_tensorboard_accepts():
    columns = science(parsed("mcsgd/permuted_digits.yaml"))
    assert all(isinstance(v, (int, float, str, bool)) for v in columns.values())
    assert columns["method/memory_per_class"] == "None" and columns["model/net/hidden_sizes"] == "[256, 256]"
