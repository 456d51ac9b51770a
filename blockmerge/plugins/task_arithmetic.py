"""Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"; docs/methods.md §2).

    θ* = θ_0 + λ Σ_t (θ_t − θ_0)         (a sum of task vectors, as in every official code)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Block, Method, docstring_summary


@dataclass(frozen=True)
class TaskArithmetic:
    scaling_factor: float = 1.0


def task_vector_sum(models: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Σ_t (θ_t − θ_0), summed in model order."""
    out = models[0] - base
    for m in models[1:]:
        out += m - base
    return out


def task_arithmetic(models: list[torch.Tensor], base: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    return base + task_vector_sum(models, base) * scaling_factor


def _merge(block: Block, hp: TaskArithmetic, state: dict) -> torch.Tensor:
    return task_arithmetic(block.models, block.base, hp.scaling_factor)


METHOD = Method(name="task_arithmetic", description=docstring_summary(__doc__),
                hyperparameters=TaskArithmetic, merge=_merge, needs_base=True)
