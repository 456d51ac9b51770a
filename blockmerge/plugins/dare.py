"""DARE: drop and rescale task vectors (Yu et al. 2024, "Language Models are Super Mario"; docs/methods.md §3).

    τ̂_t = m_t ⊙ (θ_t − θ_0) / (1 − p_t),   m_t,j ~ Bernoulli(1 − p_t)
    θ* = θ_0 + λ Σ_t w_t τ̂_t / Z,   Z = Σ_t w_t with `normalize`, else 1                 (consensus none)
    θ* = θ_0 + λ (TIES's sign election over the w_t τ̂_t, + where they sum to 0)          (consensus sign)

`rescale`: true divides by 1 − p_t as the paper does, `l1` scales each tensor's τ̂_t to the L1 norm of
its τ_t (mergekit's rescale), false keeps τ̂ as dropped; p = 1 gives zeros. mergekit's `dare_linear`
is consensus none and `dare_ties` consensus sign, both with `rescale: l1` and `drop_rate = 1 − density`.
Element j of a mask is kept when a uniform 32-bit draw u_j < round((1 − p)·2³²). The draws of
elements [c·C, (c+1)·C) of a parameter come from an SFC64 generator seeded by (seed, parameter
name, model index, c), on the CPU, so a mask is the same whatever the block size, device or order
of work. DARE is the composition RandomDrop × consensus of :mod:`blockmerge.plugins.task_vectors`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .base import Block, Method, Needs, docstring_summary
from .hyperparameters import PerModel, Scheduled, values_of
from .task_vectors import RandomDrop, TaskVectorMerge, composed


@dataclass(frozen=True)
class Dare:
    drop_rate: PerModel[Scheduled[float]] = 0.9
    scaling_factor: Scheduled[float] = 1.0
    seed: int = 0
    rescale: bool | Literal["l1"] = True
    consensus: Literal["none", "sign"] = "none"
    weights: PerModel[Scheduled[float]] | None = None
    normalize: bool = False

    def __post_init__(self):
        if not all(0.0 <= p <= 1.0 for p in values_of(self.drop_rate)):
            raise ValueError(f"drop_rate must be in [0, 1], got {self.drop_rate}")


def recipe(hp: Dare) -> TaskVectorMerge:
    """DARE as a composition: random drop (and rescale) × consensus."""
    return composed(RandomDrop(hp.drop_rate, hp.seed, hp.rescale is True), hp)


def _merge(block: Block, hp: Dare, state: Mapping[str, Any]) -> torch.Tensor:
    return recipe(hp).merge(block, state)


METHOD = Method(name="dare", description=docstring_summary(__doc__), hyperparameters=Dare, merge=_merge,
                needs=lambda hp: Needs(base=True), passes=lambda hp, kinds: recipe(hp).passes(kinds, recipe))
