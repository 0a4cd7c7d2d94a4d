"""The command lines of this machine's processes, for tests that watch, pause or wait for real processes."""

from pathlib import Path


def command_lines() -> dict[int, str]:
    """Process id -> command line (arguments joined by spaces) of every process still readable."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            found[int(cmdline.parent.name)] = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process has exited meanwhile
            continue
    return found
