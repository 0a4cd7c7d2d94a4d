"""A fit in a child process: its console output appended to ``run.log``, Ctrl-C and SIGTERM passed
on to it, and how it ended.

The child runs in a session of its own, so a signal reaches only its launcher (``grid``, a sweep
trial), which passes it on: the fit then stops as ``fit`` does on it, with a checkpoint at its next
consistent point, instead of being killed mid-write or training on as an orphan. A failure leaves
``FAILED`` with the run's last error; a stop or kill by a signal (exit 130/143 with a checkpoint
written, or death by SIGKILL) does not, and the next launch resumes it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cl_lightning.rundir import LOG_FILE, attempt_line, is_finished, mark_failed, read_result, wall_time_line

#: Exit statuses of an interrupted fit, unfinished but not failed (the next launch resumes it from
#: ``last.ckpt``): stopped by SIGINT / SIGTERM with a checkpoint (``callbacks/signals.py``), or killed by a signal
#: from outside (the OOM killer's or a scheduler's SIGKILL, a hangup). A crash (e.g. SIGSEGV) is a failure.
STOPPED_BY_SIGNAL = (128 + signal.SIGINT, 128 + signal.SIGTERM,
                     -signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP)
#: ``python -m cl_lightning``: how a fit is launched unless the caller wraps it (the sweep's child).
FIT_ENTRY = (sys.executable, "-m", "cl_lightning")
#: Seconds between two looks at a launched fit (its exit, its accuracy matrix for ``on_poll``).
POLL_SECONDS = 1.0


def failure_reason(code: int, folder: Path) -> str:
    """Why a launched fit failed: its exit code and the last error of its log (with the indented
    lines that continue it, where LightningCLI puts the reason of a bad value)."""
    log = folder / LOG_FILE
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    # the last line that starts an error (not an indented line of one, e.g. jsonargparse's "Errors:")
    last = next((i for i in reversed(range(len(lines))) if ("Error" in lines[i] or "error:" in lines[i])
                 and not lines[i].startswith((" ", "\t"))), None)
    error = ""
    if last is not None:
        block = [lines[last].strip()]
        for line in lines[last + 1:last + 9]:
            if not line.startswith((" ", "\t")):
                break
            block.append(line.strip())
        error = " ".join(block)
    if code:
        reason = f"exit code {code}"
    else:
        result = read_result(folder)
        reason = f"exit code 0 but only {result['tasks_completed'] if result else 0} task(s) done"
    return f"{reason}: {error}" if error else reason


class Terminated(Exception):
    """SIGTERM reached a launcher (``kill``, a scheduler ending the job): it stops as on Ctrl-C."""


@contextmanager
def sigterm_raises_terminated() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` instead of ending the process at once.

    A launcher killed outright would leave its running fit, which has a session of its own,
    training on as an orphan, and a rerun would start a second fit on the same run folder. Python
    delivers signals to the main thread only, so elsewhere (a Ray trial's thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def signal_of(stop: KeyboardInterrupt | Terminated) -> int:
    """The signal behind a launcher's stop: SIGINT for Ctrl-C, SIGTERM for :class:`Terminated`."""
    return signal.SIGINT if isinstance(stop, KeyboardInterrupt) else signal.SIGTERM


#: The fit processes :func:`launch` is running, so that a launcher running several at once (``grid
#: --jobs``, one thread each) passes a signal on to all of them from its main thread (Python delivers
#: signals there only): :func:`pass_on`.
_running: set[subprocess.Popen] = set()
_running_lock = threading.Lock()


def pass_on(signum: int, skip: frozenset[subprocess.Popen] | set[subprocess.Popen] = frozenset()) -> set[subprocess.Popen]:
    """Send ``signum`` to every fit process :func:`launch` is running but those in ``skip`` (each
    stops as ``fit`` does on it); return the processes it was sent to."""
    with _running_lock:
        targets = {child for child in _running if child not in skip and child.poll() is None}
        for child in targets:
            child.send_signal(signum)
    return targets


def wait_passing_on_signals(child: subprocess.Popen, on_poll: Callable[[], None] | None = None) -> int:
    """The child's exit status, calling ``on_poll`` about every :data:`POLL_SECONDS` meanwhile.

    Ctrl-C (SIGINT) and SIGTERM (under :func:`sigterm_raises_terminated`) reach only the launcher,
    the child running in a session of its own: each is passed on, once per signal, so that the child
    stops as ``fit`` does (a checkpoint at its next consistent point; a second Ctrl-C stops it at
    once) rather than being killed mid-write, and re-raised once the child has ended."""
    stop: KeyboardInterrupt | Terminated | None = None
    while True:
        try:
            if on_poll is not None:
                on_poll()
            code = child.wait(timeout=POLL_SECONDS)
            break
        except subprocess.TimeoutExpired:
            continue
        except (KeyboardInterrupt, Terminated) as caught:
            stop = caught
            child.send_signal(signal_of(caught))
    if stop is not None:
        raise stop
    return code


def start_fit(argv: Sequence[str], log: IO[str], cwd: Path | None) -> subprocess.Popen:
    """Start ``argv`` in a session of its own, its stdout and stderr appended to ``log`` (a file open for
    appending). The one place :func:`launch` starts a process: a caller with another way to start the
    same command (the tests' warm children) replaces this function."""
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)


@dataclass(frozen=True)
class Outcome:
    """How a launched fit ended: its exit code, wall time, and why it failed (None: finished or stopped)."""

    code: int
    seconds: float
    failure: str | None

    @property
    def stopped(self) -> bool:
        """Stopped or killed by a signal: unfinished, and resumed by the next launch."""
        return self.code in STOPPED_BY_SIGNAL


def launch(folder: Path, fit_args: Sequence[str], resume: Sequence[str] = (), entry: Sequence[str] = FIT_ENTRY,
           cwd: Path | None = None, on_poll: Callable[[], None] | None = None) -> Outcome:
    """Run ``<entry> <fit_args> <resume>`` (``resume`` from :func:`~cl_lightning.launch.jobs.prepare`) in
    a child process whose console output is appended to ``run.log``, with its wall-time line; a
    failure leaves the ``FAILED`` marker (reason and last lines of the log), a stop by a signal does not.

    A resumed fit continues in its run folder and keeps the ``config.yaml`` there."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    code = -1
    with open(folder / LOG_FILE, "a") as log:
        log.write(attempt_line([*fit_args, *resume], resumed=bool(resume)))
        log.flush()
        child = start_fit([*entry, *fit_args, *resume], log, cwd)
        with _running_lock:
            _running.add(child)
        try:
            code = wait_passing_on_signals(child, on_poll)
        finally:
            with _running_lock:
                _running.discard(child)
            log.write(wall_time_line(time.monotonic() - start, child.returncode))
    seconds = time.monotonic() - start
    if code in STOPPED_BY_SIGNAL or (code == 0 and is_finished(folder)):
        return Outcome(code, seconds, None)
    reason = failure_reason(code, folder)
    mark_failed(folder, reason)
    return Outcome(code, seconds, reason)


def interrupted_exit(command: str, signum: int = signal.SIGINT) -> None:
    """End a launcher (``grid``, ``sweep``) stopped by Ctrl-C or SIGTERM: one line with the rerun
    command, status 130 or 143."""
    how = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    print(f"{how}; finished runs are kept and the interrupted ones resume from their last checkpoint "
          f"when you rerun: {command}", file=sys.stderr, flush=True)
    sys.exit(128 + signum)
