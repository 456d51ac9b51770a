"""Evaluation of merged models on tasks, and hyperparameter sweeps over the public merge API."""

from .evaluate import evaluate, evaluate_task, load_model
from .metrics import METRICS, accuracy, macro_f1, score
from .sweep import candidates, dirichlet_weights, parse_grid, search, simplex_grid, sweep
from .tasks import Task, load_tasks

__all__ = ["METRICS", "Task", "accuracy", "candidates", "dirichlet_weights", "evaluate", "evaluate_task",
           "load_model", "load_tasks", "macro_f1", "parse_grid", "score", "search", "simplex_grid", "sweep"]
