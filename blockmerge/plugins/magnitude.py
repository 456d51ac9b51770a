"""Exact magnitude thresholds of task vectors, found out of core (docs/methods.md §4.2), and the trim they set.

    τ_t = θ_t − θ_0;   τ̂_t = τ_t where |τ_t| ≥ thr_t, else 0      (keep int(d·K)+1 entries and ties)

thr_t is the exact k-th order statistic of |τ_t| over every merged float tensor of model t (`global`)
or within each tensor (`block`), found by two streaming passes of a radix select over the float32
bit patterns of |τ|: the top 16 bits first, then the low 16 bits inside the selected top bin.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .base import Block, Pass

TOP_BINS = 1 << 15  # top 16 bits of a non-negative float32 (sign bit clear)
LOW_BINS = 1 << 16
SLICE = 1 << 18  # elements the passes take at a time: their temporaries stay in the cache and on the heap


def task_vector_bits(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |model − base| in float32: ordered as the magnitudes are."""
    return torch.sub(model, base, out=torch.empty_like(base, dtype=torch.float32)).abs_().view(torch.int32)


def threshold_rank(numel: int, density: float) -> int:
    """1-based rank (ascending) of the trim threshold; 0 when everything is kept."""
    return numel - int(numel * density)


def select_bin(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the rank-th smallest value and the rank within that bin."""
    cumulative = counts.cumsum(0)
    index = int(torch.searchsorted(cumulative, torch.tensor([rank], dtype=cumulative.dtype))[0])
    before = int(cumulative[index - 1]) if index else 0
    return index, rank - before


def trim(task_vector: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Keep entries whose magnitude is at least the threshold (None keeps everything)."""
    if threshold is None or threshold <= 0.0:
        return task_vector
    # hardshrink keeps |x| > λ: λ is the float32 just below the threshold, so |x| >= threshold is kept
    return F.hardshrink(task_vector, float(np.nextafter(np.float32(threshold), np.float32(0.0))))


def group_of(block: Block, mode: str) -> str:
    """The group whose values a reduction shares: "" for the whole model (`global`), the tensor's name (`block`)."""
    return "" if mode == "global" else block.name


def _fold_counts(mode: str):
    """Sum per-model counts per group; a finished tensor's counts (block mode) are kept sparse."""
    def fold(acc, partial, block):
        acc = acc if acc is not None else {}
        group = group_of(block, mode)
        acc[group] = partial if group not in acc else acc[group].add_(partial)
        if mode == "block" and block.stop == (block.shape[0] if block.shape else 1):
            dense = acc[group]
            acc[group] = [(row.nonzero().flatten(), row[row != 0]) for row in dense]
        return acc
    return fold


def _dense(counts, size: int) -> list[torch.Tensor]:
    if isinstance(counts, list):
        return [torch.zeros(size, dtype=torch.int64).index_put_((bins,), values) for bins, values in counts]
    return list(counts)


def _slices(block: Block) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """The block's models and base, flattened, SLICE elements at a time."""
    base = block.base.reshape(-1)
    models = [m.reshape(-1) for m in block.models]
    for a in range(0, base.numel(), SLICE):
        b = a + SLICE
        yield [m[a:b] for m in models], base[a:b]


def magnitude_passes(density: float, mode: Literal["global", "block"]) -> list[Pass]:
    """The two radix-select passes that find each model's exact threshold keeping the top `density` of |θ_t − θ_0|
    over the model (`global`) or each tensor (`block`): `state["threshold"][group]`, one per model."""
    def top_counts(block: Block, hp: Any, state: Mapping[str, Any]) -> torch.Tensor:
        counts = torch.zeros(len(block.models), TOP_BINS, dtype=torch.int64, device=block.base.device)
        for models, base in _slices(block):
            for row, m in zip(counts, models):
                row += torch.bincount(task_vector_bits(m, base).bitwise_right_shift_(16), minlength=TOP_BINS)
        return counts.cpu()

    def find_top(acc, hp: Any, state: Mapping[str, Any]) -> dict:
        found = {}
        for group, counts in acc.items():
            found[group] = []
            for row in _dense(counts, TOP_BINS):
                rank = threshold_rank(int(row.sum()), density)
                found[group].append(select_bin(row, rank) if rank > 0 else None)
        return {"top": found}

    def low_counts(block: Block, hp: Any, state: Mapping[str, Any]) -> torch.Tensor:
        counts = torch.zeros(len(block.models), LOW_BINS, dtype=torch.int64, device=block.base.device)
        tops = state["top"][group_of(block, mode)]
        for models, base in _slices(block):
            for row, m, top in zip(counts, models, tops):
                if top is not None:
                    # low 16 bits of the values in the top bin, shifted by one; every other value lands in
                    # bin 0 or LOW_BINS + 1, which are dropped
                    low = task_vector_bits(m, base).sub_(top[0] << 16).clamp_(-1, LOW_BINS).add_(1)
                    row += torch.bincount(low, minlength=LOW_BINS + 2)[1:LOW_BINS + 1]
        return counts.cpu()

    def find_threshold(acc, hp: Any, state: Mapping[str, Any]) -> dict:
        thresholds = {}
        for group, counts in acc.items():
            thresholds[group] = []
            for row, top in zip(_dense(counts, LOW_BINS), state["top"][group]):
                if top is None:
                    thresholds[group].append(None)
                    continue
                low, _ = select_bin(row, top[1])
                bits = torch.tensor([(top[0] << 16) | low], dtype=torch.int32)
                thresholds[group].append(float(bits.view(torch.float32)[0]))
        return {"threshold": thresholds}

    return [Pass(top_counts, _fold_counts(mode), find_top),
            Pass(low_counts, _fold_counts(mode), find_threshold)]


def trimmed_task_vectors(block: Block, mode: str, state: Mapping[str, Any]) -> list[torch.Tensor]:
    """τ̂_t of a block: the given `trimmed` statistics, or the task vectors cut at the found thresholds."""
    if "trimmed" in block.stats:
        return block.stats["trimmed"]
    thresholds = state["threshold"][group_of(block, mode)]
    return [trim(m - block.base, thr) for m, thr in zip(block.models, thresholds)]
