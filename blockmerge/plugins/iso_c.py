"""Iso-C: isotropic merging in the common subspace (Marczak et al. 2025, "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces", ICML; docs/methods.md §34).

For each matrix (2-D tensor), with T task matrices τ_t = θ_t − θ_0:

    Σ_t τ_t = U S Vᵀ                          (thin SVD, k = min(m, n) singular values)
    θ* = θ_0 + α · mean(S) · U Vᵀ             (the spectrum flattened to its mean)

Every other tensor is θ_0 + α · mean_t τ_t. α (`scaling_factor`) is 1.0: the official evaluation sweeps it over
0.1 … 3.0 on validation. The whole matrix and its T task matrices are in memory at once (`tensor`
granularity); the SVD in the compute dtype, on the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import Block, Method, Needs, docstring_summary
from .subspace import merge_task_vectors, svd, total


@dataclass(frozen=True)
class IsoC:
    scaling_factor: float = 1.0


def isotropic_sum(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean(S) · U Vᵀ of Σ_t τ_t = U S Vᵀ (the merged update before α)."""
    u, s, vh = svd(total(taus))
    return (u @ vh) * s.mean()


def _merge(block: Block, hp: IsoC, state: Mapping[str, Any]) -> torch.Tensor:
    return merge_task_vectors(block, hp.scaling_factor, isotropic_sum)


METHOD = Method(name="iso_c", description=docstring_summary(__doc__), hyperparameters=IsoC, merge=_merge,
                needs=lambda hp: Needs(base=True), granularity="tensor")
