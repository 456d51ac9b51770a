"""RAM: Reinforced Agent Merging (arXiv 2601.13572; as mergekit's `ram` and, with r > 0, `ramplus_tl`;
docs/methods.md §28).

With τ_t = θ_t − θ_0, a_t = [|τ_t| > ε] and c = Σ_t a_t, elementwise:

    θ* = θ_0 + Σ_t a_t τ_t · (λ_t where c = 1, 1/c where c > 1)

An entry changed by one model keeps that model's change; entries changed by several take their mean.
λ_t = 1 without `r` (RAM); RAM+ (tensor-local) boosts each model's unique entries by
λ_t = 1 + r · clamp(s_t / max(u_t, ε), 0, α), with s_t and u_t the counts of model t's shared (c > 1)
and unique (c = 1) entries in the tensor, found by one reduction pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import Block, Method, Needs, docstring_summary, tensor_pass
from .ops import row_sums

BOOSTS = "ram.boosts"


@dataclass(frozen=True)
class Ram:
    epsilon: float = 1e-5
    r: float = 0.0
    alpha: float = 0.2

    def __post_init__(self):
        if self.epsilon < 0 or self.r < 0 or self.alpha < 0:
            raise ValueError(f"epsilon, r and alpha must be non-negative, got {self.epsilon}, {self.r}, {self.alpha}")


def _active(block: Block, hp: Ram) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The task vectors, where each is active, and how many models are active per entry."""
    taus = [m - block.base for m in block.models]
    active = [t.abs() > hp.epsilon for t in taus]
    count = torch.zeros_like(block.base)
    for a in active:
        count += a
    return taus, active, count


def _counts(block: Block, hp: Ram, state: Mapping[str, Any]) -> torch.Tensor:
    """Per row: each model's shared, then unique, active entries (float64)."""
    _, active, count = _active(block, hp)
    shared = [row_sums((a & (count > 1)).double()) for a in active]
    unique = [row_sums((a & (count == 1)).double()) for a in active]
    return torch.stack(shared + unique, dim=1).cpu()


def _boosts(sums: list[float], hp: Ram, name: str) -> list[float]:
    half = len(sums) // 2
    return [1.0 + hp.r * min(max(shared / max(unique, hp.epsilon), 0.0), hp.alpha)
            for shared, unique in zip(sums[:half], sums[half:])]


def _merge(block: Block, hp: Ram, state: Mapping[str, Any]) -> torch.Tensor:
    taus, active, count = _active(block, hp)
    boosts = state[BOOSTS][block.name] if hp.r else [1.0] * len(taus)
    mean = count.clamp(min=1.0).reciprocal_()
    merged = block.base.clone()
    for tau, a, boost in zip(taus, active, boosts):
        factor = mean.masked_fill(count == 1, boost) * a
        merged.addcmul_(tau, factor)
    return merged


METHOD = Method(name="ram", description=docstring_summary(__doc__), hyperparameters=Ram, merge=_merge,
                needs=lambda hp: Needs(base=True),
                passes=lambda hp, kinds: [tensor_pass(BOOSTS, _counts, _boosts)] if hp.r else [])
