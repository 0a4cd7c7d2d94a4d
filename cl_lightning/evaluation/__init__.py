"""Evaluation of a model on the task sequence: the accuracy-matrix callback and the evaluation of
models outside Lightning's loop. It sits above ``data`` and ``models`` (it needs both) and below
``methods`` (MC-SGD evaluates its w_hat chain with it); ``metrics`` stays free of both."""
