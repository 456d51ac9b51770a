"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models"; docs/methods.md §6.1, §16).

For an nn.Linear weight W_t [out, in] with input Gram G_t [in, in] (`gram_in`):

    G̃_t = α G_t + (1 − α) diag(G_t)                      (off-diagonals scaled by α, diagonal kept)
    W*  = ((Σ_t G̃_t)^{-1} Σ_t G̃_t W_tᵀ)ᵀ,   so   W*[rows] = (Σ_t W_t[rows] G̃_t) (Σ_t G̃_t)^{-1}

The inverse is explicit (`torch.linalg.inv`, as MaTS / GIT-THETA); W_t G̃_t is computed as
α W_t G_t + (1 − α) W_t diag(G_t), so no reduced copy of a Gram is made. If the sum is singular, the
indices whose row sum is not 0 are kept, that sub-matrix is inverted and written into a copy of the
sum: a feature that is dead in every model gives a 0 column of W*. Parameters without a Gram
(biases, norms, embeddings) are averaged by the engine. Computation is in the block's dtype.

The closed form decomposes by output rows: a row block needs only the whole Grams. The row
products are done in fixed chunks of ROW_CHUNK rows aligned to the parameter's row index (a partial
chunk is zero-padded), so every row goes through the same matrix product whatever the block size,
and the merged bytes do not depend on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BlockmergeError
from .base import Block, Method, Needs, docstring_summary
from .ops import inverse_with_fallback, summed, thread_count_independent

ROW_CHUNK = 256


@dataclass(frozen=True)
class RegMean:
    alpha: float = 0.9

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass
class Prepared:
    """What every row block of one weight shares: the Grams, their diagonals and the (fallback) inverse of
    Σ_t G̃_t. The reduced Grams G̃_t are never formed: W G̃ = α W G + (1 − α) W diag(G)."""

    grams: list[torch.Tensor]
    diagonals: list[torch.Tensor]
    alpha: float
    inverse: torch.Tensor


def prepare(grams: list[torch.Tensor], alpha: float) -> Prepared:
    """The Grams' diagonals and the (fallback) inverse of Σ_t G̃_t, with one matrix of workspace."""
    total = summed(grams)
    diagonal = total.diagonal().clone()
    total.mul_(alpha).diagonal().copy_(diagonal)
    return Prepared(grams, [g.diagonal().clone() for g in grams], alpha, inverse_with_fallback(total))


def regmean_rows(models: list[torch.Tensor], prepared: Prepared, first_row: int = 0) -> torch.Tensor:
    """(Σ_t W_t G̃_t) (Σ_t G̃_t)^{-1} for rows first_row.. of the weights, in chunks aligned to ROW_CHUNK rows."""
    rows = models[0].shape[0]
    out = torch.empty_like(models[0])
    if rows == 0:
        return out
    alpha = prepared.alpha
    chunk = models[0].new_zeros(ROW_CHUNK, models[0].shape[1])
    stop = first_row + rows
    for chunk_start in range(first_row - first_row % ROW_CHUNK, stop, ROW_CHUNK):
        lo, hi = max(chunk_start, first_row), min(chunk_start + ROW_CHUNK, stop)
        a, b = lo - chunk_start, hi - chunk_start
        numerator = None
        for weight, gram, diagonal in zip(models, prepared.grams, prepared.diagonals):
            chunk[a:b] = weight[lo - first_row:hi - first_row]
            product = chunk @ gram
            if alpha != 1.0:
                product.mul_(alpha).add_(chunk * diagonal, alpha=1.0 - alpha)
            numerator = product if numerator is None else numerator.add_(product)
        out[lo - first_row:hi - first_row] = (numerator @ prepared.inverse)[a:b]
    return out


def regmean(models: list[torch.Tensor], grams: list[torch.Tensor], alpha: float, first_row: int = 0) -> torch.Tensor:
    """RegMean of weight rows W_t[first_row:first_row + rows] [rows, in] with whole Grams G_t [in, in]."""
    return regmean_rows(models, prepare(grams, alpha), first_row)


def _prepare(block: Block, hp: RegMean, state: Mapping[str, Any]) -> Prepared:
    try:
        return prepare(block.stats["gram_in"], hp.alpha)
    except ValueError as err:
        raise BlockmergeError(f"regmean: {err}", param=block.name) from None


def _merge(block: Block, hp: RegMean, state: Mapping[str, Any]) -> torch.Tensor:
    with thread_count_independent():  # MKL's small matrix products give other bits on other thread counts
        return regmean_rows(block.models, block.prepared, block.start)


METHOD = Method(name="regmean", description=docstring_summary(__doc__), hyperparameters=RegMean, merge=_merge,
                needs=lambda hp: Needs(statistics=("gram_in",)), granularity="rows", prepare=_prepare)
