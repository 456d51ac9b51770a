"""Kernel dispatch: a block's tensors moved to the device in the compute dtype, and the method run on it, whole or
in slices on the merge threads."""

from __future__ import annotations

import collections
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from typing import Any

import torch

from ..errors import BlockmergeError
from ..plugins import Block, Method, get
from .context import Engine
from .kinds import is_elementwise
from .reader import RawBlock
from .tensors import all_finite

# Elements of one slice of a block merged at a time on the CPU (see compute_block).
SLICE_ELEMENTS = 1 << 18


def to_block(engine: Engine, raw: RawBlock, rows: tuple[int, int] | None = None) -> Block:
    """The block (or its rows `rows`, counted from the block's start) as compute-dtype tensors on the device."""
    def dev(t: torch.Tensor, elementwise: bool = True) -> torch.Tensor:
        if rows is not None and elementwise and t.dim():
            t = t[rows[0]:rows[1]]
        return t.to(engine.device, non_blocking=True).to(engine.compute)

    ref, spec = raw.ref, engine.layout.specs[raw.ref.name]
    start, stop = (ref.start, ref.stop) if rows is None else (ref.start + rows[0], ref.start + rows[1])
    return Block(ref.name, start, stop, spec.shape, [dev(m) for m in raw.models],
                 dev(raw.base) if raw.base is not None else None,
                 {k: [dev(x, is_elementwise(k)) for x in v] for k, v in raw.stats.items()},
                 {k: dev(v, is_elementwise(k)) for k, v in raw.base_stats.items()},
                 inputs={k: dev(v) for k, v in raw.inputs.items()})


def compute_block(engine: Engine, raw: RawBlock, state: dict, out: torch.Tensor) -> torch.Tensor:
    """The merged block, in `out` (the output dtype, on the CPU), merged slice by slice (see `map_slices`)."""
    ref = raw.ref
    if ref.action == "copy":
        return out.copy_(raw.base if raw.base is not None else raw.models[0])
    method = engine.job.method if ref.action == "merge" else get("average")
    hp = engine.hyperparameters_at(ref.name) if ref.action == "merge" else method.hyperparameters()
    readonly = types.MappingProxyType(state)

    def merge_slice(block: Block) -> tuple[int, int, dict]:
        if method.prepare is not None:
            block.prepared = engine.prepare(method, block, hp, readonly)
        result = method.merge(block, hp, readonly)
        expected = block.models[0].shape
        if tuple(result.shape) != tuple(expected):
            raise BlockmergeError(f"{method.name} returned shape {list(result.shape)} for a block of shape "
                                  f"{list(expected)}", param=ref.name)
        target = out[block.start - ref.start:block.stop - ref.start] if out.dim() else out
        target.copy_(result)
        if not all_finite(target):
            raise BlockmergeError(f"{method.name} produced NaN or Inf in "
                                  f"{engine.layout.out_specs[ref.name].dtype} (check the hyperparameters, "
                                  "statistics and --dtype)", param=ref.name)
        return block.start, block.stop, block.report

    for start, stop, report in map_slices(engine, raw, merge_slice, method):
        if report:
            engine.summary.reports.setdefault(ref.name, []).append({"rows": [start, stop], **report})
    return out


def merged_whole(method: Method, shape: tuple[int, ...]) -> bool:
    """Whether the method merges a tensor of this shape in one block: every tensor for `tensor` granularity, and a
    tensor of at most one dimension (one row) for `rows`."""
    return method.granularity == "tensor" or (method.granularity == "rows" and len(shape) <= 1)


def slice_rows(engine: Engine, name: str, method: Method) -> int | None:
    """Rows of each slice `map_slices` cuts a block of the tensor into; None: blocks are not cut."""
    spec = engine.layout.specs[name]
    if not merged_whole(method, spec.shape) and engine.device.type == "cpu" and spec.shape and spec.nbytes:
        return max(1, SLICE_ELEMENTS // max(1, spec.row_numel))
    return None


def map_slices(engine: Engine, raw: RawBlock, fn: Callable[[Block], Any], method: Method | None = None
               ) -> Iterator[Any]:
    """fn of the block, or for a row-wise method on the CPU of each of its slices of about SLICE_ELEMENTS
    elements, in order; with `engine.workers`, slices run on those threads, a few at a time.

    Slices give the same bytes as whole blocks (row-wise methods do not depend on the block
    size), and their temporaries stay in the cache and come from the heap, not fresh pages.
    """
    method = method or engine.job.method
    shape = raw.models[0].shape
    rows = shape[0] if len(shape) else 1
    step = slice_rows(engine, raw.ref.name, method) or rows
    ranges = [None] if step >= rows else [(first, min(rows, first + step)) for first in range(0, rows, step)]

    def task(rows: tuple[int, int] | None) -> Any:
        return fn(to_block(engine, raw, rows))

    if engine.workers is None or len(ranges) == 1:
        yield from map(task, ranges)
        return
    window: collections.deque[Future] = collections.deque()
    try:
        for rows in ranges:
            window.append(engine.workers.submit(task, rows))
            if len(window) > 2 * engine.worker_count:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        for pending in window:
            pending.cancel()
        wait(window)
