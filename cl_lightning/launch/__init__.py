"""Starting ``cl-lightning fit`` processes for ``grid`` and ``sweep``: one way to launch, stop,
resume and set aside a fit, so that both commands leave the same run folders behind.
:mod:`~cl_lightning.launch.grid` is the ``grid`` command (``sweep``, the optional Ray part, has its own package).

:mod:`~cl_lightning.launch.process` runs one fit in a child process and passes the launcher's
signals on to it; :mod:`~cl_lightning.launch.jobs` decides from the run folder how a fit starts and
what its ending leaves there. What the folders hold is :mod:`cl_lightning.rundir`'s.
"""
