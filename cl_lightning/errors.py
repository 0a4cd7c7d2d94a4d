"""Errors caused by the user's input or environment rather than by a bug.

``cl-lightning`` prints any :class:`UserError` as one ``error: ...`` line and exits with status 1,
without a traceback: the message itself says what is wrong and how to fix it. Every other
exception keeps its traceback, because it points at a bug. Each class also derives from the
built-in exception a caller would expect (``ValueError`` for a bad setting, ``OSError`` for a
failed write), so code written against the built-ins keeps working.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work (impossible sizes, an empty memory, too many tasks, ...)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, or that belongs to a different run than the config."""


class TrainingDivergedError(UserError, FloatingPointError):
    """The training loss or the weights stopped being finite (NaN or infinite)."""


class ResultsWriteError(UserError, OSError):
    """A result file (accuracy matrix, test accuracies) could not be written; the previous
    version of the file is still on disk."""


class DeviceMemoryError(UserError, MemoryError):
    """The accelerator ran out of memory, typically for a population too large to train at once."""


class OutputWriteError(UserError, OSError):
    """An output folder is not writable, or a checkpoint could not be written (disk full, ...)."""


def user_error(err: BaseException | None) -> UserError | None:
    """``err`` or the :class:`UserError` it was raised from, if any. jsonargparse wraps what a class's
    constructor raises (a callback refusing its settings) into its own ``ValueError``."""
    while err is not None and not isinstance(err, UserError):
        err = err.__cause__
    return err


@contextmanager
def user_errors_in_one_line() -> Iterator[None]:
    """End a command on a :class:`UserError` (or an exception raised from one) with its ``error: ...``
    line and status 1, as this module's docstring promises; any other exception goes on with its
    traceback. Shared by every command, so that ``report`` and ``fit`` refuse alike."""
    try:
        yield
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        sys.exit(f"error: {cause}")
