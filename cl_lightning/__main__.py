"""``python -m cl_lightning`` = ``cl-lightning``."""

from cl_lightning.console import main  # answers --help and --version without importing torch

main()
