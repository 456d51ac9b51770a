"""Exact magnitude order statistics of task vectors, found out of core (docs/methods.md §4.2), and the cuts they set.

Each model's entries of a group (the whole model, `global`, or one tensor, `block`) are ordered by
|τ| = |θ_t − θ_0| ascending, equal magnitudes in index order (tensors by name, then flat index). A
`Band` keeps the positions [low, high) of that order:

    TIES's official trim:     [K − int(d·K) − 1, K) and every entry tied with the lowest kept one
    exactly the top int(d·K):  [K − int(d·K), K)                 (mergekit's magnitude sparsifier)
    breadcrumbs:              [K − int(d·K) − int(γ·K), K − int(γ·K))

The values at the band's ends are exact order statistics, found by two streaming passes of a radix
select over the float32 bit patterns of |τ| (the top 16 bits, then the low 16 bits inside the
selected top bin). Where an end falls inside a run of equal non-zero magnitudes, a third pass counts
those ties per row, so each block knows how many came before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BlockmergeError
from .base import Block, Pass
from .hyperparameters import each_model

TOP_BINS = 1 << 15  # top 16 bits of a non-negative float32 (sign bit clear)
LOW_BINS = 1 << 16
SLICE = 1 << 18  # elements the passes take at a time: their temporaries stay in the cache and on the heap
Scope = Literal["global", "block"]


@dataclass(frozen=True)
class Band:
    """Positions [low, high) of a group's ascending magnitude order that are kept; with `all_ties`, every entry
    equal to the one at `low` too (a threshold |τ| ≥ value)."""

    low: int
    high: int
    all_ties: bool = False


class Bands:
    """What a sparsifier that keeps bands gives the passes: each model's band of a group of `numel` entries, of which
    `nonzero[t]` are not 0 for model t.

    Instances compare equal when they give the same bands (a `global` group checks its tensors agree). `exact`:
    a band's ends may split a run of equal magnitudes (it has no `all_ties`)."""

    exact = True

    def bands(self, numel: int, nonzero: list[int]) -> list[Band]:
        raise NotImplementedError


@dataclass(frozen=True)
class TopDensity(Bands):
    """TIES's official trim of each model t: int(d_t·K)+1 entries and their ties (every entry when int(d_t·K) = K)."""

    densities: float | tuple[float, ...]
    exact = False

    def bands(self, numel: int, nonzero: list[int]) -> list[Band]:
        return [Band(max(0, numel - int(numel * d) - 1), numel, all_ties=True)
                for d in each_model(self.densities, len(nonzero))]


@dataclass(frozen=True)
class TopCount(Bands):
    """Exactly the int(d_t·K) largest magnitudes of each model t (ties in index order)."""

    densities: float | tuple[float, ...]

    def bands(self, numel: int, nonzero: list[int]) -> list[Band]:
        return [Band(numel - int(numel * d), numel) for d in each_model(self.densities, len(nonzero))]


@dataclass(frozen=True)
class Cut:
    """One model's cut of a group, as bit patterns of float32 magnitudes: kept are |τ| > low (or ≥ low after the
    first `low_skip` entries equal to it) and |τ| < high (or ≤ high for the first `high_take` entries equal to
    it). None: no bound on that side. `empty`: nothing is kept."""

    low: int | None = None
    low_skip: int = 0
    high: int | None = None
    high_take: int | None = None
    empty: bool = False

    @property
    def counts_ties(self) -> bool:
        """Whether the tie index of entries at an end decides what is kept."""
        return self.low_skip > 0 or self.high_take is not None

    @property
    def threshold(self) -> float | None:
        """The cut as one threshold (|τ| ≥ it is kept), where it is one."""
        if self.empty or self.high is not None or self.low_skip:
            return None
        return 0.0 if self.low is None else float(torch.tensor([self.low], dtype=torch.int32).view(torch.float32)[0])


def task_vector_bits(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |model − base| in float32: ordered as the magnitudes are."""
    return torch.sub(model, base, out=torch.empty_like(base, dtype=torch.float32)).abs_().view(torch.int32)


def select_bin(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the rank-th smallest value (1-based) and the rank within that bin."""
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


def _finished(block: Block) -> bool:
    return block.stop == (block.shape[0] if block.shape else 1)


def _fold_counts(mode: str):
    """Sum per-model counts per group (with the group's `Bands`); a finished tensor's counts (block mode) are
    kept sparse."""
    def fold(acc, partial, block):
        counts, bands = partial
        acc = acc if acc is not None else {}
        group = group_of(block, mode)
        if group in acc:
            if acc[group][1] != bands:
                raise BlockmergeError(f"the trim's densities differ between tensors ({acc[group][1]} and {bands}): "
                                      "a density that varies needs the trim within each tensor", param=block.name)
            acc[group][0].add_(counts)
        else:
            acc[group] = [counts, bands]
        if mode == "block" and _finished(block):
            dense = acc[group][0]
            acc[group][0] = [(row.nonzero().flatten(), row[row != 0]) for row in dense.reshape(-1, dense.shape[-1])]
        return acc
    return fold


def _combine_counts(acc, later):
    """`_fold_counts`'s accumulation of a later run of blocks added to `acc`: a group in both has dense counts (a
    tensor's blocks are folded in one run, so only a `global` group spans runs)."""
    for group, (counts, bands) in later.items():
        if group not in acc:
            acc[group] = [counts, bands]
        elif acc[group][1] != bands:
            raise BlockmergeError(f"the trim's densities differ between tensors ({acc[group][1]} and {bands}): a "
                                  "density that varies needs the trim within each tensor")
        else:
            acc[group][0].add_(counts)
    return acc


def _dense(counts, size: int) -> torch.Tensor:
    if isinstance(counts, list):
        return torch.stack([torch.zeros(size, dtype=torch.int64).index_put_((bins,), values)
                            for bins, values in counts])
    return counts.reshape(-1, size)


Magnitudes = Callable[[list[torch.Tensor], torch.Tensor], list[torch.Tensor]]
BlockMagnitudes = Callable[[Block, Mapping[str, Any]], list[torch.Tensor]]


def task_vector_magnitudes(models: list[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """int32 bit patterns of each model's |θ_t − θ_0| in float32: the default values bands are cut from."""
    return [task_vector_bits(m, base) for m in models]


def _slices(block: Block, state: Mapping[str, Any], magnitudes: Magnitudes | None,
            whole: BlockMagnitudes | None) -> Iterator[list[torch.Tensor]]:
    """The bit patterns of the block's magnitudes, flattened, SLICE elements at a time."""
    if whole is not None:
        every = [b.reshape(-1) for b in whole(block, state)]
        for a in range(0, every[0].numel(), SLICE):
            yield [b[a:a + SLICE] for b in every]
        return
    base = block.base.reshape(-1)
    models = [m.reshape(-1) for m in block.models]
    for a in range(0, base.numel(), SLICE):
        b = a + SLICE
        yield magnitudes([m[a:b] for m in models], base[a:b])


def _zeros(bits: torch.Tensor) -> int:
    """How many entries are 0."""
    if bits.device.type == "cpu":
        return bits.numel() - int(np.count_nonzero(bits.numpy()))
    return int((bits == 0).sum())


def _low_histogram(bits: torch.Tensor, top_bits: torch.Tensor, top: int) -> torch.Tensor:
    """Counts of the low 16 bits of the entries whose top 16 bits (`top_bits`) are `top`."""
    if bits.device.type == "cpu":
        low = bits.numpy()[top_bits.numpy() == top] & (LOW_BINS - 1)
        return torch.from_numpy(np.bincount(low, minlength=LOW_BINS))
    return torch.bincount(bits[top_bits == top].bitwise_and_(LOW_BINS - 1), minlength=LOW_BINS)


def value_of(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def band_passes(bands_of: Callable[[Any], Bands], mode: Scope, exact: bool,
                magnitudes: Magnitudes = task_vector_magnitudes, count: Callable[[Block], int] | None = None,
                block_magnitudes: BlockMagnitudes | None = None) -> list[Pass]:
    """The passes that find each model's `Cut` of each group (`state["cut"][group]`): `bands_of(hyperparameters
    at the tensor)` says which band of the ascending magnitude order is kept. `exact`: ends may split runs of equal
    magnitudes (a band without `all_ties`), so the ties before each row are counted where they do. `magnitudes`
    gives the int32 bit patterns of the non-negative float32 values ordered (default: each model's |τ|) from slices
    of the models and base, `block_magnitudes(block, state)` from a whole block (for values that need whole rows
    or the state of an earlier pass), and
    `count(block)` how many such values each entry has (default: one per model)."""
    count = count or (lambda block: len(block.models))

    def top_counts(block: Block, hp: Any, state: Mapping[str, Any]):
        counts = torch.zeros(count(block), TOP_BINS + 1, dtype=torch.int64, device=block.base.device)
        for bits in _slices(block, state, magnitudes, block_magnitudes):
            for t, b in enumerate(bits):
                same = next((k for k in range(t) if bits[k] is b), None)  # one value set given for several bands
                if same is not None:
                    counts[t] = counts[same]
                    continue
                counts[t, TOP_BINS] += _zeros(b)
                counts[t, :TOP_BINS] += torch.bincount(b.bitwise_right_shift(16), minlength=TOP_BINS)
        return counts.cpu(), bands_of(hp)

    def find_ends(acc, hp: Any, state: Mapping[str, Any]) -> dict:
        """Per group and model, the ends of its band: (side, position, top bin, rank in the bin, count below)."""
        ends = {}
        for group, (counts, bands) in acc.items():
            rows = _dense(counts, TOP_BINS + 1)
            zeros, rows = rows[:, TOP_BINS], rows[:, :TOP_BINS]
            numel = int(rows[0].sum())
            ends[group] = []
            for row, band in zip(rows, bands.bands(numel, [numel - int(z) for z in zeros])):
                low, high = max(0, band.low), min(numel, band.high)
                if low >= high:
                    ends[group].append(None)
                    continue
                below = row.cumsum(0)
                found = []
                for side, position in (("low", low), ("high", high - 1)):
                    if (side == "low" and low > 0) or (side == "high" and high < numel):
                        top, rank = select_bin(row, position + 1)
                        found.append((side, position, top, rank, int(below[top - 1]) if top else 0, band.all_ties))
                ends[group].append(found)
        return {"ends": ends}

    def low_counts(block: Block, hp: Any, state: Mapping[str, Any]) -> torch.Tensor:
        ends = state["ends"][group_of(block, mode)]
        counts = torch.zeros(count(block), 2, LOW_BINS, dtype=torch.int64, device=block.base.device)
        for bits in _slices(block, state, magnitudes, block_magnitudes):
            tops: dict[int, torch.Tensor] = {}
            histograms: dict[tuple[int, int], torch.Tensor] = {}
            for rows, b, found in zip(counts, bits, ends):
                for row, (_, _, top, _, _, _) in zip(rows, found or ()):
                    if (id(b), top) not in histograms:
                        top_bits = tops.setdefault(id(b), b.bitwise_right_shift(16))
                        histograms[id(b), top] = _low_histogram(b, top_bits, top)
                    row += histograms[id(b), top]
        return counts.cpu(), None

    def find_cuts(acc, hp: Any, state: Mapping[str, Any]) -> dict:
        cuts = {}
        for group, (counts, _) in acc.items():
            rows = _dense(counts, LOW_BINS).reshape(-1, 2, LOW_BINS)
            cuts[group] = [_cut(found, pair) for found, pair in zip(state["ends"][group], rows)]
        return {"cut": cuts}

    def tie_counts(block: Block, hp: Any, state: Mapping[str, Any]) -> torch.Tensor:
        """Per model, end and row of the block: the entries equal to the value at that end."""
        rows = block.stop - block.start
        counts = torch.zeros(count(block), 2, rows, dtype=torch.int64)
        every = block_magnitudes(block, state) if block_magnitudes else magnitudes(block.models, block.base)
        for bits, out, cut in zip(every, counts, state["cut"][group_of(block, mode)]):
            bits = bits.reshape(rows, -1)
            for row, value in zip(out, (cut.low, cut.high)):
                if value is not None:
                    row += (bits == value).sum(1, dtype=torch.int64).cpu()
        return counts

    def fold_ties(acc, partial: torch.Tensor, block: Block):
        acc = acc if acc is not None else {}
        acc.setdefault(group_of(block, mode), {}).setdefault(block.name, []).append((block.start, partial))
        return acc

    def ties_before(acc, hp: Any, state: Mapping[str, Any]) -> dict:
        """Per tensor: for each model, end and row, the group's entries equal to the end's value before the row."""
        before = {}
        for tensors in acc.values():
            carried = None
            for name in sorted(tensors):
                counts = torch.cat([p for _, p in sorted(tensors[name], key=lambda part: part[0])], dim=2)
                prefix = counts.cumsum(2) - counts
                if carried is not None:
                    prefix += carried.unsqueeze(2)
                before[name] = prefix
                carried = prefix[:, :, -1] + counts[:, :, -1]
        return {"ties_before": before}

    def wants_ties(name: str, state: Mapping[str, Any]) -> bool:
        return any(c.counts_ties for c in state["cut"].get("" if mode == "global" else name, ()))

    def combine_ties(acc, later):
        for group, tensors in later.items():
            for name, parts in tensors.items():
                acc.setdefault(group, {}).setdefault(name, []).extend(parts)
        return acc

    local = mode == "block"
    passes = [Pass(top_counts, _fold_counts(mode), find_ends, local=local, combine=_combine_counts),
              Pass(low_counts, _fold_counts(mode), find_cuts, local=local, combine=_combine_counts)]
    return [*passes, Pass(tie_counts, fold_ties, ties_before, wants=wants_ties, local=local, combine=combine_ties)
            ] if exact else passes


def _cut(found: list | None, counts: torch.Tensor) -> Cut:
    """A model's cut from the ends of its band (`find_ends`) and the low-bit counts in their top bins."""
    if found is None:
        return Cut(empty=True)
    fields: dict[str, Any] = {}
    for row, (side, position, top, rank, below, all_ties) in zip(counts, found):
        low_bin, _ = select_bin(row, rank)
        bits = (top << 16) | low_bin
        less = below + int(row[:low_bin].sum())
        equal = int(row[low_bin])
        zero = value_of(bits) == 0.0  # keeping or dropping zeros changes nothing
        if side == "low":
            fields["low"] = bits
            fields["low_skip"] = 0 if all_ties or zero else position - less
        else:
            fields["high"] = bits
            take = position - less + 1
            fields["high_take"] = None if zero or take >= equal else take
    return Cut(**fields)


def _tie_index(bits: torch.Tensor, value: int, before: int) -> torch.Tensor:
    """Each entry's index among the group's entries equal to `value` (meaningful where it equals it)."""
    equal = (bits.reshape(-1) == value)
    return (torch.cumsum(equal, 0) - 1 + before).reshape(bits.shape)


def in_cut(bits: torch.Tensor, cut: Cut, before: torch.Tensor | None) -> torch.Tensor:
    """Which values (int32 bit patterns of non-negative float32) the cut keeps; `before` holds, for the block's first
    row, the group's values equal to each end's that come earlier (needed where `cut.counts_ties`)."""
    keep = torch.ones_like(bits, dtype=torch.bool)
    if cut.empty:
        return keep.logical_not_()
    if cut.low is not None:
        above = bits > cut.low
        if cut.low_skip:
            above |= (bits == cut.low) & (_tie_index(bits, cut.low, int(before[0])) >= cut.low_skip)
        else:
            above |= bits == cut.low
        keep &= above
    if cut.high is not None:
        below = bits < cut.high
        if cut.high_take is not None:
            below |= (bits == cut.high) & (_tie_index(bits, cut.high, int(before[1])) < cut.high_take)
        else:
            below |= bits == cut.high
        keep &= below
    return keep


def cut_task_vector(model: torch.Tensor, base: torch.Tensor, cut: Cut, before: torch.Tensor | None,
                    ) -> torch.Tensor:
    """τ = model − base with the entries outside the cut set to 0 (`before` as `in_cut` takes it)."""
    task_vector = model - base
    if cut.empty:
        return task_vector.zero_()
    threshold = cut.threshold
    if threshold is not None:
        return trim(task_vector, threshold)
    return task_vector.mul_(in_cut(task_vector_bits(model, base), cut, before))


def ties_before_block(block: Block, state: Mapping[str, Any], index: int) -> torch.Tensor | None:
    """For ordered values `index` of the block: the group's values equal to each end's before its first row."""
    before = state.get("ties_before", {}).get(block.name)
    return None if before is None else before[index, :, block.start]


def cut_task_vectors(block: Block, mode: str, state: Mapping[str, Any]) -> list[torch.Tensor]:
    """τ̂_t of a block: the given `trimmed` statistics, or the task vectors cut as the passes found."""
    if "trimmed" in block.stats:
        return block.stats["trimmed"]
    cuts = state["cut"][group_of(block, mode)]
    return [cut_task_vector(m, block.base, cut, ties_before_block(block, state, t))
            for t, (m, cut) in enumerate(zip(block.models, cuts))]
