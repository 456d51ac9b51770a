"""Karcher mean: the Riemannian centre of mass of the models' directions, scaled by their mean norm (as mergekit's
`karcher`; docs/methods.md §27).

With n_t = ‖θ_t‖ and u_t = θ_t / n_t over each tensor, the models with n_t > tol, weights â_t = 1/(their
number), and u the normalised Σ_t â_t u_t (the first u_t where that sum is below tol), each of
`max_iter` steps

    θ_t = arccos clamp(u · u_t, −1, 1);   T = Σ_{t: θ_t ≥ tol} â_t θ_t / sin θ_t · (u_t − cos θ_t u)
    u ← cos‖T‖ u + sin‖T‖ T / ‖T‖, normalised       (stop where ‖T‖ < tol)

and θ* = (Σ_t n_t / N) u over all N models (zeros where no model has a norm above tol). u stays a
combination of the u_t, so the iteration runs on N coefficients from one reduction pass (the exact
Gram matrix of the models over each tensor), and the merge is elementwise within the block budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import Block, Method, docstring_summary, tensor_pass
from .ops import gram_matrix, pair_products, weighted_sum

GRAM = "karcher.gram"


@dataclass(frozen=True)
class Karcher:
    max_iter: int = 10
    tol: float = 1e-5

    def __post_init__(self):
        if self.max_iter < 0 or self.tol <= 0:
            raise ValueError(f"max_iter must be ≥ 0 and tol > 0, got {self.max_iter} and {self.tol}")


def coefficients(gram: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """c with θ* = Σ_t c_t θ_t, from the models' Gram matrix (float64)."""
    count = len(gram)
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    kept = np.flatnonzero(norms > tol)
    if kept.size == 0:
        return np.zeros(count)
    scale = 1.0 / norms[kept]
    units = gram[np.ix_(kept, kept)] * np.outer(scale, scale)
    weights = np.full(kept.size, 1.0 / kept.size)

    def norm(c: np.ndarray) -> float:
        return math.sqrt(max(float(c @ units @ c), 0.0))

    u = weights.copy()
    if norm(u) < tol:
        u = np.eye(kept.size)[0]
    else:
        u = u / norm(u)
    for _ in range(max_iter):
        cos = np.clip(units @ u, -1.0, 1.0)
        theta = np.arccos(cos)
        step = np.zeros(kept.size)
        for i in np.flatnonzero(theta >= tol):
            term = weights[i] * theta[i] / math.sin(theta[i])
            step[i] += term
            step -= term * cos[i] * u
        length = norm(step)
        if length < tol:
            break
        u = math.cos(length) * u + math.sin(length) * step / length
        if norm(u) > tol:
            u = u / norm(u)
    out = np.zeros(count)
    out[kept] = float(norms.sum() / count) * u * scale
    return out


def _prepare(block: Block, hp: Karcher, state: Mapping[str, Any]) -> list[float]:
    return coefficients(gram_matrix(state[GRAM][block.name]), hp.max_iter, hp.tol).tolist()


def _merge(block: Block, hp: Karcher, state: Mapping[str, Any]) -> torch.Tensor:
    return weighted_sum(block.models, block.prepared)


METHOD = Method(name="karcher", description=docstring_summary(__doc__), hyperparameters=Karcher, merge=_merge,
                prepare=_prepare,
                passes=lambda hp, kinds: [tensor_pass(GRAM, lambda block, at, state: pair_products(block.models))])
