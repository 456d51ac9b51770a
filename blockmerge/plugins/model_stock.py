"""Model Stock (Jang et al. 2024, "Model Stock: All We Need Is Just a Few Fine-Tuned Models"; as mergekit's
`model_stock`; docs/methods.md §21).

For each tensor, with the task vectors τ_k = θ_k − θ_0 of N ≥ 2 models:

    cos_kl = clamp(τ_k · τ_l / max(‖τ_k‖ ‖τ_l‖, 1e-6), −1, 1),   c = the mean of cos_kl over pairs k < l
    t = N c / (1 + (N − 1) c)
    θ* = t · (1/N) Σ_k θ_k + (1 − t) θ_0

The dot products are exact sums over each tensor (one reduction pass), so the merge is elementwise and
stays within the block budget. With `filter_wise` (mergekit's option) each row of a matrix has its own t from
its own task vectors (a vector is one row).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import BlockmergeError
from .base import Block, Method, Needs, docstring_summary, tensor_pass
from .ops import average, gram_matrix, gram_pairs, pair_products

COSINE_FLOOR = 1e-6  # the least product of norms a cosine is divided by
RATIO = "model_stock.t"  # state: t of each tensor


@dataclass(frozen=True)
class ModelStock:
    """The interpolation ratio comes from the task vectors' angles, over each tensor or (`filter_wise`) each row."""

    filter_wise: bool = False


def _products(block: Block, hp: ModelStock, state: Mapping[str, Any]) -> torch.Tensor:
    """Per row: τ_k · τ_j for every pair k ≤ j, in float64 (products of float32 values are exact there)."""
    return pair_products([m - block.base for m in block.models])


def ratio(gram: np.ndarray) -> float:
    """t from the Gram matrix of the task vectors."""
    count = gram.shape[0]
    cosines = []
    for k, j in itertools.combinations(range(count), 2):
        norms = math.sqrt(gram[k, k]) * math.sqrt(gram[j, j])
        cosines.append(min(1.0, max(-1.0, gram[k, j] / max(norms, COSINE_FLOOR))))
    c = sum(cosines) / len(cosines)
    denominator = 1.0 + (count - 1) * c
    if denominator == 0.0:
        raise ValueError(f"the task vectors' mean cosine is -1/{count - 1}: t = N c / (1 + (N − 1) c) is infinite")
    return count * c / denominator


def _finish(sums: list[float], hp: ModelStock, name: str) -> float:
    try:
        return ratio(gram_matrix(sums))
    except ValueError as err:
        raise BlockmergeError(f"model_stock: {err}", param=name) from None


def row_ratios(products: torch.Tensor, count: int) -> torch.Tensor:
    """t of each row from its task vectors' dot products ([rows, pairs] in `gram_pairs` order), float64."""
    pairs = {pair: products[:, i] for i, pair in enumerate(gram_pairs(count))}
    cosines = [(pairs[(k, j)] / (pairs[(k, k)].sqrt() * pairs[(j, j)].sqrt()).clamp(min=COSINE_FLOOR)).clamp(-1, 1)
               for k, j in itertools.combinations(range(count), 2)]
    c = torch.stack(cosines).mean(0)
    return count * c / (1.0 + (count - 1) * c)


def _merge(block: Block, hp: ModelStock, state: Mapping[str, Any]) -> torch.Tensor:
    if hp.filter_wise and block.base.dim() >= 2:
        t = row_ratios(pair_products([m - block.base for m in block.models]), len(block.models))
        if not torch.isfinite(t).all():
            raise BlockmergeError("model_stock: a row's task vectors have a mean cosine of -1/(N - 1): t is infinite",
                                  param=block.name)
        t = t.to(block.base.dtype).to(block.base.device).reshape(-1, *[1] * (block.base.dim() - 1))
        return average(block.models).mul_(t).add_(block.base * (1.0 - t))
    t = state[RATIO][block.name]
    return average(block.models).mul_(t).add_(block.base, alpha=1.0 - t)


METHOD = Method(name="model_stock", description=docstring_summary(__doc__), hyperparameters=ModelStock,
                merge=_merge, needs=lambda hp: Needs(base=True),
                passes=lambda hp, kinds: [tensor_pass(RATIO, _products, _finish)], model_count=(2, None))
