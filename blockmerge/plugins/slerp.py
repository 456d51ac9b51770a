"""SLERP: spherical linear interpolation of two models (Shoemake 1985, "Animating Rotation with Quaternion
Curves"; as mergekit's `slerp`; docs/methods.md §17).

For each tensor, with a = θ_1 and b = θ_2 (the two models, in order) as flat vectors:

    â = a / ‖a‖ (a itself if ‖a‖ ≤ 1e-8), b̂ likewise;   d = â · b̂;   Ω = arccos d
    θ* = (1 − t) a + t b                                      if |d| > 0.9995
    θ* = sin((1 − t) Ω) / sin Ω · a + sin(t Ω) / sin Ω · b      otherwise

t = 0 gives the first model, t = 1 the second; `t` may differ per tensor (a gradient over the layers,
name filters). ‖a‖², ‖b‖² and a · b are summed exactly over each tensor in one reduction pass, so the
merge itself is elementwise and stays within the block budget whatever the tensor's size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import Block, Method, docstring_summary, tensor_pass
from .hyperparameters import Scheduled
from .ops import pair_products

DOT_THRESHOLD = 0.9995  # closer to parallel (or anti-parallel) than this: linear interpolation
NORM_EPSILON = 1e-8  # a tensor with a smaller norm is not normalised
COSINE = "slerp.cosine"  # state: d of each tensor


@dataclass(frozen=True)
class Slerp:
    t: Scheduled[float] = 0.5


def _products(block: Block, hp: Slerp, state: Mapping[str, Any]) -> torch.Tensor:
    """Per row: Σ a², Σ b², Σ a·b in float64 (products of float32 values are exact there)."""
    return pair_products(block.models)[:, [0, 2, 1]]


def cosine(aa: float, bb: float, ab: float) -> float:
    """d = â · b̂ from ‖a‖², ‖b‖² and a · b."""
    norm_a, norm_b = math.sqrt(aa), math.sqrt(bb)
    return ab / ((norm_a if norm_a > NORM_EPSILON else 1.0) * (norm_b if norm_b > NORM_EPSILON else 1.0))


def coefficients(t: float, d: float) -> tuple[float, float]:
    """The weights of a and b at t, for normalised dot product d."""
    if abs(d) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(d)
    return math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


def _merge(block: Block, hp: Slerp, state: Mapping[str, Any]) -> torch.Tensor:
    weight_a, weight_b = coefficients(hp.t, state[COSINE][block.name])
    a, b = block.models
    return torch.mul(a, weight_a).add_(b, alpha=weight_b)


METHOD = Method(name="slerp", description=docstring_summary(__doc__), hyperparameters=Slerp, merge=_merge,
                passes=lambda hp, kinds: [tensor_pass(COSINE, _products, lambda sums, hp, name: cosine(*sums))],
                model_count=(2, 2))
