"""Simple average (Wortsman et al. 2022, "Model soups"; docs/methods.md §1).

    θ* = Σ_t w_t θ_t,   w_t = 1/T, or the given weights normalised to sum to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Block, Method, docstring_summary


@dataclass(frozen=True)
class Average:
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.weights is not None and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            raise ValueError("weights must be non-negative with a positive sum")


def average(models: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
    """The weighted mean of same-shaped tensors; uniform weights when none are given."""
    if weights is None:
        weights = [1.0] * len(models)
    total = sum(weights)
    out = models[0] * (weights[0] / total)
    for w, m in zip(weights[1:], models[1:]):
        out.add_(m, alpha=w / total)
    return out


def _check(hp: Average, num_models: int) -> None:
    if hp.weights is not None and len(hp.weights) != num_models:
        raise ValueError(f"weights has {len(hp.weights)} entries for {num_models} models")


def _merge(block: Block, hp: Average, state: dict) -> torch.Tensor:
    return average(block.models, list(hp.weights) if hp.weights else None)


METHOD = Method(name="average", description=docstring_summary(__doc__), hyperparameters=Average,
                merge=_merge, check=_check)
