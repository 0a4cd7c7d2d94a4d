"""The command line: ``console`` (the ``cl-lightning`` entry point: --help, --version and dispatch, without
torch), ``lightning_cli`` (LightningCLI for fit / validate / test), ``parse_errors`` (one-line answers to
argument mistakes), and the checks and records of a run that know the methods: ``preflight`` (inputs and
output folders before anything is created), ``checkpoints`` (``--ckpt_path`` against the config) and
``hparams`` (the TensorBoard HParams row)."""
