"""Nearswap: take the second model where it is near the base (as mergekit's `nearswap`; docs/methods.md §22).

Elementwise, with θ_0 the base and θ_1 the one other model:

    λ = clamp(t / max(|θ_0 − θ_1|, 1e-6), 0, 1)
    θ* = λ θ_1 + (1 − λ) θ_0

Where the models differ by at most t, θ_1 is taken whole; larger differences keep less of it. mergekit
requires t and has no default; blockmerge's 0.001 is a small difference for weights of order 0.01-0.1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import Block, Method, Needs, docstring_summary
from .hyperparameters import Scheduled, values_of

DIFFERENCE_FLOOR = 1e-6


@dataclass(frozen=True)
class Nearswap:
    t: Scheduled[float] = 0.001

    def __post_init__(self):
        if any(v < 0 for v in values_of(self.t)):
            raise ValueError(f"t must be non-negative, got {self.t}")


def nearswap(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    """λ θ_1 + (1 − λ) θ_0 with λ = clamp(t / max(|θ_0 − θ_1|, 1e-6), 0, 1)."""
    weight = torch.sub(base, model).abs_().clamp_(min=DIFFERENCE_FLOOR).reciprocal_().mul_(t).clamp_(0.0, 1.0)
    return torch.lerp(base, model, weight)


def _merge(block: Block, hp: Nearswap, state: Mapping[str, Any]) -> torch.Tensor:
    return nearswap(block.base, block.models[0], hp.t)


METHOD = Method(name="nearswap", description=docstring_summary(__doc__), hyperparameters=Nearswap, merge=_merge,
                needs=lambda hp: Needs(base=True), model_count=(1, 1))
