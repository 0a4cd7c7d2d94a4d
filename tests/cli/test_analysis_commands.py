"""``cl-lightning <grid|report|path>`` reach their modules through the console entry point."""

import sys

import pytest

from cl_lightning.cli.lightning_cli import EXTRA_COMMANDS, main


@pytest.mark.parametrize("command", sorted(EXTRA_COMMANDS))
def test_entry_point_dispatches_analysis_commands(command, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cl-lightning", command, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    assert f"cl-lightning {command}" in capsys.readouterr().out


def test_top_level_help_lists_the_analysis_commands(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cl-lightning", "--help"])
    with pytest.raises(SystemExit):
        main()
    out = capsys.readouterr().out
    assert "fit" in out and all(f"  {name} " in out for name in EXTRA_COMMANDS)


def test_report_error_reaches_the_console_without_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cl-lightning", "report", str(tmp_path)])
    with pytest.raises(SystemExit, match="error: no run folders"):
        main()
