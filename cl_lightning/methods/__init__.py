"""Continual-learning methods, each a Lightning callback subclassing :class:`~cl_lightning.methods.base.Method`.

One file per method; :func:`~cl_lightning.methods.registry.registered_methods` finds them all (and
registers their short names with the command line, ``--trainer.callbacks+=MCSGD``).
"""
