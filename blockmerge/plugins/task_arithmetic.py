"""Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"; docs/methods.md §2).

    θ* = θ_0 + λ Σ_t w_t (θ_t − θ_0) / Z,   Z = Σ_t w_t with `normalize`, else 1      (w_t = 1 by default)

With unit weights and no normalisation it is the sum of task vectors of every official code;
weights, `normalize` and λ per tensor are mergekit's `task_arithmetic`. The composition
Dense × no consensus of :mod:`blockmerge.plugins.task_vectors`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import Block, Method, Needs, docstring_summary
from .hyperparameters import PerModel, Scheduled
from .task_vectors import Dense, TaskVectorMerge


@dataclass(frozen=True)
class TaskArithmetic:
    scaling_factor: Scheduled[float] = 1.0
    weights: PerModel[Scheduled[float]] | None = None
    normalize: bool = False


def _merge(block: Block, hp: TaskArithmetic, state: Mapping[str, Any]) -> torch.Tensor:
    return TaskVectorMerge(Dense(), None, hp.scaling_factor, hp.weights, hp.normalize).merge(block, state)


METHOD = Method(name="task_arithmetic", description=docstring_summary(__doc__),
                hyperparameters=TaskArithmetic, merge=_merge,
                needs=lambda hp: Needs(base=True), linear=True)
