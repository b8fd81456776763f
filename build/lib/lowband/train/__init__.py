"""The runner: worker entry point, launcher, models, datasets, metrics, progress."""
