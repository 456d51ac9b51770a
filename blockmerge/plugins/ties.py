"""TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models"; docs/methods.md §4, §16).

    τ_t = θ_t − θ_0;   τ̂_t = τ_t where |τ_t| ≥ thr_t, else 0      (trim: keep int(d·K)+1 entries and ties)
    γ_j = sign(Σ_t w_t τ̂_t,j), zeros filled with the majority sign sign(Σ_j γ_j) (0 → +1)
    τ*_j = Σ_t [sign(τ̂_t,j) = γ_j] w_t τ̂_t,j / Σ_t [sign(τ̂_t,j) = γ_j] w_t      (w_t = 1: the disjoint mean)
    θ* = θ_0 + λ τ*

`trim=global` takes thr_t over every merged float tensor of model t, `block` within each tensor;
given `trimmed` statistics (τ̂_t) are used as they are. The thresholds are exact k-th order
statistics (:mod:`blockmerge.plugins.magnitude`); the majority sign takes one more pass. mergekit's
`ties` is `trim=block, exact_count=true, majority_sign=plus`: exactly int(d·K) entries per tensor
(equal magnitudes in index order) and + where the weighted sum is 0. Without `normalize` the
agreeing entries are summed, not averaged; `rescale: l1` scales each tensor's τ̂_t to the L1 norm of τ_t
(mergekit's `rescale`). TIES is the composition Magnitude × SignElection of
:mod:`blockmerge.plugins.task_vectors`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .base import Block, Method, Needs, docstring_summary
from .hyperparameters import PerModel, Scheduled, values_of
from .magnitude import TopCount, TopDensity
from .task_vectors import L1Rescaled, Magnitude, SignElection, TaskVectorMerge


@dataclass(frozen=True)
class Ties:
    density: PerModel[Scheduled[float]] = 0.2
    scaling_factor: Scheduled[float] = 1.0
    trim: Literal["global", "block"] = "global"
    majority_sign: Literal["global", "block", "plus"] = "global"
    exact_count: bool = False
    weights: PerModel[Scheduled[float]] | None = None
    normalize: bool = True
    rescale: bool | Literal["l1"] = False

    def __post_init__(self):
        if not all(0.0 < d <= 1.0 for d in values_of(self.density)):
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.rescale is True:
            raise ValueError("rescale is l1 or false (a trim has no keep probability to divide by)")


def recipe(hp: Ties) -> TaskVectorMerge:
    """TIES as a composition: exact magnitude trim × sign election."""
    bands = TopCount(hp.density) if hp.exact_count else TopDensity(hp.density)
    sparsifier: Any = Magnitude(bands, hp.trim)
    if hp.rescale == "l1":
        sparsifier = L1Rescaled(sparsifier)
    return TaskVectorMerge(sparsifier, SignElection(hp.majority_sign), hp.scaling_factor, hp.weights, hp.normalize)


def _merge(block: Block, hp: Ties, state: Mapping[str, Any]) -> torch.Tensor:
    return recipe(hp).merge(block, state)


METHOD = Method(name="ties", description=docstring_summary(__doc__), hyperparameters=Ties, merge=_merge,
                needs=lambda hp: Needs(base=True, optional_statistics=("trimmed",)),
                passes=lambda hp, kinds: recipe(hp).passes(kinds, recipe))
