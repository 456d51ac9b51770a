"""DARE: drop and rescale task vectors (Yu et al. 2024, "Language Models are Super Mario"; docs/methods.md §3).

    θ* = θ_0 + λ Σ_t m_t ⊙ (θ_t − θ_0) / (1 − p),   m_t,j ~ Bernoulli(1 − p)

(no division when `rescale` is false; p = 1 gives zeros, as `torch.nn.functional.dropout`).
Element j of a mask is kept when a uniform 32-bit draw u_j < round((1 − p)·2³²). The draws of
elements [c·C, (c+1)·C) of a parameter come from an SFC64 generator seeded by (seed, parameter
name, model index, c), on the CPU, so a mask is the same whatever the block size, device or order
of work. DARE is the composition RandomDrop × no consensus of :mod:`blockmerge.plugins.task_vectors`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import Block, Method, Needs, docstring_summary
from .task_vectors import RandomDrop, TaskVectorMerge


@dataclass(frozen=True)
class Dare:
    drop_rate: float = 0.9
    scaling_factor: float = 1.0
    seed: int = 0
    rescale: bool = True

    def __post_init__(self):
        if not 0.0 <= self.drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {self.drop_rate}")


def recipe(hp: Dare) -> TaskVectorMerge:
    """DARE as a composition: random drop (and rescale) × no consensus."""
    return TaskVectorMerge(RandomDrop(hp.drop_rate, hp.seed, hp.rescale), None, hp.scaling_factor)


def _merge(block: Block, hp: Dare, state: Mapping[str, Any]) -> torch.Tensor:
    return recipe(hp).merge(block, state)


METHOD = Method(name="dare", description=docstring_summary(__doc__), hyperparameters=Dare,
                merge=_merge, needs=lambda hp: Needs(base=True))
