"""NuSLERP: spherical interpolation of two models by their weights, whole tensors or row by row, of the models or
of their task vectors (as mergekit's `nuslerp`; docs/methods.md §23).

With v_1, v_2 the two models (or, with `task_vectors`, their task vectors θ_k − θ_0) and weights w_1, w_2:

    t = w_2 / (w_1 + w_2)   (0.5 where |w_1 + w_2| < 1e-6)
    u_k = v_k / max(‖v_k‖, 1e-7);   Ω = arccos clamp(u_1 · u_2, −1, 1)
    v* = (sin((1 − t) Ω) v_1 + sin(t Ω) v_2) / sin Ω      ((1 − t) v_1 + t v_2 where |sin Ω| < 1e-8)
    θ* = v*   (θ_0 + v* with task_vectors)

`flatten` takes each tensor as one vector (its norms and dot product from one reduction pass, exact);
otherwise each vector along a tensor's last dimension has its own angle (a vector tensor is one vector).
Weights may differ per tensor (layer gradients, name filters).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import Block, Method, Needs, docstring_summary, tensor_pass
from .hyperparameters import PerModel, Scheduled, each_model
from .ops import pair_products, row_sums

UNIT_FLOOR = 1e-7  # the least norm a vector is divided by
SIN_FLOOR = 1e-8  # a smaller |sin Ω| interpolates linearly
WEIGHT_SUM_FLOOR = 1e-6
PRODUCTS = "nuslerp.products"  # state: (v1·v1, v2·v2, v1·v2) of each tensor


@dataclass(frozen=True)
class Nuslerp:
    weights: PerModel[Scheduled[float]] | None = None
    flatten: bool = True
    task_vectors: bool = False


def position(weights: list[float]) -> float:
    """t = w_2 / (w_1 + w_2), 0.5 for weights summing to about 0."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < WEIGHT_SUM_FLOOR else weights[1] / total


def _vectors(block: Block, hp: Nuslerp) -> tuple[torch.Tensor, torch.Tensor]:
    if hp.task_vectors:
        return block.models[0] - block.base, block.models[1] - block.base
    return block.models[0], block.models[1]


def _products(block: Block, hp: Nuslerp, state: Mapping[str, Any]) -> torch.Tensor:
    return pair_products(list(_vectors(block, hp)))[:, [0, 2, 1]]


def weights_of(aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of v_1 and v_2 for vectors with these (float64) squared norms and dot products."""
    cos = (ab / (aa.sqrt().clamp(min=UNIT_FLOOR) * bb.sqrt().clamp(min=UNIT_FLOOR))).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    linear = sin.abs() < SIN_FLOOR
    safe = torch.where(linear, 1.0, sin)
    first = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * omega) / safe)
    second = torch.where(linear, t, torch.sin(t * omega) / safe)
    return first, second


def _merge(block: Block, hp: Nuslerp, state: Mapping[str, Any]) -> torch.Tensor:
    t = position(each_model(hp.weights, 2, 1.0))
    a, b = _vectors(block, hp)
    if hp.flatten or a.dim() < 2:
        aa, bb, ab = (torch.tensor(x, dtype=torch.float64) for x in state[PRODUCTS][block.name])
        first, second = weights_of(aa, bb, ab, t)
        merged = torch.mul(a, float(first)).add_(b, alpha=float(second))
    else:
        width = a.shape[-1]
        a64, b64 = a.reshape(-1, width).to(torch.float64), b.reshape(-1, width).to(torch.float64)
        first, second = weights_of(row_sums(a64 * a64), row_sums(b64 * b64), row_sums(a64 * b64), t)
        merged = (a64 * first[:, None] + b64 * second[:, None]).to(a.dtype).reshape(a.shape)
    return merged.add_(block.base) if hp.task_vectors else merged


def _passes(hp: Nuslerp, kinds: frozenset[str]):
    return [tensor_pass(PRODUCTS, _products)]


METHOD = Method(name="nuslerp", description=docstring_summary(__doc__), hyperparameters=Nuslerp, merge=_merge,
                needs=lambda hp: Needs(base=hp.task_vectors), passes=_passes, granularity="rows",
                model_count=(2, 2))
