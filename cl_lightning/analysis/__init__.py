"""The reproduction harness: runs of a grid (``runs``), the paper's table (``report``), linear paths
between solutions (``linear_path``) and their figures (``plots``)."""
