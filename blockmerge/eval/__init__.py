"""Evaluation of merged models on tasks, and hyperparameter sweeps over the public merge API."""
