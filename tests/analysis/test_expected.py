"""Expected values: a config carries its table's result, every run keeps it, and ``report`` flags a cell
whose mean falls outside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cl_lightning.analysis.expected import ExpectedResult
from cl_lightning.analysis.report import main as report
from cl_lightning.cli.lightning_cli import cli_main

CONFIGS = Path(__file__).parents[2] / "configs"


def test_an_expected_result_is_read_from_a_config_and_bounds_both_metrics() -> None:
    expected = ExpectedResult.of({"expected": {"average_accuracy": [84.5, 86.0], "forgetting": [0.04, 0.06],
                                               "seeds": 10, "source": "test"}})
    assert expected == ExpectedResult((84.5, 86.0), (0.04, 0.06), 10, "test")
    assert expected.outside({"average_accuracy": 85.0, "forgetting": 0.05}) == []
    assert expected.outside({"average_accuracy": 83.0, "forgetting": 0.07}) == ["A_T", "F_T"]
    assert ExpectedResult.of({"seed_everything": 0}) is None and ExpectedResult.of({"expected": {"seeds": 3}}) is None


@pytest.mark.slow
def test_report_flags_a_cell_outside_its_expected_values(tmp_path, capsys) -> None:
    cli_main(["fit", "--config", str(CONFIGS / "naive" / "permuted_digits.yaml"), "--data.num_tasks", "2",
              "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
              "--accuracy_matrix.print_table", "false",
              "--expected", "{average_accuracy: [0, 50], forgetting: [0, 1], seeds: 10, source: a test}"])
    run = tmp_path / "lightning_logs" / "version_0"
    capsys.readouterr()
    report([str(tmp_path)])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("permuted_digits/naive:"))
    assert line.endswith("OUTSIDE (A_T)") and "against expected A_T [0.00, 50.00] / F_T [0.000, 1.000] (10 seeds)" in line
    # the same run against values that hold it
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["expected"]["average_accuracy"] = [50.0, 100.0]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    report([str(tmp_path)])
    assert any(line.startswith("permuted_digits/naive:") and line.endswith(": ok")
               for line in capsys.readouterr().out.splitlines())
    assert "(10 seeds): ok" in (tmp_path / "report.md").read_text()
