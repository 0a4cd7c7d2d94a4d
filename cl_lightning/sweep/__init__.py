"""``cl-lightning sweep``: hyperparameter grids x seeds on Ray Tune, selected on a validation split.

``grid_file`` reads the grid, ``trial`` runs one ``fit`` per trial in its run folder, ``select``
picks the setting, ``status`` prints the live status, ``run`` ties them together on Ray Tune.
Ray is an optional extra (``pip install cl_lightning[sweep]``); only ``run``/``status`` import it.
"""
