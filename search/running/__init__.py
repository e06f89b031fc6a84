"""Running trials: one trial, a worker's population and loop, their MLflow runs, and their checkpoints
on disk."""
