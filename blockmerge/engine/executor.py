"""Where a merge's blocks are read, mapped through the method's reduction passes, merged and written: the
executor interface, and the passes and the merge run in this process."""

from __future__ import annotations

import functools
import itertools
import sys
import time
import types
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import BlockmergeError
from ..plugins import Block
from . import faults
from .context import Engine
from .digest import hasher
from .dispatch import compute_block, map_slices
from .output import Journaled, Output
from .plan import BlockRef
from .reader import RawBlock
from .sinks import Sink
from .tensors import tensor_bytes


class Executor(Protocol):
    """Where a merge's blocks are read and mapped (reduction passes), merged and written."""

    def map_blocks(self, engine: Engine, refs: list[BlockRef], index: int, state: dict, desc: str
                   ) -> Iterator[tuple[Block, Any]]:
        """Each block or slice (tensors dropped) and its partial of pass `index`, in plan order."""

    def merge_pass(self, engine: Engine, refs: list[BlockRef], sink: Sink, reopen_sink: Callable[[], Sink] | None,
                   state: dict, output: Output | None) -> tuple[dict[str, str], dict[tuple[int, str], str]]:
        """Every block merged into `sink` (and journaled in `output`); the content digest of each output tensor and of
        each input tensor read. `reopen_sink` opens the sink again (for workers elsewhere)."""


class LocalExecutor:
    """Runs a merge in this process."""

    def map_blocks(self, engine: Engine, refs: list[BlockRef], index: int, state: dict, desc: str
                   ) -> Iterator[tuple[Block, Any]]:
        return map_pass(engine, refs, index, state, desc)

    def merge_pass(self, engine: Engine, refs: list[BlockRef], sink: Sink, reopen_sink: Callable[[], Sink] | None,
                   state: dict, output: Output | None) -> tuple[dict[str, str], dict[tuple[int, str], str]]:
        return _merge_pass(engine, refs, sink, state, output)


@dataclass
class Folded:
    """The fold of a run of blocks' partials (for a pass with `combine`), in place of the partials."""

    acc: Any


MapBlocks = Callable[[Engine, list[BlockRef], int, dict, str], Iterator[tuple[Block, Any] | Folded]]


def run_passes(engine: Engine, refs: list[BlockRef], map_blocks: MapBlocks, output: Output | None = None,
               check: Callable[[], None] | None = None) -> dict:
    """The method's reductions, folded in plan order; `map_blocks` maps the blocks. With an `output`, what the
    first pass read is checked against (and journaled in) its journal, by `check` if one is given."""
    job = engine.job
    state: dict = {}
    passes = job.method.passes(job.hyperparameters, engine.layout.used_kinds)
    merge_refs = [r for r in refs if r.action == "merge"]
    for i, p in enumerate(passes):
        engine.reader.crc_reads = output is not None and i == 0
        started, acc = time.perf_counter(), None
        read = merge_refs if i == 0 or p.wants is None else [r for r in merge_refs if p.wants(r.name, state)]
        for item in map_blocks(engine, read, i, state, f"pass {i + 1}/{len(passes)}"):
            if isinstance(item, Folded):
                acc = item.acc if acc is None else p.combine(acc, item.acc)
            else:
                acc = p.fold(acc, item[1], item[0])
            faults.point("pass")
        state.update(p.finish(acc if acc is not None else {}, job.hyperparameters, types.MappingProxyType(state)))
        seconds = engine.summary.pass_seconds
        if i < len(seconds):  # tensor by tensor: each pass's time summed over the tensors
            seconds[i] += time.perf_counter() - started
        else:
            seconds.append(time.perf_counter() - started)
        if engine.reader.crc_reads:
            (check or functools.partial(_check_passes, engine, refs, output))()
    engine.reader.crc_reads = False
    engine.summary.passes = len(passes) + 1
    return state


def passes_are_local(engine: Engine) -> bool:
    """Whether the method has passes and every one is `local` (they may run tensor by tensor)."""
    passes = engine.job.method.passes(engine.job.hyperparameters, engine.layout.used_kinds)
    return bool(passes) and all(p.local for p in passes)


def merge_tensor_by_tensor(engine: Engine, refs: list[BlockRef], sink: Sink, output: Output | None
                           ) -> tuple[dict[str, str], dict[tuple[int, str], str]]:
    """Each tensor's reduction passes, then its merge, before the next tensor's (for passes that are all `local`):
    the merge reads rows the passes have just read, so they come from the page cache however large the model is,
    where a merge of the whole model after passes over the whole model reads them from disk again.

    A resumed output keeps a tensor's merged blocks only where its passes read the same bytes as in the run that
    merged them (journaled per tensor); checksums as `merge_pass` returns them."""
    checksums: dict[str, str] = {}
    input_checksums: dict[tuple[int, str], str] = {}
    job, reader = engine.job, engine.reader
    passes = len(job.method.passes(job.hyperparameters, engine.layout.used_kinds))
    total = passes * reader.bytes_of([r for r in refs if r.action == "merge"]) + reader.bytes_of(refs)
    reader.bar = reader.progress_bar(total, job.label or job.method.name)
    try:
        for group in by_tensor(refs):
            state = {} if all(r.action != "merge" for r in group) else run_passes(
                engine, group, map_pass, output, functools.partial(_check_tensor_passes, engine, group, output))
            merged, read = _merge_pass(engine, group, sink, state, output)
            checksums.update(merged)
            input_checksums.update(read)
    finally:
        reader.bar.close()
        reader.bar = None
    return checksums, input_checksums


def by_tensor(refs: list[BlockRef]) -> list[list[BlockRef]]:
    """The plan's blocks in runs of one tensor each, in plan order."""
    return [list(g) for _, g in itertools.groupby(refs, key=lambda r: r.name)]


def map_pass(engine: Engine, refs: list[BlockRef], index: int, state: dict, desc: str
                ) -> Iterator[tuple[Block, Any]]:
    """Each block and its partial result of the method's pass `index`, in plan order."""
    job = engine.job
    p = job.method.passes(job.hyperparameters, engine.layout.used_kinds)[index]

    readonly = types.MappingProxyType(state)

    def map_slice(block: Block) -> tuple[Block, Any]:
        partial = p.map(block, engine.hyperparameters_at(block.name), readonly)
        return Block(block.name, block.start, block.stop, block.shape, []), partial

    for raw in engine.reader.blocks(refs, desc):
        yield from map_slices(engine, raw, map_slice)


def write_blocks(engine: Engine, refs: list[BlockRef], sink: Sink, state: dict, done: dict[tuple[str, int, int],
                  Journaled], hashes: dict[str, Any] | None = None
                 ) -> Iterator[tuple[BlockRef, memoryview, Journaled, bool]]:
    """Each block merged and written, or kept where `done` journals it and both its bytes in the sink and the
    inputs read for it still have the journaled checksums (a kept block's reports come from the journal).

    Yields (block, its output bytes, its journal entry, kept) in plan order, each once its bytes are
    written. A block is written on a thread of its own while the next one is merged; with `hashes`, that thread
    also adds each block's bytes, kept ones too, to the content digest of its tensor there, in plan order.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="blockmerge-write") as writer:
        previous = None
        for raw in engine.reader.blocks(refs, engine.job.label or engine.job.method.name):
            ref = raw.ref
            key = (ref.name, ref.start, ref.stop)
            existing = _kept(engine, sink, raw, done[key]) if key in done else None
            if existing is not None:
                if hashes is not None:
                    writer.submit(_hash, hashes, ref.name, existing)
                if previous is not None:
                    yield from _written(engine, *previous)
                    previous = None
                if done[key].reports:
                    engine.summary.reports.setdefault(ref.name, []).extend(done[key].reports)
                yield ref, existing, done[key], True
                continue
            buffer, out = engine.pool.take(engine.layout.out_specs[ref.name], ref.stop - ref.start)
            compute_block(engine, raw, state, out)
            written = writer.submit(_write, sink, ref, out, hashes)
            if previous is not None:
                yield from _written(engine, *previous)
            previous = (ref, out, buffer, written)
        if previous is not None:
            yield from _written(engine, *previous)


def _kept(engine: Engine, sink: Sink, raw: RawBlock, journaled: Journaled) -> memoryview | None:
    """A journaled block's bytes in the sink if they and the inputs read for it are as journaled; else None
    (an input that differs is added to `engine.changed`)."""
    inputs = raw.input_crcs()
    if inputs != journaled.inputs:
        engine.changed.update(r for r in inputs.keys() | journaled.inputs.keys()
                              if inputs.get(r) != journaled.inputs.get(r))
        return None
    try:
        existing = tensor_bytes(sink.read(raw.ref.name, raw.ref.start, raw.ref.stop).contiguous())
    except (BlockmergeError, OSError, ValueError):  # a damaged partial output (tensorstore raises ValueError)
        sink.discard(raw.ref.name, raw.ref.start, raw.ref.stop)
        return None
    return existing if zlib.crc32(existing) == journaled.crc32 else None


def _write(sink: Sink, ref: BlockRef, rows: torch.Tensor, hashes: dict[str, Any] | None) -> int:
    """Write a merged block (and hash it into `hashes`); the CRC-32 of its bytes."""
    sink.write(ref.name, ref.start, rows)
    data = tensor_bytes(rows)
    if hashes is not None:
        _hash(hashes, ref.name, data)
    return zlib.crc32(data)


def _hash(hashes: dict[str, Any], name: str, data: memoryview) -> None:
    hashes.setdefault(name, hasher()).update(data)


def _written(engine: Engine, ref: BlockRef, rows: torch.Tensor, buffer: torch.Tensor, written: Future
             ) -> Iterator[tuple[BlockRef, memoryview, Journaled, bool]]:
    crc = written.result()
    faults.point("write")
    reports = [r for r in engine.summary.reports.get(ref.name, []) if ref.start <= r["rows"][0] < ref.stop]
    yield ref, tensor_bytes(rows), Journaled(crc, engine.reader.block_inputs.get((ref.name, ref.start, ref.stop), {}),
                                             reports), False
    engine.pool.give([buffer])


def _merge_pass(engine: Engine, refs: list[BlockRef], sink: Sink, state: dict, output: Output | None
                ) -> tuple[dict[str, str], dict[tuple[int, str], str]]:
    """Checksums of the output tensors and of the input tensors read."""
    engine.reader.input_hashes = {}
    engine.reader.crc_reads = output is not None
    out_hashes: dict[str, Any] = {}
    for ref, data, entry, kept in write_blocks(engine, refs, sink, state, output.done if output is not None else {},
                                               out_hashes):
        if kept:
            engine.summary.blocks_resumed += 1
            continue
        engine.summary.bytes_written += len(data)
        if output is not None:
            output.record(ref.name, ref.start, ref.stop, entry)
        faults.point("block")
    return ({n: h.hexdigest() for n, h in out_hashes.items()},
            {k: h.hexdigest() for k, h in engine.reader.input_hashes.items()})


def _check_passes(engine: Engine, refs: list[BlockRef], output: Output) -> None:
    """Journal what the reduction passes read; on a resume where it differs from what they read before, the
    merged blocks are forgotten (every one depends on every block read through the passes' state)."""
    merged = [r for r in refs if r.action == "merge"]
    digest = _passes_digest(engine, merged)
    if output.passes == digest:
        return
    if output.passes is not None:
        _note_changed(engine, digest, output.passes)
    for ref in merged:
        output.done.pop((ref.name, ref.start, ref.stop), None)
    output.restart_journal(digest)


def _passes_digest(engine: Engine, refs: list[BlockRef]) -> dict[str, int]:
    """By input role, one checksum of what the first reduction pass read of the blocks `refs`."""
    digest: dict[str, int] = {}
    for ref in refs:
        for role, crc in engine.reader.block_inputs.get((ref.name, ref.start, ref.stop), {}).items():
            digest[role] = zlib.crc32(crc.to_bytes(4, "little"), digest.get(role, 0))
    return digest


def _note_changed(engine: Engine, digest: dict[str, int], previous: dict[str, int]) -> None:
    engine.changed.update(r for r in digest.keys() | previous.keys() if digest.get(r) != previous.get(r))


def _check_tensor_passes(engine: Engine, group: list[BlockRef], output: Output) -> None:
    """`_check_passes` for one tensor's passes: its merged blocks are forgotten where they read other bytes."""
    name = group[0].name
    digest = _passes_digest(engine, [r for r in group if r.action == "merge"])
    if output.tensor_passes.get(name) == digest:
        return
    if name in output.tensor_passes:
        _note_changed(engine, digest, output.tensor_passes[name])
    output.forget([(ref.name, ref.start, ref.stop) for ref in group])
    output.record_tensor_passes(name, digest)


def say_changed(engine: Engine) -> None:
    """One line for each input found to differ from the bytes a resumed partial output was started from."""
    for label in sorted({engine.roles[r] for r in engine.changed if r in engine.roles}):
        print(f"blockmerge: {label} changed since the partial output was started (same size and time, other "
              "bytes): the blocks merged from its old bytes are merged again", file=sys.stderr)
