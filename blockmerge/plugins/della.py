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


def probabilities(width: int, density: float, epsilon: float) -> np.ndarray:
    """p of each rank 0…width − 1 within a row (float64)."""
    if width == 1:
        return np.full(1, density)
    return np.arange(width, dtype=np.float64) * (2 * epsilon / (width - 1)) + (density - epsilon)


def rank_order(rows: torch.Tensor) -> torch.Tensor:
    """For each row of a 2-D tensor, the columns of its entries by ascending |τ| (equal magnitudes in index order).

    Each entry is keyed by its magnitude's bit pattern (non-negative floats order as integers) above its column,
    so one plain sort of the 64-bit keys gives the stable order, several times faster than a stable argsort.
    """
    if rows.dtype == torch.float64:  # 64-bit magnitudes leave no room for the column
        return torch.argsort(rows.abs().view(torch.int64), dim=1, stable=True)
    bits = rows.abs().to(torch.float32).view(torch.int32).numpy()
    keys = np.empty((*bits.shape, 2), dtype=np.int32)  # little-endian int64: column low, magnitude high
    keys[..., 0] = np.arange(bits.shape[1], dtype=np.int32)
    keys[..., 1] = bits
    ordered = np.sort(keys.view(np.int64)[..., 0], axis=1)
    return torch.from_numpy(ordered.view(np.int32).reshape(*bits.shape, 2)[..., 0].astype(np.int64))


def ranked_drop(task_vector: torch.Tensor, density: float, epsilon: float, draws: np.ndarray,
                rescale: bool) -> torch.Tensor:
    """τ (on the CPU) with each entry kept where its draw u < p·2³² (p from its rank), divided by p where
    `rescale`."""
    rows = task_vector.reshape(task_vector.shape[0] if task_vector.dim() > 1 else 1, -1)
    p = probabilities(rows.shape[1], density, epsilon)
    order = rank_order(rows)
    # u < p·2³² for an integer u exactly when u < ceil(p·2³²); both sides shifted by 2³¹ into int32's order
    shifted = torch.from_numpy((draws.view(np.int32) ^ np.int32(-2**31)).reshape(rows.shape))
    bounds = torch.from_numpy(np.ceil(p * 2.0**32).astype(np.int64) - 2**31)
    kept_by_rank = shifted.gather(1, order) < bounds
    if not rescale:
        keep = torch.empty(rows.shape, dtype=torch.bool).scatter_(1, order, kept_by_rank)
        return task_vector.mul(keep.reshape(task_vector.shape))
    by_rank = torch.from_numpy(1.0 / p).expand(rows.shape).where(kept_by_rank, 0.0)
    factors = torch.empty(rows.shape, dtype=torch.float64).scatter_(1, order, by_rank)
    return (task_vector.to(torch.float64) * factors.reshape(task_vector.shape)).to(task_vector.dtype)


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
                draws = uniform_draws(self.seed, block.name, t, block.offset, task_vector.numel())
                task_vector = ranked_drop(task_vector, density, epsilon, draws, self.rescale)
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
