"""``python -m cl_lightning`` = ``cl-lightning``."""

from cl_lightning.cli import main

main()
