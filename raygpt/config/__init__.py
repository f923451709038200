"""A run's configuration: the TrainConfig schema (nanoGPT's keys, each with its role), nanoGPT-format
config files, and `--key=value` overrides. No Ray, no disk reads in validation."""
