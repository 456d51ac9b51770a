"""The block plan: which row ranges of which tensors are read, merged and written together."""

from __future__ import annotations

from dataclasses import dataclass

from .tensors import TensorSpec

# Reads, merges and writes overlap, so about four blocks' bytes are in flight: 8 MiB keeps a merge's buffers near
# 40 MiB above the interpreter and torch, and larger blocks were no faster (every method, 191M Llama family).
DEFAULT_BLOCK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class BlockRef:
    """Rows start..stop of one tensor, and what happens to them (`merge`, `average` or `copy`)."""

    name: str
    start: int
    stop: int
    action: str


def rows_per_block(input_row_bytes: int, budget: int) -> int:
    """Rows of a tensor whose inputs stay within `budget` bytes (at least one)."""
    return max(1, budget // max(1, input_row_bytes))


def row_blocks(spec: TensorSpec, input_row_bytes: int, budget: int, align: int) -> list[tuple[int, int]]:
    """Row ranges of a tensor whose inputs stay within `budget` bytes, cut at multiples of `align` rows; a tensor
    of no bytes (a zero in its shape) is one range, however many rows it has."""
    rows = spec.rows
    if not spec.numel:
        return [(0, rows)]
    per_block = rows_per_block(input_row_bytes, budget)
    if per_block >= align:
        per_block -= per_block % align
    return [(start, min(rows, start + per_block)) for start in range(0, rows, per_block)] or [(0, 0)]


def plan(specs: dict[str, TensorSpec], actions: dict[str, str], input_row_bytes: dict[str, int],
         budget: int, align: dict[str, int], whole: set[str]) -> list[BlockRef]:
    """Blocks in name order; tensors in `whole` are never cut."""
    out = []
    for name in sorted(specs):
        spec = specs[name]
        ranges = [(0, spec.rows)] if name in whole else row_blocks(spec, input_row_bytes[name], budget, align[name])
        out.extend(BlockRef(name, a, b, actions[name]) for a, b in ranges)
    return out
