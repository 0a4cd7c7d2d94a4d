"""The command line starts at once and its console is ours: the overview, the extra commands' help and
refusals, and the refusal of a misspelled command load none of torch, Lightning, matplotlib, scipy, Ray
and TensorBoard (seconds of imports on a busy machine before one line of text; docs/speed.md has the
timings, which a test cannot hold on a shared machine), and a run prints no advertisement of Lightning's
cloud services."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import tiny_run_args

#: What a command loads only when it needs it.
HEAVY = ("torch", "lightning", "matplotlib", "scipy", "ray", "tensorboard")

#: Through the console entry point, in a fresh interpreter: prints the answer, then the heavy packages loaded.
ANSWER = f"""
import json, sys
from cl_lightning.cli.console import main
try:
    main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print(json.dumps([code, [name for name in {HEAVY!r} if name in sys.modules]]))
"""


def answer(argv: list[str]) -> tuple[int, list[str]]:
    """The exit status of ``cl-lightning <argv>`` and the heavy packages it loaded."""
    out = subprocess.run([sys.executable, "-c", ANSWER, *argv], capture_output=True, text=True, check=True).stdout
    code, loaded = json.loads(out.splitlines()[-1])
    return code, loaded


@pytest.mark.slow
@pytest.mark.parametrize(("argv", "status"), [
    (["--help"], 0),
    (["report", "--help"], 0),
    (["grid", "--help"], 0),
    (["path", "--help"], 0),
    (["sweep", "--help"], 0),
    (["fitt"], 2),
    (["report"], 2),  # a refused argument: no folder
    (["grid", "--methods", "naive"], 2),  # a refused argument: no --benchmarks, --seeds
])
def test_answers_without_loading_torch_lightning_or_plots(argv, status):
    assert answer(argv) == (status, [])


@pytest.mark.slow
def test_fit_prints_lightnings_notices_but_not_its_litlogger_tip(mnist_root: Path, tmp_path: Path):
    args = tiny_run_args("naive/permuted_mnist.yaml", mnist_root, tmp_path, tasks=2)
    run = subprocess.run([sys.executable, "-m", "cl_lightning", "fit", *args], capture_output=True, text=True, timeout=600)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console
    assert "GPU available" in console  # Lightning's own notices still reach the console
    assert "litlogger" not in console and "💡" not in console
