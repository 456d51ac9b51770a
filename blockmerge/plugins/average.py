"""Simple average (Wortsman et al. 2022, "Model soups"; docs/methods.md §1).

    θ* = Σ_t w_t θ_t,   w_t = 1/T, or the given weights normalised to sum to one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import Block, Method, docstring_summary
from .hyperparameters import PerModel, each_model
from .ops import average


@dataclass(frozen=True)
class Average:
    weights: PerModel[float] | None = None

    def __post_init__(self):
        if self.weights is not None and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            raise ValueError("weights must be non-negative with a positive sum")


def _merge(block: Block, hp: Average, state: Mapping[str, Any]) -> torch.Tensor:
    return average(block.models, each_model(hp.weights, len(block.models), 1.0))


METHOD = Method(name="average", description=docstring_summary(__doc__), hyperparameters=Average,
                merge=_merge, linear=True)
