"""How tests read the one-line message a user error ends ``cl-lightning`` with."""

import pytest

from cl_lightning.cli.lightning_cli import main


def user_error(argv: list[str]) -> str:
    """The one-line message ``cl-lightning`` exits with (a string exit code: no traceback)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = info.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    return message
