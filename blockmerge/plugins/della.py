"""DELLA-Merging (Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling"; as mergekit's `della` and `della_linear`; docs/methods.md §25).

Within each row of τ_t = θ_t − θ_0 (a tensor of at most one dimension is one row) of n entries, the
entry of rank r = 0…n−1 by ascending |τ| (equal magnitudes in index order) is kept with probability

    p_j = d_t − ε_t + 2 ε_t · r / (n − 1)         (d_t where n = 1; d_t ≥ 1 keeps all, d_t ≤ 0 none)
    τ̂_t,j = m_j τ_t,j / p_j,   m_j ~ Bernoulli(p_j)                    (rescale true; l1: see below)
    θ* = θ_0 + λ (TIES's sign election over the w_t τ̂_t, + where they sum to 0) / Z   (consensus sign)
    θ* = θ_0 + λ Σ_t w_t τ̂_t / Z                                               (consensus none)

with Z as in task arithmetic (Σ w over the agreeing models with sign consensus) where `normalize`.
0 < d − ε and d + ε < 1 are required. `rescale: l1` scales each tensor's τ̂_t to the L1 norm of its
τ_t (mergekit's rescale). mergekit's `della` is consensus sign with normalize, `della_linear`
consensus none without; both rescale by L1. A draw u_j (uniform 32-bit, seeded by seed, parameter,
model and element as DARE's) keeps the entry when u_j < p_j·2³², so a mask is the same whatever the
block size, device or order of work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..errors import BlockmergeError
from .base import Block, Method, Needs, Pass, docstring_summary
from .hyperparameters import PerModel, Scheduled, each_model, values_of
from .task_vectors import Resolved, TaskVectorMerge, composed, uniform_draws, weighted


@dataclass(frozen=True)
class Della:
    density: PerModel[Scheduled[float]] = 0.5
    epsilon: PerModel[Scheduled[float]] = 0.15
    scaling_factor: Scheduled[float] = 1.0
    seed: int = 0
    consensus: Literal["none", "sign"] = "sign"
    weights: PerModel[Scheduled[float]] | None = None
    normalize: bool = True
    rescale: bool | Literal["l1"] = True

    def __post_init__(self):
        if any(e < 0 for e in values_of(self.epsilon)):
            raise ValueError(f"epsilon must be non-negative, got {self.epsilon}")


def keep_probabilities(task_vector: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p_j of each entry (float64) from its rank within its row."""
    rows = task_vector.reshape(task_vector.shape[0] if task_vector.dim() > 1 else 1, -1)
    width = rows.shape[1]
    if width == 1:
        return torch.full(task_vector.shape, density, dtype=torch.float64)
    magnitudes = rows.abs()  # ordered as their bit patterns: non-negative floats sort as integers, faster
    order = torch.argsort(magnitudes.view(torch.int32 if magnitudes.dtype == torch.float32 else torch.int64), dim=1,
                          stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(width).expand_as(order).contiguous())
    return (rank.to(torch.float64) * (2 * epsilon / (width - 1)) + (density - epsilon)).reshape(task_vector.shape)


@dataclass(frozen=True)
class RankedDrop:
    """Each model's entries kept with probabilities from their magnitude ranks within each row (MAGPRUNE), divided by
    them where `rescale`."""

    densities: Any
    epsilons: Any
    seed: int
    rescale: bool

    def passes(self, kinds: frozenset[str], resolved: Resolved) -> list[Pass]:
        return []

    def apply(self, block: Block, state: Mapping[str, Any]) -> list[torch.Tensor]:
        count = len(block.models)
        out = []
        for t, (m, density, epsilon) in enumerate(zip(block.models, each_model(self.densities, count),
                                                       each_model(self.epsilons, count))):
            task_vector = (m - block.base).cpu()
            if density <= 0.0:
                task_vector.zero_()
            elif density < 1.0:
                if not (density - epsilon > 0.0 and density + epsilon < 1.0):
                    raise BlockmergeError(f"della: density ± epsilon must lie inside (0, 1), got density {density} "
                                          f"and epsilon {epsilon} for model {t}", param=block.name)
                p = keep_probabilities(task_vector, density, epsilon)
                draws = uniform_draws(self.seed, block.name, t, block.offset, task_vector.numel())
                keep = torch.from_numpy(draws.astype(np.float64)).reshape(p.shape) < p * 2.0**32
                if self.rescale:
                    task_vector = (task_vector.to(torch.float64) * keep * p.reciprocal()).to(task_vector.dtype)
                else:
                    task_vector.mul_(keep)
            out.append(task_vector.to(block.base.device))
        return out

    def scaled_sum(self, block: Block, state: Mapping[str, Any], coefficients: list[float]) -> torch.Tensor:
        return weighted(self.apply(block, state), coefficients)


def recipe(hp: Della) -> TaskVectorMerge:
    """DELLA as a composition: ranked drop (rescaled) × consensus."""
    return composed(RankedDrop(hp.density, hp.epsilon, hp.seed, hp.rescale is True), hp)


def _merge(block: Block, hp: Della, state: Mapping[str, Any]) -> torch.Tensor:
    return recipe(hp).merge(block, state)


METHOD = Method(name="della", description=docstring_summary(__doc__), hyperparameters=Della, merge=_merge,
                needs=lambda hp: Needs(base=True), granularity="rows",
                passes=lambda hp, kinds: recipe(hp).passes(kinds, recipe))
