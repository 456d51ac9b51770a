"""Diagonal Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging";
docs/methods.md §5, §16).

    θ* = Σ_t c_t F̃_t ⊙ θ_t / Σ_t c_t F̃_t          (elementwise)

c_t = w_t (uniform, or the given weights normalised to sum to one), divided by ‖F_t‖₂ (one global
L2 norm per model over every merged tensor) when `normalize_fishers` is set. The floor F̃ follows
`zero_fisher`: `floor` → max(F_t, fisher_floor) for every model (where all Fishers are below the
floor this is the weighted average); `favor_target` → only model 0 is floored (there model 0 wins);
`zero` → no floor, and coordinates where Σ_t c_t F_t = 0 become 0.

The global norms are found by one pass over the blocks. Each row's sum of squares is computed in
float64 by a fixed pairwise tree, so it depends only on that row; the per-row sums are added exactly
(math.fsum) at the end. The norms, and so the merged bytes, are the same whatever the block size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import BlockmergeError
from .base import Block, Method, Needs, Pass, docstring_summary
from .hyperparameters import PerModel, each_model
from .ops import row_sums

ZeroFisher = Literal["floor", "favor_target", "zero"]


@dataclass(frozen=True)
class Fisher:
    weights: PerModel[float] | None = None
    fisher_floor: float = 1e-8
    zero_fisher: ZeroFisher = "floor"
    normalize_fishers: bool = False

    def __post_init__(self):
        if self.weights is not None and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            raise ValueError("weights must be non-negative with a positive sum")
        if not self.fisher_floor > 0:
            raise ValueError(f"fisher_floor must be positive, got {self.fisher_floor}")
        if self.zero_fisher not in ("floor", "favor_target", "zero"):
            raise ValueError(f"zero_fisher must be floor, favor_target or zero, got {self.zero_fisher!r}")


def fisher_merge(models: list[torch.Tensor], fishers: list[torch.Tensor], weights: list[float] | None = None,
                 fisher_floor: float = 1e-8, zero_fisher: ZeroFisher = "floor") -> torch.Tensor:
    """Σ_t c_t F̃_t θ_t / Σ_t c_t F̃_t with the floor rule of `zero_fisher`; `weights` are the c_t (uniform if None)."""
    if weights is None:
        weights = [1.0] * len(models)
    numerator = denominator = None
    for t, (theta, fisher, weight) in enumerate(zip(models, fishers, weights)):
        if zero_fisher == "floor" or (zero_fisher == "favor_target" and t == 0):
            fisher = fisher.clamp(min=fisher_floor)
        coefficient = fisher * weight
        if numerator is None:
            numerator, denominator = coefficient * theta, coefficient
        else:
            numerator += coefficient * theta
            denominator += coefficient
    if zero_fisher == "zero":
        empty = denominator == 0
        return torch.where(empty, 0.0, numerator / torch.where(empty, 1.0, denominator))
    return numerator / denominator


def _norm_pass() -> Pass:
    def map_(block: Block, hp: Fisher, state: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
        fishers = block.stats["fisher"]  # squares of float32/bfloat16/float16 values are exact in float64
        return torch.stack([row_sums(f.to(torch.float64).square()) for f in fishers]).cpu(), fishers[0].numel()

    def fold(acc, partial: tuple[torch.Tensor, int], block: Block) -> tuple[list[torch.Tensor], int]:
        sums, numel = acc if acc is not None else ([], 0)
        sums.append(partial[0])
        return sums, numel + partial[1]

    def finish(acc, hp: Fisher, state: Mapping[str, Any]) -> dict:
        if not acc or acc[1] == 0:
            return {"fisher_norms": None}  # nothing is merged
        sums = torch.cat(acc[0], dim=1)
        norms = tuple(math.sqrt(math.fsum(row.tolist())) for row in sums)
        for t, norm in enumerate(norms):
            if norm == 0:
                raise BlockmergeError(f"fisher: model {t}'s Fisher is zero on every merged parameter; "
                                      "normalize_fishers cannot divide by its norm")
        return {"fisher_norms": norms}

    return Pass(map_, fold, finish)


def _passes(hp: Fisher, kinds: frozenset[str]) -> list[Pass]:
    return [_norm_pass()] if hp.normalize_fishers else []


def coefficients(hp: Fisher, num_models: int, norms: tuple[float, ...] | None) -> list[float]:
    """c_t: the weights normalised to sum to one, each divided by its model's global Fisher norm if given."""
    weights = each_model(hp.weights, num_models, 1.0)
    total = sum(weights)
    weights = [w / total for w in weights]
    if norms is not None:
        weights = [w / n for w, n in zip(weights, norms)]
    return weights


def _check(hp: Fisher, num_models: int) -> None:
    if hp.zero_fisher == "favor_target" and hp.weights is not None and hp.weights[0] <= 0:
        raise ValueError("zero_fisher=favor_target needs a positive weight on model 0 (the target)")


def _merge(block: Block, hp: Fisher, state: Mapping[str, Any]) -> torch.Tensor:
    norms = state.get("fisher_norms") if hp.normalize_fishers else None
    weights = coefficients(hp, len(block.models), norms)
    return fisher_merge(block.models, block.stats["fisher"], weights, hp.fisher_floor, hp.zero_fisher)


METHOD = Method(name="fisher", description=docstring_summary(__doc__), hyperparameters=Fisher, merge=_merge,
                needs=lambda hp: Needs(statistics=("fisher",)), passes=_passes, check=_check)
