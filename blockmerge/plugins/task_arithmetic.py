"""Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"; docs/methods.md §2).

    θ* = θ_0 + λ Σ_t (θ_t − θ_0)         (a sum of task vectors, as in every official code)

The composition Dense × no consensus of :mod:`blockmerge.plugins.task_vectors`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import Block, Method, Needs, docstring_summary
from .task_vectors import Dense, TaskVectorMerge


@dataclass(frozen=True)
class TaskArithmetic:
    scaling_factor: float = 1.0


def _merge(block: Block, hp: TaskArithmetic, state: Mapping[str, Any]) -> torch.Tensor:
    return TaskVectorMerge(Dense(), None, hp.scaling_factor).merge(block, state)


METHOD = Method(name="task_arithmetic", description=docstring_summary(__doc__),
                hyperparameters=TaskArithmetic, merge=_merge,
                needs=lambda hp: Needs(base=True))
