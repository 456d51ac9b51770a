"""DARE: drop and rescale task vectors (Yu et al. 2024, "Language Models are Super Mario"; METHODS.md §3).

    θ* = θ_0 + λ Σ_t m_t ⊙ (θ_t − θ_0) / (1 − p),   m_t,j ~ Bernoulli(1 − p)

(no division when `rescale` is false; p = 1 gives zeros, as `torch.nn.functional.dropout`).
The mask of elements [c·C, (c+1)·C) of a parameter is drawn on the CPU from a generator seeded
by (seed, parameter name, model index, c), so it is the same whatever the block size, device or
order of work.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .base import Block, Method, docstring_summary

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
    if numel == 0:
        return torch.ones(0, dtype=torch.bool)
    first, last = offset // CHUNK, (offset + numel - 1) // CHUNK
    draws = torch.empty((last - first + 1) * CHUNK)
    for i, chunk in enumerate(range(first, last + 1)):
        key = hashlib.blake2b(f"{seed}\0{name}\0{model}\0{chunk}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        torch.rand(CHUNK, generator=generator, out=draws[i * CHUNK:(i + 1) * CHUNK])
    start = offset - first * CHUNK
    return draws[start:start + numel] >= drop_rate


def dare(models: list[torch.Tensor], base: torch.Tensor, masks: list[torch.Tensor], drop_rate: float,
         scaling_factor: float, rescale: bool) -> torch.Tensor:
    """θ_0 + λ Σ_t m_t ⊙ τ_t (/ (1 − p)), with explicit boolean masks."""
    total = torch.zeros_like(base)
    for m, keep in zip(models, masks):
        total += torch.sub(m, base).mul_(keep)  # a product with the mask: several times faster than `where`
    if rescale and drop_rate < 1.0:
        total = total / (1.0 - drop_rate)
    return base + total * scaling_factor


def _merge(block: Block, hp: Dare, state: dict) -> torch.Tensor:
    shape, numel = block.base.shape, block.base.numel()
    masks = [keep_mask(hp.seed, block.name, t, block.offset, numel, hp.drop_rate).view(shape).to(block.base.device)
             for t in range(len(block.models))]
    return dare(block.models, block.base, masks, hp.drop_rate, hp.scaling_factor, hp.rescale)


METHOD = Method(name="dare", description=docstring_summary(__doc__), hyperparameters=Dare,
                merge=_merge, needs_base=True)
