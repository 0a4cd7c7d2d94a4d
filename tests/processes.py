"""Real ``cl-lightning`` processes for the tests that kill, stop or watch one, started warm.

A ``cl-lightning fit`` child pays seconds of CPU importing torch, Lightning, torchvision and
torchmetrics before its first step, and the suite starts dozens of them. :func:`start` forks each
child instead from a server process (multiprocessing's ``forkserver``) that has imported
:mod:`cl_lightning.cli.lightning_cli` once, per pytest process: the child is a process of its own
(its own pid, signals, exit status, files), runs the console entry point with the test's arguments,
environment and working folder, and writes its console output to files, as a launched command
would. The console script itself (``python -m cl_lightning``, the import-time answers) is tested
cold in ``tests/cli/test_startup.py`` and ``test_cli_face.py``.

The server is a fresh Python that never ran a torch op (no thread pool, no CUDA context), so its
forks are safe where a fork of the pytest process itself would not be.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

#: What the server imports once; everything a `fit`, `validate`, `grid` or `sweep` child needs at start.
PRELOAD = ["cl_lightning.cli.lightning_cli", "cl_lightning.cli.console"]
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


def command_lines() -> dict[int, str]:
    """Process id -> command line (arguments joined by spaces) of every process still readable."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            found[int(cmdline.parent.name)] = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process has exited meanwhile
            continue
    return found


def _child(argv: list[str], environ: dict[str, str], cwd: str, stdout: str, stderr: str, new_session: bool) -> None:
    """In the forked child: the test's environment, folder and output files, then ``cl-lightning <argv>``."""
    if new_session:
        os.setsid()
    os.environ.clear()
    os.environ.update(environ)
    sys.path[:0] = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]  # as Python would at start
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["cl-lightning", *argv]
    from cl_lightning.cli.console import main

    main(argv)


class WarmProcess:
    """A started ``cl-lightning`` child, with the part of ``subprocess.Popen``'s interface the tests use."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None, cwd: Path | None, stdout: Path,
                 stderr: Path, new_session: bool = False) -> None:
        self.args = list(argv)
        self._process = _context.Process(target=_child, name="cl-lightning", args=(
            self.args, dict(os.environ if env is None else env), str(cwd or Path.cwd()), str(stdout), str(stderr),
            new_session))
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal), None while it runs, as ``Popen.returncode``."""
        return self._process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        if self.returncode is None:
            self._process.kill()
            self._process.join()


def start(argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> WarmProcess:
    """``cl-lightning <argv>`` in a warm child, its stdout and stderr both appended to ``log``."""
    return WarmProcess(argv, env, cwd, log, log)


def start_launched_fit(argv: Sequence[str], log: IO[str], cwd: Path | None,
                       cold: Callable[[Sequence[str], IO[str], Path | None], subprocess.Popen]) -> WarmProcess | subprocess.Popen:
    """:func:`cl_lightning.launch.process.start_fit` with the fit warm: what a ``grid`` running in this
    process launches (``python -m cl_lightning fit ...``) starts as :func:`start` does, in a session of its
    own, its output appended to ``log``'s file; any other command by ``cold``, the package's own ``start_fit``."""
    from cl_lightning.launch.process import FIT_ENTRY  # imports torch: not at the controller's collection

    entry = list(FIT_ENTRY)
    if list(argv[: len(entry)]) != entry:
        return cold(argv, log, cwd)
    return WarmProcess(argv[len(entry):], None, cwd, Path(log.name), Path(log.name), new_session=True)


def run(argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """``cl-lightning <argv>`` in a warm child, waited for: what ``subprocess.run(..., capture_output=True,
    text=True)`` of the command would return."""
    with tempfile.TemporaryDirectory(prefix="cl-lightning-output-") as folder:
        stdout, stderr = Path(folder) / "stdout", Path(folder) / "stderr"
        process = WarmProcess(argv, env, cwd, stdout, stderr)
        try:
            code = process.wait(timeout)
        finally:
            process.kill()
        return subprocess.CompletedProcess(process.args, code, _text(stdout), _text(stderr))


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
