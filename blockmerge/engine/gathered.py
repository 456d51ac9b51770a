"""A checkpoint whose chosen tensors are rebuilt row by row from rows of other checkpoints (embedding rows put
in another vocabulary's order, a missing row taken from other models or their mean)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .sources import Checkpoint
from .tensors import TensorSpec, torch_dtype

RUN_GAP = 16  # source rows this close together are read in one range


@dataclass(frozen=True)
class RowTerm:
    """Rows `source_rows` of tensor `name` of `source`, added into output rows `rows` (both sorted by `rows`)."""

    source: Checkpoint
    name: str
    rows: torch.Tensor
    source_rows: torch.Tensor


@dataclass(frozen=True)
class GatheredRows:
    """An output tensor of `spec` whose row i is the sum of the terms' rows put at i, divided by `divisors[i]`
    (a row no term reaches is zero); rows from `mean_from` on are the mean of the rows before it."""

    spec: TensorSpec
    terms: tuple[RowTerm, ...]
    divisors: torch.Tensor
    mean_from: int | None = None


class GatheredCheckpoint(Checkpoint):
    """`source` with the tensors of `gathered` rebuilt from rows of other checkpoints; `files` as its other
    files."""

    assembled = True

    def __init__(self, source: Checkpoint, gathered: Mapping[str, GatheredRows], label: str, files: list[Path]):
        self.label = label
        self.source = source
        self.gathered = dict(gathered)
        self.specs = {**source.specs, **{name: g.spec for name, g in self.gathered.items()}}
        self.files = list(files)
        self.means: dict[str, torch.Tensor] = {}

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name not in self.gathered:
            return self.source.read(name, start, stop)
        g = self.gathered[name]
        out = self._sums(g, start, stop)
        if g.mean_from is not None and stop > g.mean_from:
            if name not in self.means:
                self.means[name] = self._mean(g, max(stop - start, 1))
            out[max(g.mean_from - start, 0):] = self.means[name]
        return out.to(torch_dtype(g.spec.dtype))

    @staticmethod
    def _sums(g: GatheredRows, start: int, stop: int) -> torch.Tensor:
        out = torch.zeros((stop - start, *g.spec.shape[1:]), dtype=torch.float32)
        for term in g.terms:
            lo, hi = torch.searchsorted(term.rows, torch.tensor([start, stop])).tolist()
            if lo < hi:
                out.index_add_(0, term.rows[lo:hi] - start, _rows(term.source, term.name, term.source_rows[lo:hi]))
        return out / g.divisors[start:stop].reshape(-1, *[1] * (out.dim() - 1))

    def _mean(self, g: GatheredRows, chunk: int) -> torch.Tensor:
        """The mean of the rows before `mean_from`, summed `chunk` rows at a time."""
        total = torch.zeros(g.spec.shape[1:], dtype=torch.float64)
        for first in range(0, g.mean_from, chunk):
            total += self._sums(g, first, min(first + chunk, g.mean_from)).sum(0, dtype=torch.float64)
        return (total / g.mean_from).float()

    def prefetch(self, name: str, start: int, stop: int) -> None:
        if name not in self.gathered:
            self.source.prefetch(name, start, stop)

    def checksum(self, name: str) -> tuple[str, str] | None:
        return None if name in self.gathered else self.source.checksum(name)

    def paths(self) -> list[Path]:
        sources = {id(self.source): self.source}
        sources.update({id(t.source): t.source for g in self.gathered.values() for t in g.terms})
        return sorted({p for s in sources.values() for p in s.paths()})

    def header(self) -> dict[str, str]:
        return self.source.header()

    def inputs(self) -> list[Checkpoint]:
        every = [self.source, *(t.source for g in self.gathered.values() for t in g.terms)]
        return list({id(c): c for c in every}.values())

    def over(self, inputs: list[Checkpoint]) -> Checkpoint:
        copies = {id(old): new for old, new in zip(self.inputs(), inputs)}
        gathered = {name: dataclasses.replace(g, terms=tuple(dataclasses.replace(t, source=copies[id(t.source)])
                                                             for t in g.terms))
                    for name, g in self.gathered.items()}
        return GatheredCheckpoint(copies[id(self.source)], gathered, self.label, self.files)


def _rows(source: Checkpoint, name: str, wanted: torch.Tensor) -> torch.Tensor:
    """Rows `wanted` of a tensor, in that order, as float32, read in ranges of nearby rows."""
    order = torch.argsort(wanted)
    ordered = wanted[order]
    breaks = (torch.nonzero(ordered[1:] - ordered[:-1] > RUN_GAP).flatten() + 1).tolist()
    pieces = []
    for run in torch.tensor_split(ordered, breaks):
        first, last = int(run[0]), int(run[-1])
        pieces.append(source.read(name, first, last + 1).float()[run - first])
    values = torch.cat(pieces)
    gathered = torch.empty_like(values)
    gathered[order] = values
    return gathered
