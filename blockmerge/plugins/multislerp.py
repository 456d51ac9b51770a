"""Multi-SLERP: spherical interpolation of several models by their weights, on the hypersphere through their
directions (as mergekit's `multislerp`, after Goddard's barycentric spherical interpolation; docs/methods.md §26).

With v_t = θ_t (or, with `task_vectors`, θ_t − θ_0), n_t = ‖v_t‖, u_t = v_t / (n_t + ε) and α_t the weights
(divided by their sum where `normalize_weights`), per tensor:

    m = Σ_t α_t u_t / ‖Σ_t α_t u_t‖                    (with two models and ‖Σ_t α_t u_t‖ < ε: Σ_t α_t v_t)
    τ = Σ_t α_t (u_t − (u_t · m) m),   r = ‖τ‖ + ε
    θ* = (Σ_t α_t n_t) (m cos r + τ sin(r) / r)       (+ θ_0 with task vectors)

Every quantity is a combination of the v_t, so one reduction pass (their exact Gram matrix over each
tensor) gives the coefficients, and the merge is elementwise within the block budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import BlockmergeError
from .base import Block, Method, Needs, docstring_summary, tensor_pass
from .hyperparameters import PerModel, Scheduled, each_model
from .ops import gram_matrix, pair_products, weighted_sum

GRAM = "multislerp.gram"


@dataclass(frozen=True)
class Multislerp:
    weights: PerModel[Scheduled[float]] | None = None
    normalize_weights: bool = True
    eps: float = 1e-8
    task_vectors: bool = False


def coefficients(gram: np.ndarray, weights: list[float], normalize: bool, eps: float) -> np.ndarray:
    """c with θ* = Σ_t c_t v_t, from the v_t's Gram matrix (float64); raises ValueError where the weighted
    directions of three or more models cancel."""
    alpha = np.asarray(weights, dtype=np.float64)
    if normalize:
        alpha = alpha / alpha.sum()
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    scale = 1.0 / (norms + eps)  # u_t = scale_t v_t
    units = gram * np.outer(scale, scale)
    mean_norm = math.sqrt(max(float(alpha @ units @ alpha), 0.0))
    if mean_norm < eps:
        if len(alpha) == 2:
            return alpha
        raise ValueError("the weighted directions of the models cancel (their mean has norm below eps)")
    m = alpha / mean_norm  # in the u basis
    along = units @ m  # u_t · m
    tangent = alpha - float(alpha @ along) * m
    r = math.sqrt(max(float(tangent @ units @ tangent), 0.0)) + eps
    y = m * math.cos(r) + tangent * (math.sin(r) / r)
    return float(alpha @ norms) * y * scale


def _vectors(block: Block, hp: Multislerp) -> list[torch.Tensor]:
    return [m - block.base for m in block.models] if hp.task_vectors else block.models


def _prepare(block: Block, hp: Multislerp, state: Mapping[str, Any]) -> list[float]:
    weights = each_model(hp.weights, len(block.models), 1.0)
    try:
        return coefficients(gram_matrix(state[GRAM][block.name]), weights, hp.normalize_weights, hp.eps).tolist()
    except ValueError as err:
        raise BlockmergeError(f"multislerp: {err}", param=block.name) from None


def _products(block: Block, hp: Multislerp, state: Mapping[str, Any]) -> torch.Tensor:
    return pair_products(_vectors(block, hp))


def _merge(block: Block, hp: Multislerp, state: Mapping[str, Any]) -> torch.Tensor:
    merged = weighted_sum(_vectors(block, hp), block.prepared)
    return merged.add_(block.base) if hp.task_vectors else merged


METHOD = Method(name="multislerp", description=docstring_summary(__doc__), hyperparameters=Multislerp,
                merge=_merge, needs=lambda hp: Needs(base=hp.task_vectors), prepare=_prepare,
                passes=lambda hp, kinds: [tensor_pass(GRAM, _products)])
