"""DARE: drop and rescale task vectors (Yu et al. 2024, "Language Models are Super Mario"; docs/methods.md §3).

    θ* = θ_0 + λ Σ_t m_t ⊙ (θ_t − θ_0) / (1 − p),   m_t,j ~ Bernoulli(1 − p)

(no division when `rescale` is false; p = 1 gives zeros, as `torch.nn.functional.dropout`).
Element j of a mask is kept when a uniform 32-bit draw u_j < round((1 − p)·2³²). The draws of
elements [c·C, (c+1)·C) of a parameter come from an SFC64 generator seeded by (seed, parameter
name, model index, c), on the CPU, so a mask is the same whatever the block size, device or order
of work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import Block, Method, Needs, docstring_summary

CHUNK = 1 << 16


@dataclass(frozen=True)
class Dare:
    drop_rate: float = 0.9
    scaling_factor: float = 1.0
    seed: int = 0
    rescale: bool = True

    def __post_init__(self):
        if not 0.0 <= self.drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {self.drop_rate}")


def keep_mask(seed: int, name: str, model: int, offset: int, numel: int, drop_rate: float) -> torch.Tensor:
    """Elements offset..offset+numel of the flattened keep-mask of one model's parameter (on the CPU)."""
    if drop_rate >= 1.0 or numel == 0:
        return torch.zeros(numel, dtype=torch.bool)
    if drop_rate <= 0.0:
        return torch.ones(numel, dtype=torch.bool)
    below = np.uint32(min(round((1.0 - drop_rate) * 2**32), 2**32 - 1))
    keep = np.empty(numel, dtype=bool)
    for chunk in range(offset // CHUNK, (offset + numel - 1) // CHUNK + 1):
        key = hashlib.blake2b(f"{seed}\0{name}\0{model}\0{chunk}".encode(), digest_size=8).digest()
        draws = np.random.SFC64(int.from_bytes(key, "little")).random_raw(CHUNK // 2).view(np.uint32)
        a, b = max(offset, chunk * CHUNK), min(offset + numel, (chunk + 1) * CHUNK)
        np.less(draws[a - chunk * CHUNK:b - chunk * CHUNK], below, out=keep[a - offset:b - offset])
    return torch.from_numpy(keep)


def masked_scale(keep: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 tensor holding `scale` where `keep` is true and 0 elsewhere (on the mask's CPU)."""
    # the bits of scale times 1 or 0: several times faster than a float conversion or `where`
    bits = np.multiply(keep.numpy(), np.float32(scale).view(np.uint32), dtype=np.uint32)
    return torch.from_numpy(bits.view(np.float32))


def dare(models: list[torch.Tensor], base: torch.Tensor, masks: list[torch.Tensor], drop_rate: float,
         scaling_factor: float, rescale: bool) -> torch.Tensor:
    """θ_0 + λ Σ_t m_t ⊙ τ_t (/ (1 − p)), with explicit boolean masks (on the CPU)."""
    scale = scaling_factor / (1.0 - drop_rate) if rescale and drop_rate < 1.0 else scaling_factor
    total = torch.zeros_like(base)
    for m, keep in zip(models, masks):
        total.addcmul_(torch.sub(m, base), masked_scale(keep.reshape(-1), scale).view(base.shape).to(base.device))
    return total.add_(base)


def _merge(block: Block, hp: Dare, state: Mapping[str, Any]) -> torch.Tensor:
    numel = block.base.numel()
    masks = [keep_mask(hp.seed, block.name, t, block.offset, numel, hp.drop_rate) for t in range(len(block.models))]
    return dare(block.models, block.base, masks, hp.drop_rate, hp.scaling_factor, hp.rescale)


METHOD = Method(name="dare", description=docstring_summary(__doc__), hyperparameters=Dare,
                merge=_merge, needs=lambda hp: Needs(base=True))
