"""Iso-CTS: isotropic merging in the common and task-specific subspaces (Marczak et al. 2025, "No Task Left
Behind: Isotropic Model Merging with Common and Task-Specific Subspaces", ICML; docs/methods.md §35).

For each matrix (2-D tensor) of shape m × n, k = min(m, n), T task matrices τ_t = θ_t − θ_0, and
f = `common_space_fraction`:

    c = k − T · min(round((k − ⌊k f⌋) / T), ⌊k / T⌋),   n_t = (k − c) / T     (round: half to even)
    Σ_t τ_t = U S Vᵀ;   U_c, S_c, V_cᵀ = U[:, :c], S[:c], Vᵀ[:c]        (the common subspace)
    τ̂_t = τ_t − U_c U_cᵀ τ_t = u_t s_t v_tᵀ                          (each task outside it, thin SVD)
    U = [u_1[:, :n_t] … u_T[:, :n_t]  U_c],   s = [s_1[:n_t] … s_T[:n_t]  S_c],   Vᵀ = [v_1ᵀ[:n_t]; …; v_Tᵀ[:n_t]; V_cᵀ]
    θ* = θ_0 + α · mean(s) · U⊥ V⊥ᵀ                                  (U⊥, V⊥ᵀ: polar factors of U, Vᵀ)

Every other tensor is θ_0 + α · mean_t τ_t. `common_space_fraction` 0.8 and α (`scaling_factor`) 1.0 as the
official code defaults them; its evaluation sweeps α over 0.1 … 3.0 on validation. The whole matrix and its T
task matrices are in memory at once (`tensor` granularity); SVDs in the compute dtype, on the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import Block, Method, Needs, docstring_summary
from .subspace import merge_task_vectors, orthogonal_factor, svd, total


@dataclass(frozen=True)
class IsoCts:
    scaling_factor: float = 1.0
    common_space_fraction: float = 0.8

    def __post_init__(self):
        if not 0.0 <= self.common_space_fraction <= 1.0:
            raise ValueError(f"common_space_fraction must be in [0, 1], got {self.common_space_fraction}")


def subspace_sizes(k: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(c, n_t): the common subspace's size and each task's, c + T n_t = k."""
    task_total = min(round((k - int(k * common_space_fraction)) / tasks), k // tasks) * tasks
    common = k - task_total
    return common, task_total // tasks


def common_and_task_specific(taus: Sequence[torch.Tensor], common_space_fraction: float) -> torch.Tensor:
    """mean(s) · U⊥ V⊥ᵀ over the common and task-specific subspaces (the merged update before α)."""
    summed = total(taus)
    common, per_task = subspace_sizes(min(summed.shape), len(taus), common_space_fraction)
    u, s, vh = svd(summed)
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    left, values, right = [], [], []
    for tau in taus:
        tu, ts, tvh = svd(tau - u_c @ (u_c.T @ tau))
        left.append(tu[:, :per_task].clone())  # copies: a view would keep the whole factor
        values.append(ts[:per_task].clone())
        right.append(tvh[:per_task].clone())
    values = torch.cat([*values, s_c])
    return (orthogonal_factor(torch.cat([*left, u_c], dim=1)) @ orthogonal_factor(torch.cat([*right, vh_c]))
            * values.mean())


def _merge(block: Block, hp: IsoCts, state: Mapping[str, Any]) -> torch.Tensor:
    return merge_task_vectors(block, hp.scaling_factor, lambda taus: common_and_task_specific(
        taus, hp.common_space_fraction))


METHOD = Method(name="iso_cts", description=docstring_summary(__doc__), hyperparameters=IsoCts, merge=_merge,
                needs=lambda hp: Needs(base=True), granularity="tensor")
