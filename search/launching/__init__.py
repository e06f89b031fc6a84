"""Launching a study: opening it in its Optuna storage with its sampler, the launch itself, and how a
launch ends."""
