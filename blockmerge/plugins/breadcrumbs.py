"""Model Breadcrumbs (Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks"; as mergekit's `breadcrumbs` and `breadcrumbs_ties`; docs/methods.md §24).

Each model's task vector τ_t = θ_t − θ_0 loses, within each tensor of K entries, its n_top largest
and n_bot smallest magnitudes (equal magnitudes in index order):

    n_top = int(γ_t·K),   n_bot = K − int(d_t·K) − n_top   (if n_bot < 0: n_top += n_bot, n_bot = 0)
    τ̂_t = τ_t on positions [n_bot, K − n_top) of its ascending magnitude order, else 0
    θ* = θ_0 + λ Σ_t w_t τ̂_t / Z,   Z = Σ_t w_t with `normalize`, else 1       (consensus none)
    θ* = θ_0 + λ (TIES's sign election over the w_t τ̂_t, + where they sum to 0)  (consensus sign)

`rescale: l1` scales each tensor's τ̂_t to the L1 norm of τ_t. Where int(γ·K) = 0, mergekit keeps
nothing of the tensor (its band's end is written as −n_top); blockmerge keeps [n_bot, K). The
defaults are the values mergekit's documentation gives (mergekit's own density default, 1, keeps
everything).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .base import Block, Method, Needs, docstring_summary
from .hyperparameters import PerModel, Scheduled, each_model, values_of
from .magnitude import Band, Bands
from .task_vectors import Magnitude, TaskVectorMerge, composed


@dataclass(frozen=True)
class Breadcrumbs:
    density: PerModel[Scheduled[float]] = 0.9
    gamma: PerModel[Scheduled[float]] = 0.01
    scaling_factor: Scheduled[float] = 1.0
    consensus: Literal["none", "sign"] = "none"
    weights: PerModel[Scheduled[float]] | None = None
    normalize: bool = False
    rescale: bool | Literal["l1"] = False

    def __post_init__(self):
        if not all(0.0 <= v <= 1.0 for v in (*values_of(self.density), *values_of(self.gamma))):
            raise ValueError(f"density and gamma must be in [0, 1], got {self.density} and {self.gamma}")
        if self.rescale is True:
            raise ValueError("rescale is l1 or false (a band has no keep probability to divide by)")


@dataclass(frozen=True)
class OutlierBand(Bands):
    """Each model's band [n_bot, K − n_top) of its ascending magnitude order."""

    densities: float | tuple[float, ...]
    gammas: float | tuple[float, ...]

    def bands(self, numel: int, nonzero: list[int]) -> list[Band]:
        out = []
        models = len(nonzero)
        for density, gamma in zip(each_model(self.densities, models), each_model(self.gammas, models)):
            top = int(numel * gamma)
            bottom = numel - int(numel * density) - top
            if bottom < 0:
                top, bottom = top + bottom, 0
            out.append(Band(bottom, numel - top))
        return out


def recipe(hp: Breadcrumbs) -> TaskVectorMerge:
    """Breadcrumbs as a composition: the magnitude band (L1-rescaled) × consensus."""
    return composed(Magnitude(OutlierBand(hp.density, hp.gamma), "block"), hp)


def _merge(block: Block, hp: Breadcrumbs, state: Mapping[str, Any]) -> torch.Tensor:
    return recipe(hp).merge(block, state)


METHOD = Method(name="breadcrumbs", description=docstring_summary(__doc__), hyperparameters=Breadcrumbs,
                merge=_merge, needs=lambda hp: Needs(base=True),
                passes=lambda hp, kinds: recipe(hp).passes(kinds, recipe))
