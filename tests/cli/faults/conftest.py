"""The fault table: each fault-injection case adds a row; ``CL_FAULT_TABLE=<file>`` writes them as markdown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

COLUMNS = ("fault", "where", "user sees", "survives", "resumed result identical")


@pytest.fixture(scope="session")
def fault_table():
    rows: list[dict[str, str]] = []
    yield rows
    target = os.environ.get("CL_FAULT_TABLE")
    if target and rows:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row[c].replace("|", "\\|") for c in COLUMNS) + " |" for row in rows]
        Path(target).write_text("\n".join(lines) + "\n")
