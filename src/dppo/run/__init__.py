"""Training runs: configuration, command line, trainer, checkpoints, metrics, warm-up, machine record."""
