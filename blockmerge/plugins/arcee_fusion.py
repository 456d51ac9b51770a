"""Arcee Fusion: take the fine-tune's changes where they matter most (as mergekit's `arcee_fusion`;
docs/methods.md §30).

With θ_0 the base and θ_1 the one other model, per vector along the last axis (a row of a matrix):

    KL = Σ p log(p / q),   p = softmax(θ_1) + 1e-8,   q = softmax(θ_0) + 1e-8
    I = |θ_1 − θ_0| · KL                                         (the importance of each entry)
    τ = Q_0.5(I) + 1.5 (Q_0.75(I) − Q_0.25(I))                   over the tensor; Q_q: the entry at
                                                                 position int(q (n − 1)) of the sorted I
    θ* = θ_0 + (θ_1 − θ_0) · [I ≥ τ]

The quantiles are exact order statistics from the band passes of :mod:`blockmerge.plugins.magnitude`
over I (mergekit samples a million entries of larger tensors instead); rows are merged whole. A first
band pass keeps each vector's KL (one float per row), so the softmaxes are taken once, not in every pass.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import Block, Method, Needs, Pass, docstring_summary
from .magnitude import Band, Bands, band_passes, value_of

QUANTILES = (0.25, 0.5, 0.75)
SOFTMAX_FLOOR = 1e-8
KL = "arcee_fusion.kl"  # state: each tensor's KL per last-axis vector


@dataclass(frozen=True)
class ArceeFusion:
    """No hyperparameters: the threshold comes from the importance's quartiles."""


@dataclass(frozen=True)
class Quartiles(Bands):
    """One band per quartile whose end is the entry at position int(q (n − 1))."""

    def bands(self, numel: int, nonzero: list[int]) -> list[Band]:
        return [Band(int(q * (numel - 1)), int(q * (numel - 1)) + 1, all_ties=True) for q in QUANTILES]


def divergence(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax θ_1 ‖ softmax θ_0) of each last-axis vector (float32, the last axis kept with size 1)."""
    model, base = model.to(torch.float32), base.to(torch.float32)
    p = torch.softmax(model, dim=-1).add_(SOFTMAX_FLOOR)
    q = torch.softmax(base, dim=-1).add_(SOFTMAX_FLOOR)
    return torch.div(p, q, out=q).log_().mul_(p).sum(dim=-1, keepdim=True)


def importance(model: torch.Tensor, base: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """I = |θ_1 − θ_0| · KL per last-axis vector (float32, clamped at 0); `kl`: the vectors' `divergence`."""
    if model.dim() == 0:
        return torch.zeros_like(model, dtype=torch.float32)
    return (model.to(torch.float32) - base.to(torch.float32)).abs_().mul_(kl.to(model.device)).clamp_(min=0.0)


def _divergences(block: Block, hp: ArceeFusion, state: Mapping[str, Any]) -> torch.Tensor:
    return divergence(block.models[0], block.base).cpu() if block.base.dim() else torch.zeros(())


def _fold_rows(acc, partial: torch.Tensor, block: Block) -> dict:
    acc = acc if acc is not None else {}
    acc.setdefault(block.name, []).append((block.start, partial))
    return acc


def _by_tensor(acc, hp: ArceeFusion, state: Mapping[str, Any]) -> dict:
    """state[KL][name]: (0, the KL of every row of the tensor)."""
    return {KL: {name: (0, torch.cat([p for _, p in sorted(parts, key=lambda part: part[0])]) if parts[0][1].dim()
                        else parts[0][1]) for name, parts in acc.items()}}


def _with_divergences(counts: Pass) -> Pass:
    """`counts` (the first band pass), which reads each block's KL, run with the KL taken from the block itself;
    the KL of every row is kept too, for the later passes and the merge."""
    def map_block(block: Block, hp: ArceeFusion, state: Mapping[str, Any]) -> tuple[Any, torch.Tensor]:
        kl = _divergences(block, hp, state)
        local = types.MappingProxyType({**state, KL: {block.name: (block.start, kl)}})
        return counts.map(block, hp, local), kl

    def fold(acc, partial: tuple[Any, torch.Tensor], block: Block) -> tuple[Any, Any]:
        counted, kept = acc if acc is not None else (None, None)
        return counts.fold(counted, partial[0], block), _fold_rows(kept, partial[1], block)

    def finish(acc, hp: ArceeFusion, state: Mapping[str, Any]) -> dict:
        counted, kept = acc if acc is not None else ({}, {})
        return {**counts.finish(counted, hp, state), **_by_tensor(kept, hp, state)}

    def combine(acc: tuple[Any, dict], later: tuple[Any, dict]) -> tuple[Any, dict]:
        for name, parts in later[1].items():
            acc[1].setdefault(name, []).extend(parts)
        return counts.combine(acc[0], later[0]), acc[1]

    return Pass(map_block, fold, finish, local=counts.local, combine=combine if counts.combine is not None else None)


def _block_importance(block: Block, state: Mapping[str, Any]) -> torch.Tensor:
    start, kl = state[KL][block.name]
    return importance(block.models[0], block.base, kl[block.start - start:block.stop - start] if kl.dim() > 1 else kl)


def _importance_bits(block: Block, state: Mapping[str, Any]) -> list[torch.Tensor]:
    return [_block_importance(block, state).view(torch.int32)] * len(QUANTILES)


def threshold(cuts: list[Any]) -> float:
    """τ from the quartile cuts (each cut's end holds its entry; a tensor of one entry has no ends: −∞)."""
    if all(c.low is None and c.high is None for c in cuts):
        return float("-inf")
    q1, median, q3 = (torch.tensor(value_of(c.low if c.low is not None else c.high), dtype=torch.float32)
                      for c in cuts)
    return float(median + 1.5 * (q3 - q1))


def _merge(block: Block, hp: ArceeFusion, state: Mapping[str, Any]) -> torch.Tensor:
    model, base = block.models[0], block.base
    keep = _block_importance(block, state) >= threshold(state["cut"][block.name])
    return torch.sub(model, base).mul_(keep).add_(base)


def _passes(hp: ArceeFusion, kinds: frozenset[str]) -> list[Pass]:
    counts, *later = band_passes(lambda at: Quartiles(), "block", exact=False, count=lambda block: len(QUANTILES),
                                 block_magnitudes=_importance_bits)
    return [_with_divergences(counts), *later]


METHOD = Method(name="arcee_fusion", description=docstring_summary(__doc__), hyperparameters=ArceeFusion,
                merge=_merge, needs=lambda hp: Needs(base=True), granularity="rows", model_count=(1, 1),
                passes=_passes)
