"""``python -m cl_lightning.sweep.child <parent pid> fit ...``: ``cl-lightning fit`` that dies with its trial.

A trial runs its ``fit`` in a child process, so a crash of the run (out of memory, a segfault)
ends that trial only. When the trial's process is killed instead (the sweep interrupted, Ray
stopping the trial), the child must not live on as an orphan that keeps training and writing
into the run folder while the resumed sweep trains the same run again: on Linux it asks the
kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), then checks that the parent is
still the one that started it (it may have died before the request).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Get SIGKILL when the parent dies (Linux); exit at once if it is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        sys.exit(f"error: the sweep trial that started this run (pid {parent}) is gone")


if __name__ == "__main__":
    die_with_parent(int(sys.argv[1]))
    from cl_lightning.cli.lightning_cli import main

    sys.argv = [sys.argv[0], *sys.argv[2:]]  # what `cl-lightning` would see (LightningCLI reads sys.argv)
    main()
