"""TSV-M: Task Singular Vectors merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference
in Model Merging", CVPR; docs/methods.md §33).

For each matrix (2-D tensor) of shape m × n, k = min(m, n), T task matrices τ_t = θ_t − θ_0, r = ⌊k / T⌋:

    τ_t = U_t S_t V_tᵀ                                   (thin SVD; each task keeps its top r components)
    U = [U_1[:, :r] … U_T[:, :r]],  S = diag(S_1[:r] … S_T[:r]),  Vᵀ = [V_1ᵀ[:r]; … ; V_Tᵀ[:r]]
    U⊥ = P_u Q_u  (U = P_u Σ Q_u),   V⊥ᵀ = P_v Q_v  (Vᵀ = P_v Σ Q_v)      (the nearest orthonormal factors)
    θ* = θ_0 + α U⊥ S V⊥ᵀ

Each task keeps its own singular values; the decorrelation replaces the concatenated singular vectors by
their polar factors. Every other tensor is θ_0 + α · mean_t τ_t. A matrix with fewer columns than tasks
(r = 0) keeps θ_0. α (`scaling_factor`) is 1.0: the official evaluation also sweeps it over 0.1 … 3.0 on
validation. The whole matrix and its T task matrices are in memory at once (`tensor` granularity); SVDs in
the compute dtype, on the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import Block, Method, Needs, docstring_summary
from .subspace import merge_task_vectors, orthogonal_factor, svd


@dataclass(frozen=True)
class TsvM:
    scaling_factor: float = 1.0


def task_singular_vectors(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Δ = U⊥ S V⊥ᵀ of the task matrices `taus` (the merged update before α)."""
    left, values, right = [], [], []
    for tau in taus:
        rank = min(tau.shape) // len(taus)
        if rank == 0:
            return torch.zeros_like(tau)
        u, s, vh = svd(tau)
        left.append(u[:, :rank].clone())  # copies: a view would keep the whole factor
        values.append(s[:rank].clone())
        right.append(vh[:rank].clone())
    return (orthogonal_factor(torch.cat(left, dim=1)) * torch.cat(values)) @ orthogonal_factor(torch.cat(right))


def _merge(block: Block, hp: TsvM, state: Mapping[str, Any]) -> torch.Tensor:
    return merge_task_vectors(block, hp.scaling_factor, task_singular_vectors)


METHOD = Method(name="tsv_m", description=docstring_summary(__doc__), hyperparameters=TsvM, merge=_merge,
                needs=lambda hp: Needs(base=True), granularity="tensor")
