"""The callbacks every run has, which know no continual learning: ``guards`` (a diverged member is stopped),
``saving`` (checkpoints written atomically, one per task), ``signals`` (SIGTERM and Ctrl-C stop with a
checkpoint) and ``progress`` (the per-task progress line)."""
