"""Passthrough: one model's tensors, optionally scaled (as mergekit's `passthrough`; docs/methods.md §31).

    θ* = s · θ_1          (s = `scale`, 1 by default; a number or a per-tensor schedule)

With mergekit's `slices` it assembles a model from layer ranges of others (a frankenmerge): each output
layer is one source layer, passed through.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import Block, Method, docstring_summary
from .hyperparameters import Scheduled


@dataclass(frozen=True)
class Passthrough:
    scale: Scheduled[float] = 1.0


def _merge(block: Block, hp: Passthrough, state: Mapping[str, Any]) -> torch.Tensor:
    return block.models[0] * hp.scale if hp.scale != 1.0 else block.models[0].clone()


METHOD = Method(name="passthrough", description=docstring_summary(__doc__), hyperparameters=Passthrough,
                merge=_merge, model_count=(1, 1))
