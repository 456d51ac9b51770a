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
from .hyperparameters import PerModel, Scheduled, each_model
from .ops import weighted_sum


@dataclass(frozen=True)
class Linear:
    weights: PerModel[Scheduled[float]] | None = None
    normalize: bool = True


def _merge(block: Block, hp: Linear, state: Mapping[str, Any]) -> torch.Tensor:
    weights = each_model(hp.weights, len(block.models), 1.0)
    divisor = sum(weights) if hp.normalize else 1.0
    if divisor == 0.0:
        raise BlockmergeError("linear: the weights sum to 0 and normalize is set", param=block.name)
    return weighted_sum(block.models, weights, divisor)


METHOD = Method(name="linear", description=docstring_summary(__doc__), hyperparameters=Linear, merge=_merge,
                linear=True)
