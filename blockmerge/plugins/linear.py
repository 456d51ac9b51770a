"""Linear: a weighted sum of the models, as mergekit's `linear` (Wortsman et al. 2022, "Model soups";
docs/methods.md §20).

    θ* = Σ_t w_t θ_t / Σ_t w_t        (normalize, the default)
    θ* = Σ_t w_t θ_t                  (normalize false)

Each weight w_t may differ per tensor (a gradient over the layers, name filters), so one model can
give the attention layers and another the MLPs. Weights default to 1 (with normalize: the average).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BlockmergeError
from .base import Block, Method, docstring_summary
from .hyperparameters import PerModel, Scheduled


@dataclass(frozen=True)
class Linear:
    weights: PerModel[Scheduled[float]] | None = None
    normalize: bool = True


def weighted_sum(models: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """Σ_t w_t θ_t, divided by Σ_t w_t where `normalize`."""
    total = sum(weights) if normalize else 1.0
    if total == 0.0:
        raise ValueError("the weights sum to 0 and normalize is set")
    out = models[0] * (weights[0] / total)
    for w, m in zip(weights[1:], models[1:]):
        out.add_(m, alpha=w / total)
    return out


def _merge(block: Block, hp: Linear, state: Mapping[str, Any]) -> torch.Tensor:
    weights = list(hp.weights) if hp.weights is not None else [1.0] * len(block.models)
    try:
        return weighted_sum(block.models, weights, hp.normalize)
    except ValueError as err:
        raise BlockmergeError(f"linear: {err}", param=block.name) from None


METHOD = Method(name="linear", description=docstring_summary(__doc__), hyperparameters=Linear, merge=_merge)
