"""TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models"; docs/methods.md §4, §16).

    τ_t = θ_t − θ_0;   τ̂_t = τ_t where |τ_t| ≥ thr_t, else 0      (trim: keep int(d·K)+1 entries and ties)
    γ_j = sign(Σ_t τ̂_t,j), zeros filled with the majority sign sign(Σ_j γ_j) (0 → +1)
    τ*_j = Σ_t [sign(τ̂_t,j) = γ_j] τ̂_t,j / max(1, #{t : sign(τ̂_t,j) = γ_j})
    θ* = θ_0 + λ τ*

`trim=global` takes thr_t over every merged float tensor of model t, `block` within each tensor;
given `trimmed` statistics (τ̂_t) are used as they are. The thresholds are exact k-th order
statistics (:mod:`blockmerge.plugins.magnitude`); the majority sign takes one more pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .base import Block, Method, Needs, Pass, docstring_summary
from .magnitude import group_of, magnitude_passes, slices, trimmed_or_given, trimmed_task_vectors
from .ops import summed


@dataclass(frozen=True)
class Ties:
    density: float = 0.2
    scaling_factor: float = 1.0
    trim: Literal["global", "block"] = "global"
    majority_sign: Literal["global", "block"] = "global"

    def __post_init__(self):
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")


def elect_and_merge(trimmed: list[torch.Tensor], majority_sign: int) -> torch.Tensor:
    """The disjoint mean τ* of trimmed task vectors, with the elected sign's zeros set to majority_sign.

    Written in float arithmetic only (no boolean masks, which are several times slower on the CPU):
    with γ = ±1, an entry agrees when t·γ > 0, and Σ relu(t·γ) is the agreeing entries' |sum|.
    """
    elected = summed(trimmed).sign_().add_(0.5 * majority_sign).sign_()  # sign(sign(Σ) + m/2): zeros take m
    magnitude = torch.mul(trimmed[0], elected).relu_()
    count = torch.sign(magnitude)
    for t in trimmed[1:]:
        agreeing = torch.mul(t, elected).relu_()
        magnitude += agreeing
        count += agreeing.sign_()
    return magnitude.div_(count.clamp_(min=1.0)).mul_(elected)


def _majority_pass(hp: Ties) -> Pass:
    def sign_sum(block: Block, hp: Ties, state: Mapping[str, Any]) -> int:
        thresholds = state["threshold"][group_of(block, hp.trim)] if "trimmed" not in block.stats else []
        total = 0
        for models, base, given in slices(block):
            trimmed = trimmed_or_given(models, base, given, thresholds)
            total += int(summed(trimmed).sign_().sum(dtype=torch.float64))
        return total

    def fold(acc, partial, block):
        acc = acc if acc is not None else {}
        group = group_of(block, hp.majority_sign)
        acc[group] = acc.get(group, 0) + partial
        return acc

    def finish(acc, hp: Ties, state: Mapping[str, Any]) -> dict:
        return {"majority": {g: 1 if s >= 0 else -1 for g, s in acc.items()}}

    return Pass(sign_sum, fold, finish)


def _passes(hp: Ties, kinds: frozenset[str]) -> list[Pass]:
    trimming = [] if "trimmed" in kinds else magnitude_passes(hp.density, hp.trim)
    return [*trimming, _majority_pass(hp)]


def _merge(block: Block, hp: Ties, state: Mapping[str, Any]) -> torch.Tensor:
    majority = state["majority"][group_of(block, hp.majority_sign)]
    merged = elect_and_merge(trimmed_task_vectors(block, hp.trim, state), majority)
    return merged.mul_(hp.scaling_factor).add_(block.base)


METHOD = Method(name="ties", description=docstring_summary(__doc__), hyperparameters=Ties, merge=_merge,
                needs=lambda hp: Needs(base=True, optional_statistics=("trimmed",)), passes=_passes)
