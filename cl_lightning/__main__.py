"""``python -m cl_lightning`` = ``cl-lightning``."""

from cl_lightning.cli.console import main  # answers --help and --version without importing torch

main()
