"""SCE: select, calculate, erase (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990;
as mergekit's `sce`; docs/methods.md §29).

With the task vectors τ_t = θ_t − θ_0 of M models, per tensor:

    select:    v = Var_t(τ_t) per entry (÷ M); keep the k = int(ρ · #{v ≠ 0}) entries of largest v in every τ_t
               (equal variances in index order; ρ = `select_topk`, 1 keeps every entry, 0 none)
    calculate: s_t = mean of the kept τ_t² over the tensor, normalised to sum to 1 (1/M where Σ_t s_t < 1e-6)
    erase:     γ = sign(Σ_t τ_t) (+ where 0), a_t = [sign τ_t = γ]
    θ* = θ_0 + Σ_t s_t a_t τ_t / max(Σ_t s_t a_t, 1e-6)

The variance's order statistic comes from the exact band passes of :mod:`blockmerge.plugins.magnitude`,
the s_t from one more reduction pass, so the merge is elementwise within the block budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import Block, Method, Needs, docstring_summary, tensor_pass
from .hyperparameters import Scheduled, values_of
from .magnitude import Band, Bands, band_passes, in_cut, ties_before_block
from .ops import row_sums

WEIGHTS = "sce.weights"
WEIGHT_SUM_FLOOR = 1e-6
DIVISOR_FLOOR = 1e-6


@dataclass(frozen=True)
class Sce:
    select_topk: Scheduled[float] = 1.0


@dataclass(frozen=True)
class TopVariance(Bands):
    """The int(ρ · #nonzero) largest variances (all of them for ρ ≥ 1)."""

    fraction: float

    def bands(self, numel: int, nonzero: list[int]) -> list[Band]:
        if self.fraction >= 1.0:
            return [Band(0, numel)]
        return [Band(numel - max(0, int(nonzero[0] * self.fraction)), numel)]


def variance_bits(models: list[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """int32 bit patterns of the task vectors' population variance over the models, rounded to float32.

    Welford's running mean and sum of squares in float64, as torch.var does on the CPU, so the bits are those
    of mergekit's; many times faster than torch.var's reduction across the models' axis.
    """
    mean = torch.zeros(base.shape, dtype=torch.float64, device=base.device)
    squares = torch.zeros_like(mean)
    for count, m in enumerate(models, start=1):
        tau = torch.sub(m, base).to(torch.float64)
        delta = tau - mean
        mean.add_(delta / count)
        squares.add_(delta.mul_(tau.sub_(mean)))
    return [squares.div_(len(models)).to(torch.float32).view(torch.int32)]


def _selected(block: Block, state: Mapping[str, Any]) -> list[torch.Tensor]:
    """The task vectors, zero outside the selected entries."""
    taus = [m - block.base for m in block.models]
    if "cut" not in state:
        return taus
    keep = in_cut(variance_bits(block.models, block.base)[0], state["cut"][block.name][0],
                  ties_before_block(block, state, 0))
    return [t.mul_(keep) for t in taus]


def _squares(block: Block, hp: Sce, state: Mapping[str, Any]) -> torch.Tensor:
    """Per row: the entries, then each model's Σ of its selected τ² (float64)."""
    taus = _selected(block, state)
    entries = torch.full((block.stop - block.start,), float(block.base[0].numel() if block.base.dim() else 1),
                         dtype=torch.float64)
    return torch.stack([entries, *(row_sums(t * t) for t in taus)], dim=1).cpu()


def _weights(sums: list[float], hp: Sce, name: str) -> list[float]:
    entries, squares = sums[0], sums[1:]
    means = [s / entries for s in squares]
    total = sum(means)
    return [1.0 / len(means)] * len(means) if abs(total) < WEIGHT_SUM_FLOOR else [m / total for m in means]


def _merge(block: Block, hp: Sce, state: Mapping[str, Any]) -> torch.Tensor:
    taus = _selected(block, state)
    elected = torch.where(sum(taus[1:], taus[0].clone()) >= 0, 1.0, -1.0)
    merged, divisor = torch.zeros_like(block.base), torch.zeros_like(block.base)
    for tau, weight in zip(taus, state[WEIGHTS][block.name]):
        agree = (torch.sign(tau) == elected).to(tau.dtype).mul_(weight)
        merged.addcmul_(tau, agree)
        divisor += agree
    return merged.div_(divisor.clamp_(min=DIVISOR_FLOOR)).add_(block.base)


def _passes(hp: Sce, kinds: frozenset[str]) -> list:
    select = band_passes(lambda at: TopVariance(at.select_topk), "block", exact=True, magnitudes=variance_bits,
                         count=lambda block: 1) if any(v < 1.0 for v in values_of(hp.select_topk)) else []
    return [*select, tensor_pass(WEIGHTS, _squares, _weights)]


METHOD = Method(name="sce", description=docstring_summary(__doc__), hyperparameters=Sce, merge=_merge,
                needs=lambda hp: Needs(base=True), passes=_passes)
