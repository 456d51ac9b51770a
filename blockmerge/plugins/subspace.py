"""What the subspace merges (TSV-M, Iso-C, Iso-CTS) share: task matrices, their SVDs, orthogonal factors."""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence

import torch

from .base import Block
from .ops import average, thread_count_independent

MatrixMerge = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD U, S, Vᴴ (singular values descending), the same bits on any number of threads."""
    with thread_count_independent():
        return torch.linalg.svd(matrix, full_matrices=False)


def orthogonal_factor(matrix: torch.Tensor) -> torch.Tensor:
    """P Q from the thin SVD P Σ Q of `matrix`: the orthonormal matrix closest to it (its polar factor)."""
    p, _, q = svd(matrix)
    with thread_count_independent():
        return p @ q


class TaskMatrices(Sequence[torch.Tensor]):
    """τ_t = θ_t − θ_0 in `dtype`, each made when it is read: one task matrix in memory at a time, not T."""

    def __init__(self, models: list[torch.Tensor], base: torch.Tensor, dtype: torch.dtype):
        self.models, self.base, self.dtype = models, base, dtype

    def __len__(self) -> int:
        return len(self.models)

    @typing.overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @typing.overload
    def __getitem__(self, index: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return torch.sub(self.models[index], self.base).to(self.dtype)


def total(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_t τ_t, added in order, holding one term at a time."""
    out = taus[0].clone()
    for t in range(1, len(taus)):
        out += taus[t]
    return out


def merge_task_vectors(block: Block, scaling_factor: float, matrices: MatrixMerge) -> torch.Tensor:
    """θ_0 + α Δ: Δ = `matrices(τ_1 … τ_T)` for a matrix, the mean task vector for any other tensor."""
    base = block.base
    if base.dim() != 2:
        return base + average([m - base for m in block.models]) * scaling_factor
    wide = torch.promote_types(base.dtype, torch.float32)  # no SVD in half precision
    with thread_count_independent():
        return base + (matrices(TaskMatrices(block.models, base, wide)) * scaling_factor).to(base.dtype)
