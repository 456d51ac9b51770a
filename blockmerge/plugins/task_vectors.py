"""Task-vector merges composed of a sparsifier, a sign consensus, weights and a scale (docs/methods.md §19).

    τ_t = θ_t − θ_0;   τ̂_t = sparsify(τ_t);   D_t = w_t τ̂_t
    no consensus:     θ* = θ_0 + λ Σ_t D_t / Z,   Z = Σ_t w_t  (1 where |Z| < 1e-8)
    sign consensus:   γ_j = sign(Σ_t D_t,j) (0 → the majority sign of the model or of the tensor, or +)
                      a_t,j = [sign D_t,j = γ_j];   θ* = θ_0 + λ Σ_t a_t D_t / Z,   Z_j = Σ_t a_t,j w_t  (0 → 1)

Z is 1 without `normalize`; with unit weights and sign consensus, Z_j counts the agreeing models
(TIES's disjoint mean). Sparsifiers: `Dense` (τ̂ = τ), `Magnitude` (an exact band of each model's
magnitude order, over the model or within each tensor: the top density and ties, exactly the top
int(d·K), or breadcrumbs' band), `RandomDrop` (Bernoulli keep masks,
rescaled by 1/(1 − p)), and `L1Rescaled` around any of them (each tensor's τ̂_t scaled to the L1 norm
of τ_t). Task arithmetic is Dense × none, DARE RandomDrop × none, TIES Magnitude × sign; the other
pairs are configurations of the same parts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from .base import Block, Pass, tensor_pass
from .hyperparameters import each_model
from .magnitude import Bands, band_passes, cut_task_vectors, group_of
from .ops import row_sums, summed, task_vector_sum, weighted_sum

MASK_CHUNK = 1 << 16  # elements of a parameter whose uniform draws one generator makes
WEIGHT_FLOOR = 1e-8  # a weight sum below this (in magnitude) does not divide
L1_FLOOR = 1e-7  # an L1 norm below this is not rescaled to or from
Resolved = Callable[[Any], Any]  # the part built from the hyperparameters at one tensor


class Sparsifier(Protocol):
    """How each model's task vector is thinned."""

    def passes(self, kinds: frozenset[str], resolved: Resolved) -> list[Pass]:
        """The reductions it needs before the merge (given the statistic kinds read); `resolved(hp)` is the
        sparsifier built from the hyperparameters at a pass's tensor."""

    def apply(self, block: Block, state: Mapping[str, Any]) -> list[torch.Tensor]:
        """τ̂_t of every model, for the block."""

    def scaled_sum(self, block: Block, state: Mapping[str, Any], coefficients: list[float]) -> torch.Tensor:
        """Σ_t c_t τ̂_t, for the block."""


def weighted(taus: list[torch.Tensor], coefficients: list[float]) -> torch.Tensor:
    if len(set(coefficients)) == 1:
        return summed(taus).mul_(coefficients[0])
    return weighted_sum(taus, coefficients)


@dataclass(frozen=True)
class Dense:
    """Every entry kept."""

    def passes(self, kinds: frozenset[str], resolved: Resolved) -> list[Pass]:
        return []

    def apply(self, block: Block, state: Mapping[str, Any]) -> list[torch.Tensor]:
        return [m - block.base for m in block.models]

    def scaled_sum(self, block: Block, state: Mapping[str, Any], coefficients: list[float]) -> torch.Tensor:
        if len(set(coefficients)) == 1:
            return task_vector_sum(block.models, block.base) * coefficients[0]
        return weighted_sum(block.models, coefficients).sub_(block.base, alpha=sum(coefficients))


@dataclass(frozen=True)
class Magnitude:
    """Each model's entries in a band of its ascending magnitude order (`Bands`: the top density and ties, exactly
    the top int(d·K), breadcrumbs' band), over the model (`global`) or within each tensor (`block`); given
    `trimmed` statistics are τ̂ as they are."""

    bands: Bands
    scope: Literal["global", "block"]

    def passes(self, kinds: frozenset[str], resolved: Resolved) -> list[Pass]:
        if "trimmed" in kinds:
            return []
        return band_passes(lambda hp: resolved(hp).bands, self.scope, self.bands.exact)

    def apply(self, block: Block, state: Mapping[str, Any]) -> list[torch.Tensor]:
        return cut_task_vectors(block, self.scope, state)

    def scaled_sum(self, block: Block, state: Mapping[str, Any], coefficients: list[float]) -> torch.Tensor:
        return weighted(self.apply(block, state), coefficients)


def uniform_draws(seed: int, name: str, model: int, offset: int, numel: int) -> np.ndarray:
    """Uniform 32-bit draws for elements offset..offset+numel of one model's flattened parameter.

    The draws of elements [c·C, (c+1)·C) come from an SFC64 generator seeded by (seed, name, model, c), so they
    do not depend on the block size, device or order of work.
    """
    out = np.empty(numel, dtype=np.uint32)
    for chunk in range(offset // MASK_CHUNK, (offset + numel - 1) // MASK_CHUNK + 1):
        key = hashlib.blake2b(f"{seed}\0{name}\0{model}\0{chunk}".encode(), digest_size=8).digest()
        draws = np.random.SFC64(int.from_bytes(key, "little")).random_raw(MASK_CHUNK // 2).view(np.uint32)
        a, b = max(offset, chunk * MASK_CHUNK), min(offset + numel, (chunk + 1) * MASK_CHUNK)
        out[a - offset:b - offset] = draws[a - chunk * MASK_CHUNK:b - chunk * MASK_CHUNK]
    return out


def keep_mask(seed: int, name: str, model: int, offset: int, numel: int, drop_rate: float) -> torch.Tensor:
    """Elements offset..offset+numel of the flattened keep-mask of one model's parameter (on the CPU): element j is
    kept when its uniform draw (`uniform_draws`) u_j < round((1 − p)·2³²)."""
    if drop_rate >= 1.0 or numel == 0:
        return torch.zeros(numel, dtype=torch.bool)
    if drop_rate <= 0.0:
        return torch.ones(numel, dtype=torch.bool)
    below = np.uint32(min(round((1.0 - drop_rate) * 2**32), 2**32 - 1))
    return torch.from_numpy(uniform_draws(seed, name, model, offset, numel) < below)


def masked_scale(keep: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 tensor holding `scale` where `keep` is true and 0 elsewhere (on the mask's CPU)."""
    # the bits of scale times 1 or 0: several times faster than a float conversion or `where`
    bits = np.multiply(keep.numpy(), np.float32(scale).view(np.uint32), dtype=np.uint32)
    return torch.from_numpy(bits.view(np.float32))


def dropped_sum(models: list[torch.Tensor], base: torch.Tensor, masks: list[torch.Tensor], factors: list[float]
                ) -> torch.Tensor:
    """Σ_t f_t m_t ⊙ τ_t, with explicit boolean masks (on the CPU): each model costs one multiply-add per element."""
    total = torch.zeros_like(base)
    for m, keep, factor in zip(models, masks, factors):
        total.addcmul_(torch.sub(m, base), masked_scale(keep.reshape(-1), factor).view(base.shape).to(base.device))
    return total


@dataclass(frozen=True)
class RandomDrop:
    """Each entry of model t dropped with probability p_t (seeded, see `keep_mask`); the kept ones divided by
    1 − p_t where `rescale`."""

    drop_rates: tuple[float, ...]
    seed: int
    rescale: bool

    def passes(self, kinds: frozenset[str], resolved: Resolved) -> list[Pass]:
        return []

    def masks(self, block: Block) -> list[torch.Tensor]:
        """Each model's keep mask of the block's elements."""
        numel = block.base.numel()
        return [keep_mask(self.seed, block.name, t, block.offset, numel, p)
                for t, p in enumerate(each_model(self.drop_rates, len(block.models)))]

    def factors(self, coefficients: list[float]) -> list[float]:
        """What each model's kept entries are multiplied by, given the models' coefficients."""
        rates = each_model(self.drop_rates, len(coefficients))
        return [c / (1.0 - p) if self.rescale and p < 1.0 else c for c, p in zip(coefficients, rates)]

    def apply(self, block: Block, state: Mapping[str, Any]) -> list[torch.Tensor]:
        return [torch.sub(m, block.base).mul_(masked_scale(keep, f).view(block.base.shape).to(block.base.device))
                for m, keep, f in zip(block.models, self.masks(block), self.factors([1.0] * len(block.models)))]

    def scaled_sum(self, block: Block, state: Mapping[str, Any], coefficients: list[float]) -> torch.Tensor:
        return dropped_sum(block.models, block.base, self.masks(block), self.factors(coefficients))


@dataclass(frozen=True)
class L1Rescaled:
    """The inner sparsifier's τ̂_t times ‖τ_t‖₁ / ‖τ̂_t‖₁ over each tensor (unchanged where either norm is below
    1e-7), as mergekit's `rescale` does."""

    inner: Any

    KEY = "l1_factors"

    def passes(self, kinds: frozenset[str], resolved: Resolved) -> list[Pass]:
        def norms(block: Block, hp: Any, state: Mapping[str, Any]) -> torch.Tensor:
            kept = resolved(hp).inner.apply(block, state)
            return torch.stack([row_sums(torch.sub(m, block.base).abs_()) for m in block.models]
                               + [row_sums(k.abs()) for k in kept], dim=1).cpu()

        def factors(sums: list[float], hp: Any, name: str) -> list[float]:
            count = len(sums) // 2
            return [whole / kept if whole >= L1_FLOOR and kept >= L1_FLOOR else 1.0
                    for whole, kept in zip(sums[:count], sums[count:])]

        return [*self.inner.passes(kinds, lambda hp: resolved(hp).inner), tensor_pass(self.KEY, norms, factors)]

    def apply(self, block: Block, state: Mapping[str, Any]) -> list[torch.Tensor]:
        return [k.mul_(f) for k, f in zip(self.inner.apply(block, state), state[self.KEY][block.name])]

    def scaled_sum(self, block: Block, state: Mapping[str, Any], coefficients: list[float]) -> torch.Tensor:
        return self.inner.scaled_sum(block, state, [c * f for c, f in zip(coefficients,
                                                                           state[self.KEY][block.name])])


def elect_and_merge(trimmed: list[torch.Tensor], zero_sign: int, weights: list[float] | None = None,
                    normalize: bool = True) -> torch.Tensor:
    """Σ_t a_t D_t / Z of weighted sparsified task vectors D_t (a_t: agrees with the elected sign, whose zeros are
    `zero_sign`; Z as the module says, 1 without `normalize`).

    Written in float arithmetic only (no boolean masks, which are several times slower on the CPU):
    with γ = ±1, an entry agrees when D·γ > 0, and Σ relu(D·γ) is the agreeing entries' |sum|.
    """
    elected = summed(trimmed).sign_().add_(0.5 * zero_sign).sign_()  # sign(sign(Σ) + m/2): zeros take m
    magnitude = torch.mul(trimmed[0], elected).relu_()
    divisor = torch.sign(magnitude).mul_(weights[0]) if weights is not None else torch.sign(magnitude)
    for t, d in enumerate(trimmed[1:], start=1):
        agreeing = torch.mul(d, elected).relu_()
        magnitude += agreeing
        divisor.add_(agreeing.sign_(), alpha=weights[t] if weights is not None else 1.0)
    if not normalize:
        return magnitude.mul_(elected)
    if weights is None:
        return magnitude.div_(divisor.clamp_(min=1.0)).mul_(elected)
    return magnitude.div_(divisor.masked_fill_(divisor == 0, 1.0)).mul_(elected)


@dataclass(frozen=True)
class SignElection:
    """TIES's sign consensus; where the D_t sum to 0 the elected sign is the majority of the elected signs over the
    model (`global`) or the tensor (`block`), or + (`plus`)."""

    zero_sign: Literal["global", "block", "plus"]

    def passes(self, sparsify: Callable[[Block, Any, Mapping[str, Any]], list[torch.Tensor]]) -> list[Pass]:
        """The pass that finds the majority sign of each group (`state["majority"]`); `sparsify(block, hp, state)`
        gives the D_t of a block."""
        if self.zero_sign == "plus":
            return []

        def sign_sum(block: Block, hp: Any, state: Mapping[str, Any]) -> int:
            return int(summed(sparsify(block, hp, state)).sign_().sum(dtype=torch.float64))

        def fold(acc, partial: int, block: Block) -> dict[str, int]:
            acc = acc if acc is not None else {}
            group = group_of(block, self.zero_sign)
            acc[group] = acc.get(group, 0) + partial
            return acc

        def finish(acc, hp: Any, state: Mapping[str, Any]) -> dict:
            return {"majority": {g: 1 if s >= 0 else -1 for g, s in acc.items()}}

        return [Pass(sign_sum, fold, finish, local=self.zero_sign == "block")]

    def sign_for_zero(self, block: Block, state: Mapping[str, Any]) -> int:
        """The sign elected where the D_t sum to 0."""
        return 1 if self.zero_sign == "plus" else state["majority"][group_of(block, self.zero_sign)]


@dataclass(frozen=True)
class TaskVectorMerge:
    """θ_0 + λ · (the weighted sparsified task vectors, summed or through a sign consensus) / Z."""

    sparsifier: Any
    consensus: SignElection | None
    scaling_factor: float
    weights: tuple[float, ...] | None = None
    normalize: bool = False

    def passes(self, kinds: frozenset[str], resolved: Callable[[Any], TaskVectorMerge]) -> list[Pass]:
        """The reductions before the merge; `resolved(hp)` is the recipe at a pass's tensor."""
        sparsifier = self.sparsifier.passes(kinds, lambda hp: resolved(hp).sparsifier)
        if self.consensus is None:
            return sparsifier
        return [*sparsifier, *self.consensus.passes(lambda block, hp, state: resolved(hp).weighted(block, state))]

    def weighted(self, block: Block, state: Mapping[str, Any]) -> list[torch.Tensor]:
        """D_t = w_t τ̂_t of the block."""
        taus = self.sparsifier.apply(block, state)
        return taus if self.weights is None else [t.mul_(w) for t, w in zip(taus, each_model(self.weights, len(taus)))]

    def merge(self, block: Block, state: Mapping[str, Any]) -> torch.Tensor:
        if self.consensus is None:
            weights = each_model(self.weights, len(block.models), 1.0)
            divisor = sum(weights) if self.normalize else 1.0
            divisor = divisor if abs(divisor) >= WEIGHT_FLOOR else 1.0
            coefficients = [self.scaling_factor * w / divisor for w in weights]
            return self.sparsifier.scaled_sum(block, state, coefficients).add_(block.base)
        merged = elect_and_merge(self.weighted(block, state), self.consensus.sign_for_zero(block, state),
                                 each_model(self.weights, len(block.models)) if self.weights is not None else None,
                                 self.normalize)
        return merged.mul_(self.scaling_factor).add_(block.base)


def composed(sparsifier: Any, hp: Any) -> TaskVectorMerge:
    """The merge of a method whose hyperparameters name `rescale` (`l1` wraps the sparsifier in `L1Rescaled`),
    `consensus` (`none` or `sign`, zeros +), `scaling_factor`, `weights` and `normalize`."""
    if hp.rescale == "l1":
        sparsifier = L1Rescaled(sparsifier)
    consensus = SignElection("plus") if hp.consensus == "sign" else None
    return TaskVectorMerge(sparsifier, consensus, hp.scaling_factor, hp.weights, hp.normalize)

