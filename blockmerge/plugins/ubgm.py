"""Uncertainty-based gradient matching (Daheim et al. 2024, UBGM; docs/methods.md §8, §16).

Paper: "Model Merging by Uncertainty-Based Gradient Matching" (ICLR 2024).

    P  = 1 / (α Σ_t s_t H_t + s_0 H_0 + δ0)
    θ* = θ_0 + α Σ_t P ⊙ (s_t H_t + s_0 H_0 + δ0) ⊙ (θ_t − θ_0)          (elementwise)

H_t is the `fisher` statistic of model t, H_0 the `fisher` of the base; α = `scaling_factor`,
s_0 = `base_scale`, s_t = `model_scales` (1.0 each by default), δ0 = `delta0`. Each
P ⊙ (s_t H_t + s_0 H_0 + δ0) is computed as one division, so all-zero Hessians give exactly
δ0/δ0 = 1 and the result is task arithmetic with λ = α, to the bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import Block, Method, Needs, docstring_summary
from .hyperparameters import PerModel, each_model


@dataclass(frozen=True)
class Ubgm:
    scaling_factor: float = 1.0
    delta0: float = 1e-12
    base_scale: float = 1.0
    model_scales: PerModel[float] | None = None

    def __post_init__(self):
        if self.delta0 < 0:
            raise ValueError(f"delta0 must be non-negative, got {self.delta0}")
        if self.base_scale < 0:
            raise ValueError(f"base_scale must be non-negative, got {self.base_scale}")
        if self.model_scales is not None and any(s < 0 for s in self.model_scales):
            raise ValueError("model_scales must be non-negative")


def ubgm(models: list[torch.Tensor], base: torch.Tensor, hessians: list[torch.Tensor], base_hessian: torch.Tensor,
         scaling_factor: float = 1.0, delta0: float = 1e-12, base_scale: float = 1.0,
         model_scales: list[float] | None = None) -> torch.Tensor:
    """θ_0 + α Σ_t (s_t H_t + s_0 H_0 + δ0) / (α Σ_t s_t H_t + s_0 H_0 + δ0) ⊙ (θ_t − θ_0)."""
    scales = list(model_scales) if model_scales is not None else [1.0] * len(models)
    prior = base_hessian * base_scale + delta0
    scaled = [h * s for h, s in zip(hessians, scales)]
    total = scaled[0].clone()
    for h in scaled[1:]:
        total += h
    denominator = total * scaling_factor + prior
    out = None
    for theta, h in zip(models, scaled):
        term = (h + prior) / denominator * (theta - base)
        out = term if out is None else out.add_(term)
    return base + out * scaling_factor


def _merge(block: Block, hp: Ubgm, state: Mapping[str, Any]) -> torch.Tensor:
    return ubgm(block.models, block.base, block.stats["fisher"], block.base_stats["fisher"], hp.scaling_factor,
                hp.delta0, hp.base_scale, each_model(hp.model_scales, len(block.models), 1.0))


METHOD = Method(name="ubgm", description=docstring_summary(__doc__), hyperparameters=Ubgm, merge=_merge,
                needs=lambda hp: Needs(base=True, statistics=("fisher",), base_statistics=("fisher",)))
