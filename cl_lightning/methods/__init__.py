"""Continual-learning methods, each a Lightning callback.

Importing this package registers them with the command line, so ``--trainer.callbacks+=MCSGD``
works without the full class path.
"""

from cl_lightning.methods.agem import AGEM
from cl_lightning.methods.er import ER
from cl_lightning.methods.ewc import EWC
from cl_lightning.methods.mcsgd import MCSGD

#: The method callbacks, whose state a checkpoint must carry for a run to resume.
METHODS = (AGEM, ER, EWC, MCSGD)

__all__ = ["AGEM", "ER", "EWC", "MCSGD", "METHODS"]
