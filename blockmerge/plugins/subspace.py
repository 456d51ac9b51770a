"""What the subspace merges (TSV-M, Iso-C, Iso-CTS) share: task matrices, their SVDs, orthogonal factors."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import Block
from .ops import average, thread_count_independent

MatrixMerge = Callable[[list[torch.Tensor]], torch.Tensor]


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD U, S, Vᴴ (singular values descending), the same bits on any number of threads."""
    with thread_count_independent():
        return torch.linalg.svd(matrix, full_matrices=False)


def orthogonal_factor(matrix: torch.Tensor) -> torch.Tensor:
    """P Q from the thin SVD P Σ Q of `matrix`: the orthonormal matrix closest to it (its polar factor)."""
    p, _, q = svd(matrix)
    with thread_count_independent():
        return p @ q


def merge_task_vectors(block: Block, scaling_factor: float, matrices: MatrixMerge) -> torch.Tensor:
    """θ_0 + α Δ: Δ = `matrices(τ_1 … τ_T)` for a matrix, the mean task vector for any other tensor."""
    base = block.base
    taus = [m - base for m in block.models]
    if base.dim() != 2:
        return base + average(taus) * scaling_factor
    wide = torch.promote_types(base.dtype, torch.float32)  # no SVD in half precision
    with thread_count_independent():
        return base + (matrices([t.to(wide) for t in taus]) * scaling_factor).to(base.dtype)
