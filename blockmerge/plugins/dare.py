"""DARE: drop and rescale task vectors (Yu et al. 2024, "Language Models are Super Mario"; METHODS.md §3).

    θ* = θ_0 + λ Σ_t m_t ⊙ (θ_t − θ_0) / (1 − p),   m_t,j ~ Bernoulli(1 − p)

(no division when `rescale` is false; p = 1 gives zeros, as `torch.nn.functional.dropout`).
The mask is a counter-based hash of (seed, parameter name, model index, element index), so it
is the same whatever the block size, device or order of work.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .base import Block, Method, docstring_summary

_MASK32 = 0xFFFFFFFF
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Dare:
    drop_rate: float = 0.9
    scaling_factor: float = 1.0
    seed: int = 0
    rescale: bool = True

    def __post_init__(self):
        if not 0.0 <= self.drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {self.drop_rate}")


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for x in [0, 2³²), without overflowing int64."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding 32-bit values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def keep_mask(seed: int, name: str, model: int, offset: int, numel: int, drop_rate: float,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements offset..offset+numel of the flattened keep-mask of one model's parameter."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{model}".encode(), digest_size=8).digest()
    k1, k2 = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")
    threshold = min(round(drop_rate * 2.0**32), 2**32)
    out = torch.empty(numel, dtype=torch.bool, device=device)
    for start in range(0, numel, _CHUNK):
        index = torch.arange(offset + start, offset + min(numel, start + _CHUNK), dtype=torch.int64, device=device)
        h = _fmix32((index & _MASK32) ^ k1)
        h = _fmix32(h ^ (index >> 32) ^ k2)
        out[start:start + len(index)] = h >= threshold
    return out


def dare(models: list[torch.Tensor], base: torch.Tensor, masks: list[torch.Tensor], drop_rate: float,
         scaling_factor: float, rescale: bool) -> torch.Tensor:
    """θ_0 + λ Σ_t m_t ⊙ τ_t (/ (1 − p)), with explicit boolean masks."""
    total = torch.zeros_like(base)
    for m, keep in zip(models, masks):
        total += torch.where(keep, m - base, 0.0)
    if rescale and drop_rate < 1.0:
        total = total / (1.0 - drop_rate)
    return base + total * scaling_factor


def _merge(block: Block, hp: Dare, state: dict) -> torch.Tensor:
    shape, numel = block.base.shape, block.base.numel()
    masks = [keep_mask(hp.seed, block.name, t, block.offset, numel, hp.drop_rate, block.base.device).view(shape)
             for t in range(len(block.models))]
    return dare(block.models, block.base, masks, hp.drop_rate, hp.scaling_factor, hp.rescale)


METHOD = Method(name="dare", description=docstring_summary(__doc__), hyperparameters=Dare,
                merge=_merge, needs_base=True)
