"""Task-vector merges composed of a sparsifier, a sign consensus and a scale (docs/methods.md §19).

    τ_t = θ_t − θ_0;   τ̂_t = sparsify(τ_t)
    no consensus:     θ* = θ_0 + λ Σ_t τ̂_t
    sign consensus:   γ_j = sign(Σ_t τ̂_t,j) (0 → the majority sign of the model or of the tensor)
                      θ* = θ_0 + λ Σ_t [sign τ̂_t = γ] τ̂_t / max(1, #{t : sign τ̂_t = γ})

Sparsifiers: `Dense` (τ̂ = τ), `Magnitude` (each model's exact top-`density` magnitudes, over the
model or within each tensor), `RandomDrop` (Bernoulli keep masks, rescaled by 1/(1 − p)). Task
arithmetic is Dense × none, DARE RandomDrop × none, TIES Magnitude × sign; other pairs are
configurations of the same parts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from .base import Block, Pass
from .magnitude import group_of, magnitude_passes, trimmed_task_vectors
from .ops import summed, task_vector_sum

MASK_CHUNK = 1 << 16  # elements of a parameter whose keep mask one generator draws


class Sparsifier(Protocol):
    """How each model's task vector is thinned."""

    def passes(self, kinds: frozenset[str]) -> list[Pass]:
        """The reductions it needs before the merge (given the statistic kinds read)."""

    def apply(self, block: Block, state: Mapping[str, Any]) -> list[torch.Tensor]:
        """τ̂_t of every model, for the block."""

    def scaled_sum(self, block: Block, state: Mapping[str, Any], scale: float) -> torch.Tensor:
        """λ Σ_t τ̂_t, for the block."""


@dataclass(frozen=True)
class Dense:
    """Every entry kept."""

    def passes(self, kinds: frozenset[str]) -> list[Pass]:
        return []

    def apply(self, block: Block, state: Mapping[str, Any]) -> list[torch.Tensor]:
        return [m - block.base for m in block.models]

    def scaled_sum(self, block: Block, state: Mapping[str, Any], scale: float) -> torch.Tensor:
        return task_vector_sum(block.models, block.base) * scale


@dataclass(frozen=True)
class Magnitude:
    """Each model's entries of the top-`density` magnitudes (and ties), over the model (`global`) or within each
    tensor (`block`); given `trimmed` statistics are τ̂ as they are."""

    density: float
    scope: Literal["global", "block"]

    def passes(self, kinds: frozenset[str]) -> list[Pass]:
        return [] if "trimmed" in kinds else magnitude_passes(self.density, self.scope)

    def apply(self, block: Block, state: Mapping[str, Any]) -> list[torch.Tensor]:
        return trimmed_task_vectors(block, self.scope, state)

    def scaled_sum(self, block: Block, state: Mapping[str, Any], scale: float) -> torch.Tensor:
        return summed(self.apply(block, state)).mul_(scale)


def keep_mask(seed: int, name: str, model: int, offset: int, numel: int, drop_rate: float) -> torch.Tensor:
    """Elements offset..offset+numel of the flattened keep-mask of one model's parameter (on the CPU).

    Element j is kept when a uniform 32-bit draw u_j < round((1 − p)·2³²); the draws of elements
    [c·C, (c+1)·C) come from an SFC64 generator seeded by (seed, name, model, c), so a mask does not
    depend on the block size, device or order of work.
    """
    if drop_rate >= 1.0 or numel == 0:
        return torch.zeros(numel, dtype=torch.bool)
    if drop_rate <= 0.0:
        return torch.ones(numel, dtype=torch.bool)
    below = np.uint32(min(round((1.0 - drop_rate) * 2**32), 2**32 - 1))
    keep = np.empty(numel, dtype=bool)
    for chunk in range(offset // MASK_CHUNK, (offset + numel - 1) // MASK_CHUNK + 1):
        key = hashlib.blake2b(f"{seed}\0{name}\0{model}\0{chunk}".encode(), digest_size=8).digest()
        draws = np.random.SFC64(int.from_bytes(key, "little")).random_raw(MASK_CHUNK // 2).view(np.uint32)
        a, b = max(offset, chunk * MASK_CHUNK), min(offset + numel, (chunk + 1) * MASK_CHUNK)
        np.less(draws[a - chunk * MASK_CHUNK:b - chunk * MASK_CHUNK], below, out=keep[a - offset:b - offset])
    return torch.from_numpy(keep)


def masked_scale(keep: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 tensor holding `scale` where `keep` is true and 0 elsewhere (on the mask's CPU)."""
    # the bits of scale times 1 or 0: several times faster than a float conversion or `where`
    bits = np.multiply(keep.numpy(), np.float32(scale).view(np.uint32), dtype=np.uint32)
    return torch.from_numpy(bits.view(np.float32))


def dropped_sum(models: list[torch.Tensor], base: torch.Tensor, masks: list[torch.Tensor], drop_rate: float,
                scale: float, rescale: bool) -> torch.Tensor:
    """λ Σ_t m_t ⊙ τ_t (/ (1 − p)), with explicit boolean masks (on the CPU); λ is folded into the masks' factor,
    so each model costs one multiply-add per element."""
    factor = scale / (1.0 - drop_rate) if rescale and drop_rate < 1.0 else scale
    total = torch.zeros_like(base)
    for m, keep in zip(models, masks):
        total.addcmul_(torch.sub(m, base), masked_scale(keep.reshape(-1), factor).view(base.shape).to(base.device))
    return total


@dataclass(frozen=True)
class RandomDrop:
    """Each entry dropped with probability `drop_rate` (seeded, see `keep_mask`); the kept ones divided by
    1 − drop_rate where `rescale`."""

    drop_rate: float
    seed: int
    rescale: bool

    def passes(self, kinds: frozenset[str]) -> list[Pass]:
        return []

    def masks(self, block: Block) -> list[torch.Tensor]:
        """Each model's keep mask of the block's elements."""
        numel = block.base.numel()
        return [keep_mask(self.seed, block.name, t, block.offset, numel, self.drop_rate)
                for t in range(len(block.models))]

    def apply(self, block: Block, state: Mapping[str, Any]) -> list[torch.Tensor]:
        factor = 1.0 / (1.0 - self.drop_rate) if self.rescale and self.drop_rate < 1.0 else 1.0
        return [torch.sub(m, block.base).mul_(masked_scale(keep, factor).view(block.base.shape).to(block.base.device))
                for m, keep in zip(block.models, self.masks(block))]

    def scaled_sum(self, block: Block, state: Mapping[str, Any], scale: float) -> torch.Tensor:
        return dropped_sum(block.models, block.base, self.masks(block), self.drop_rate, scale, self.rescale)


def elect_and_merge(trimmed: list[torch.Tensor], majority_sign: int) -> torch.Tensor:
    """The disjoint mean τ* of sparsified task vectors, with the elected sign's zeros set to majority_sign.

    Written in float arithmetic only (no boolean masks, which are several times slower on the CPU):
    with γ = ±1, an entry agrees when t·γ > 0, and Σ relu(t·γ) is the agreeing entries' |sum|.
    """
    elected = summed(trimmed).sign_().add_(0.5 * majority_sign).sign_()  # sign(sign(Σ) + m/2): zeros take m
    magnitude = torch.mul(trimmed[0], elected).relu_()
    count = torch.sign(magnitude)
    for t in trimmed[1:]:
        agreeing = torch.mul(t, elected).relu_()
        magnitude += agreeing
        count += agreeing.sign_()
    return magnitude.div_(count.clamp_(min=1.0)).mul_(elected)


@dataclass(frozen=True)
class SignElection:
    """TIES's sign consensus and disjoint mean; where the τ̂ sum to 0 the elected sign is the majority of the
    elected signs over the model (`global`) or the tensor (`block`)."""

    zero_sign: Literal["global", "block"]

    def passes(self, sparsifier: Sparsifier) -> list[Pass]:
        """The pass that finds the majority sign of each group (`state["majority"]`)."""
        def sign_sum(block: Block, hp: Any, state: Mapping[str, Any]) -> int:
            return int(summed(sparsifier.apply(block, state)).sign_().sum(dtype=torch.float64))

        def fold(acc, partial: int, block: Block) -> dict[str, int]:
            acc = acc if acc is not None else {}
            group = group_of(block, self.zero_sign)
            acc[group] = acc.get(group, 0) + partial
            return acc

        def finish(acc, hp: Any, state: Mapping[str, Any]) -> dict:
            return {"majority": {g: 1 if s >= 0 else -1 for g, s in acc.items()}}

        return [Pass(sign_sum, fold, finish)]

    def merge(self, taus: list[torch.Tensor], block: Block, state: Mapping[str, Any]) -> torch.Tensor:
        return elect_and_merge(taus, state["majority"][group_of(block, self.zero_sign)])


@dataclass(frozen=True)
class TaskVectorMerge:
    """θ_0 + λ · (the sparsified task vectors, summed or through a sign consensus)."""

    sparsifier: Sparsifier
    consensus: SignElection | None
    scaling_factor: float

    def passes(self, kinds: frozenset[str]) -> list[Pass]:
        consensus = self.consensus.passes(self.sparsifier) if self.consensus is not None else []
        return [*self.sparsifier.passes(kinds), *consensus]

    def merge(self, block: Block, state: Mapping[str, Any]) -> torch.Tensor:
        if self.consensus is None:
            return self.sparsifier.scaled_sum(block, state, self.scaling_factor).add_(block.base)
        merged = self.consensus.merge(self.sparsifier.apply(block, state), block, state)
        return merged.mul_(self.scaling_factor).add_(block.base)
