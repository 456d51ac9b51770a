"""TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models"; docs/methods.md §4, §16).

    τ_t = θ_t − θ_0;   τ̂_t = τ_t where |τ_t| ≥ thr_t, else 0      (trim: keep int(d·K)+1 entries and ties)
    γ_j = sign(Σ_t τ̂_t,j), zeros filled with the majority sign sign(Σ_j γ_j) (0 → +1)
    τ*_j = Σ_t [sign(τ̂_t,j) = γ_j] τ̂_t,j / max(1, #{t : sign(τ̂_t,j) = γ_j})
    θ* = θ_0 + λ τ*

`trim=global` takes thr_t over every merged float tensor of model t, `block` within each tensor;
given `trimmed` statistics (τ̂_t) are used as they are. The thresholds are exact k-th order
statistics found by two streaming passes of a radix select over the float32 bit patterns of |τ|.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .base import Block, Method, Pass, docstring_summary, summed

TOP_BINS = 1 << 15  # top 16 bits of a non-negative float32 (sign bit clear)
LOW_BINS = 1 << 16
SLICE = 1 << 18  # elements the passes take at a time: their temporaries stay in the cache and on the heap


@dataclass(frozen=True)
class Ties:
    density: float = 0.2
    scaling_factor: float = 1.0
    trim: Literal["global", "block"] = "global"
    majority_sign: Literal["global", "block"] = "global"

    def __post_init__(self):
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")


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


def elect_and_merge(trimmed: list[torch.Tensor], majority_sign: int) -> torch.Tensor:
    """The disjoint mean τ* of trimmed task vectors, with the elected sign's zeros set to majority_sign.

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


def _group(block: Block, mode: str) -> str:
    return "" if mode == "global" else block.name


def _fold_counts(mode: str):
    """Sum per-model counts per group; a finished tensor's counts (block mode) are kept sparse."""
    def fold(acc, partial, block):
        acc = acc if acc is not None else {}
        group = _group(block, mode)
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


def _slices(block: Block) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor] | None]]:
    """The block's models, base and `trimmed` statistics (if given), flattened, SLICE elements at a time."""
    base = block.base.reshape(-1)
    models = [m.reshape(-1) for m in block.models]
    given = [t.reshape(-1) for t in block.stats["trimmed"]] if "trimmed" in block.stats else None
    for a in range(0, base.numel(), SLICE):
        b = a + SLICE
        yield [m[a:b] for m in models], base[a:b], None if given is None else [t[a:b] for t in given]


def trim_passes(hp: Ties) -> list[Pass]:
    """The two radix-select passes that find each model's exact trim threshold (`state["threshold"]`)."""
    def top_counts(block: Block, hp: Ties, state: dict) -> torch.Tensor:
        counts = torch.zeros(len(block.models), TOP_BINS, dtype=torch.int64, device=block.base.device)
        for models, base, _ in _slices(block):
            for row, m in zip(counts, models):
                row += torch.bincount(task_vector_bits(m, base).bitwise_right_shift_(16), minlength=TOP_BINS)
        return counts.cpu()

    def find_top(acc, hp: Ties, state: dict) -> dict:
        found = {}
        for group, counts in acc.items():
            found[group] = []
            for row in _dense(counts, TOP_BINS):
                rank = threshold_rank(int(row.sum()), hp.density)
                found[group].append(select_bin(row, rank) if rank > 0 else None)
        return {"top": found}

    def low_counts(block: Block, hp: Ties, state: dict) -> torch.Tensor:
        counts = torch.zeros(len(block.models), LOW_BINS, dtype=torch.int64, device=block.base.device)
        tops = state["top"][_group(block, hp.trim)]
        for models, base, _ in _slices(block):
            for row, m, top in zip(counts, models, tops):
                if top is not None:
                    # low 16 bits of the values in the top bin, shifted by one; every other value lands in
                    # bin 0 or LOW_BINS + 1, which are dropped
                    low = task_vector_bits(m, base).sub_(top[0] << 16).clamp_(-1, LOW_BINS).add_(1)
                    row += torch.bincount(low, minlength=LOW_BINS + 2)[1:LOW_BINS + 1]
        return counts.cpu()

    def find_threshold(acc, hp: Ties, state: dict) -> dict:
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

    return [Pass(top_counts, _fold_counts(hp.trim), find_top),
            Pass(low_counts, _fold_counts(hp.trim), find_threshold)]


def _trimmed(models: list[torch.Tensor], base: torch.Tensor, given: list[torch.Tensor] | None,
             thresholds: list[float | None]) -> list[torch.Tensor]:
    return given if given is not None else [trim(m - base, thr) for m, thr in zip(models, thresholds)]


def trimmed_task_vectors(block: Block, hp: Ties, state: dict) -> list[torch.Tensor]:
    """τ̂_t of a block: the given `trimmed` statistics, or the task vectors cut at the found thresholds."""
    thresholds = state["threshold"][_group(block, hp.trim)] if "trimmed" not in block.stats else []
    return _trimmed(block.models, block.base, block.stats.get("trimmed"), thresholds)


def _majority_pass(hp: Ties) -> Pass:
    def sign_sum(block: Block, hp: Ties, state: dict) -> int:
        thresholds = state["threshold"][_group(block, hp.trim)] if "trimmed" not in block.stats else []
        total = 0
        for models, base, given in _slices(block):
            trimmed = _trimmed(models, base, given, thresholds)
            total += int(summed(trimmed).sign_().sum(dtype=torch.float64))
        return total

    def fold(acc, partial, block):
        acc = acc if acc is not None else {}
        group = _group(block, hp.majority_sign)
        acc[group] = acc.get(group, 0) + partial
        return acc

    def finish(acc, hp: Ties, state: dict) -> dict:
        return {"majority": {g: 1 if s >= 0 else -1 for g, s in acc.items()}}

    return Pass(sign_sum, fold, finish)


def _passes(hp: Ties, kinds: frozenset[str]) -> list[Pass]:
    trimming = [] if "trimmed" in kinds else trim_passes(hp)
    return [*trimming, _majority_pass(hp)]


def _merge(block: Block, hp: Ties, state: dict) -> torch.Tensor:
    majority = state["majority"][_group(block, hp.majority_sign)]
    merged = elect_and_merge(trimmed_task_vectors(block, hp, state), majority)
    return merged.mul_(hp.scaling_factor).add_(block.base)


METHOD = Method(name="ties", description=docstring_summary(__doc__), hyperparameters=Ties, merge=_merge,
                needs_base=True, optional_statistics=("trimmed",), passes=_passes)
