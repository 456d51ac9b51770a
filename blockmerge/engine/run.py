"""Runs a merge: checks every input before reading data, then streams blocks through the method."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..errors import BlockmergeError
from ..plugins import Block, Common, Method, get
from . import faults, memory
from .buffers import BufferPool
from .kinds import is_elementwise, statistic_shape
from .output import Journaled, Output, os_error
from .plan import BlockRef, plan
from .sinks import DictSink, Sink, open_sink
from .sources import Checkpoint, StoreCheckpoint
from .store import chunk_rows
from .tensors import FLOATING, TensorSpec, all_finite, itemsize, tensor_bytes, torch_dtype

# Elements of one slice of a block merged at a time on the CPU (see Engine.compute_block).
SLICE_ELEMENTS = 1 << 18
# Characters of the provenance around one report of a method, or around one tensor's list of them (a bound).
REPORT_ENTRY_BYTES = 64


@dataclass
class Job:
    """Everything a merge needs, already opened (nothing read yet)."""

    method: Method
    hyperparameters: Any
    common: Common
    models: list[Checkpoint]
    base: Checkpoint | None = None
    stats: list[dict[str, Checkpoint]] = field(default_factory=list)
    base_stats: dict[str, Checkpoint] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str | None = None
    compute_dtype: str = "float32"
    block_bytes: int = 32 * 1024 * 1024
    progress: bool = False
    label: str | None = None  # the progress bar's label (default: the method's name)


@dataclass
class Summary:
    """What a merge did and what it cost."""

    method: str
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_rss_anon_bytes: int = 0
    peak_rss_file_bytes: int = 0
    peak_gpu_bytes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    blocks: int = 0
    passes: int = 0
    pass_seconds: list[float] = field(default_factory=list)  # each reduction pass before the merge
    tensors_merged: int = 0
    tensors_copied: int = 0
    tensors_averaged_missing_statistic: int = 0
    blocks_resumed: int = 0
    output: str | None = None
    reports: dict[str, list[dict]] = field(default_factory=dict)  # per tensor, one entry per block a method reported on


@dataclass
class Layout:
    """What happens to each tensor, decided before any data is read."""

    specs: dict[str, TensorSpec]
    out_specs: dict[str, TensorSpec]
    actions: dict[str, str]
    stat_kinds: dict[str, tuple[str, ...]]
    used_kinds: frozenset[str]


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BlockmergeError(f"unknown device {name!r} (cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BlockmergeError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BlockmergeError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif device.type != "cpu":
        raise BlockmergeError(f"unsupported device {name!r} (cpu, cuda or cuda:N)")
    return device


def check(job: Job) -> Layout:
    """Validate names, shapes, dtypes, statistics and options; decide each tensor's action."""
    method = job.method
    needs = method.needs(job.hyperparameters)
    if not job.models:
        raise BlockmergeError(f"{method.name} needs at least one model")
    if needs.base and job.base is None:
        raise BlockmergeError(f"{method.name} needs a base (pretrained) checkpoint: pass base= / --base")
    if method.check is not None:
        try:
            method.check(job.hyperparameters, len(job.models))
        except ValueError as err:
            raise BlockmergeError(f"{method.name}: {err}") from None
    if job.dtype is not None and job.dtype not in FLOATING:
        raise BlockmergeError(f"unknown output dtype {job.dtype!r} (choose from {', '.join(sorted(FLOATING))})")
    if job.compute_dtype not in ("float32", "float64"):
        raise BlockmergeError(f"compute dtype must be float32 or float64, got {job.compute_dtype!r}")
    _device(job.device)
    try:
        excludes = [re.compile(p) for p in job.common.exclude]
    except re.error as err:
        raise BlockmergeError(f"exclude: bad regular expression ({err})") from None

    reference = job.models[0]
    specs = reference.specs
    for other in [*job.models[1:], *([job.base] if job.base else [])]:
        for name in sorted(set(specs) | set(other.specs)):
            if name not in other.specs:
                raise BlockmergeError(f"missing (present in {reference.label})", path=other.label, param=name)
            if name not in specs:
                raise BlockmergeError(f"not in {reference.label}", path=other.label, param=name)
            a, b = specs[name], other.specs[name]
            if a.shape != b.shape:
                raise BlockmergeError(f"shape {list(b.shape)} does not match {list(a.shape)} in {reference.label}",
                                      path=other.label, param=name)
            if a.dtype != b.dtype:
                raise BlockmergeError(f"dtype {b.dtype} does not match {a.dtype} in {reference.label}",
                                      path=other.label, param=name)
    if len(job.stats) not in (0, len(job.models)):
        raise BlockmergeError(f"statistics given for {len(job.stats)} models, there are {len(job.models)}")
    supplied = [set(s) for s in job.stats] or [set() for _ in job.models]
    for kind in needs.statistics:
        for t, kinds in enumerate(supplied):
            if kind not in kinds:
                raise BlockmergeError(f"{method.name} reads {kind!r} statistics; none given for model {t} "
                                      f"({job.models[t].label})")
    for t, kinds in enumerate(supplied):
        if needs.one_of_statistics and not kinds & set(needs.one_of_statistics):
            raise BlockmergeError(f"{method.name} reads {' or '.join(map(repr, needs.one_of_statistics))} "
                                  f"statistics; none given for model {t} ({job.models[t].label})")
    for kind in method.base_statistics:
        if kind not in job.base_stats:
            raise BlockmergeError(f"{method.name} reads {kind!r} statistics of the base; none given")
    optional = {k for k in needs.optional_statistics + needs.one_of_statistics if all(k in s for s in supplied)}
    used = frozenset(needs.statistics) | frozenset(optional)
    declared = needs.statistics + needs.optional_statistics + needs.one_of_statistics
    for ckpts in [*job.stats, job.base_stats]:
        for kind, ckpt in ckpts.items():
            _check_statistic(kind, ckpt, specs)

    actions, stat_kinds, out_specs = {}, {}, {}
    for name, spec in specs.items():
        out_dtype = (job.dtype or spec.dtype) if spec.floating else spec.dtype
        out_specs[name] = TensorSpec(spec.shape, out_dtype)
        if not spec.floating or any(p.search(name) for p in excludes):
            actions[name] = "copy"
            continue
        present = {k: [k in s and name in s[k].specs for s in job.stats] for k in used}
        for kind, flags in present.items():
            if any(flags) and not all(flags):
                t = flags.index(False)
                raise BlockmergeError(f"no {kind!r} statistic for model {t} ({job.models[t].label}) "
                                      "while other models have one", param=name)
        for kind in method.base_statistics:
            if name not in job.base_stats[kind].specs and job.common.missing_statistic == "error":
                raise BlockmergeError(f"no {kind!r} statistic of the base", param=name)
        together = [k for k in dict.fromkeys(declared) if statistic_shape(k, spec.shape) is not None]
        have = [k for k in together if k in used and all(present[k])]
        if have and len(have) < len(together):
            lacking = next(k for k in together if k not in have)
            raise BlockmergeError(f"has a {have[0]!r} statistic but no {lacking!r} statistic; {method.name} reads "
                                  "them together", param=name)
        applicable = [k for k in sorted(used) if k in together]
        missing = [k for k in applicable if not all(present[k])] if applicable else sorted(used)
        missing += [k for k in method.base_statistics if name not in job.base_stats[k].specs]
        if missing:
            if job.common.missing_statistic == "error":
                raise BlockmergeError(f"no {missing[0]!r} statistic (missing_statistic=error)", param=name)
            actions[name] = "average"
            continue
        actions[name] = "merge"
        stat_kinds[name] = tuple(applicable)
    return Layout(specs, out_specs, actions, stat_kinds, used)


def _check_statistic(kind: str, ckpt: Checkpoint, specs: dict[str, TensorSpec]) -> None:
    for name, spec in ckpt.specs.items():
        if name not in specs:
            raise BlockmergeError(f"{kind!r} statistic for a parameter the models do not have", path=ckpt.label,
                                  param=name)
        expected = statistic_shape(kind, specs[name].shape)
        if expected is None:
            raise BlockmergeError(f"{kind!r} statistics do not apply to a tensor of shape {list(specs[name].shape)}",
                                  path=ckpt.label, param=name)
        if spec.shape != tuple(expected):
            raise BlockmergeError(f"{kind!r} statistic has shape {list(spec.shape)}, expected {list(expected)}",
                                  path=ckpt.label, param=name)
        if not spec.floating:
            raise BlockmergeError(f"{kind!r} statistic has dtype {spec.dtype}, expected a float type",
                                  path=ckpt.label, param=name)


@dataclass
class _Raw:
    """One block's inputs as read from disk (CPU tensors in their stored dtypes)."""

    ref: BlockRef
    models: list[torch.Tensor]
    base: torch.Tensor | None
    stats: dict[str, list[torch.Tensor]]
    base_stats: dict[str, torch.Tensor]
    nbytes: int
    loan: _Loan
    pool: BufferPool
    crcs: dict[str, int]  # by input role, a checksum of the bytes read (complete once `input_crcs` returns)

    def input_crcs(self) -> dict[str, int]:
        """A checksum of the bytes read of each input, by role, once they are computed."""
        for hashing in self.loan.hashing:
            hashing.result()
        return dict(self.crcs)

    def release(self) -> None:
        """Drop the tensors and settle their loan (the consumer is done with the block; its loop variable may
        outlive it)."""
        self.models, self.base, self.stats, self.base_stats = [], None, {}, {}
        loan, self.loan = self.loan, _Loan()
        loan.settle(self.pool)


@dataclass
class _Loan:
    """What a block's tensors rest on until it is released: pool buffers, and their hashing in flight."""

    buffers: list[torch.Tensor] = field(default_factory=list)
    hashing: list[Future] = field(default_factory=list)

    def settle(self, pool: BufferPool) -> None:
        """Wait for the hashing, then give the buffers back. Raises what hashing found (a checksum mismatch)."""
        try:
            for hashing in self.hashing:
                hashing.result()
        finally:
            pool.give(self.buffers)


class Engine:
    def __init__(self, job: Job, layout: Layout):
        self.job, self.layout = job, layout
        self.device = _device(job.device)
        self.compute = torch_dtype(job.compute_dtype)
        self.summary = Summary(method=job.method.name)
        self.input_hashes: dict[tuple[int, str], Any] | None = None
        self.crc_reads = False  # whether reads compute the checksums that resuming checks
        self.block_inputs: dict[tuple[str, int, int], dict[str, int]] = {}  # checksums of each block read, by role
        self.roles = {f"models[{t}]": m.label for t, m in enumerate(job.models)}
        self.roles.update({"base": job.base.label} if job.base else {})
        self.roles.update({f"stats[{t}].{k}": c.label for t, s in enumerate(job.stats) for k, c in s.items()})
        self.roles.update({f"base_stats.{k}": c.label for k, c in job.base_stats.items()})
        self.changed: set[str] = set()  # roles of inputs found to differ from what a resumed output was merged from
        self.labels = [m.label for m in job.models] + ([job.base.label] if job.base else [])
        self.peak_parts = (0, 0)  # (anonymous, file-backed) resident bytes, sampled after each block
        self.checked: set[tuple[int, str, int, int]] = set()  # (input, name, rows) found finite in an earlier pass
        # The whole statistics (Grams) of the parameter read last, kept for its next row blocks.
        self.whole_name: str | None = None
        self.whole_stats: dict[tuple, torch.Tensor] = {}
        self.fresh: set[tuple] = set()  # keys of whole_stats read by the latest read()
        self.hasher: ThreadPoolExecutor | None = None  # hashes inputs while blocks() runs
        self.workers: ThreadPoolExecutor | None = None  # merges slices in parallel (see map_slices)
        self.worker_count = 0
        # Buffers for the block being merged and the one read ahead (each input and statistic), and its output.
        self.pool = BufferPool(keep=2 * (len(job.models) + 1) * (1 + len(job.stats and job.stats[0])) + 1)

    def _inputs(self, ref: BlockRef) -> tuple[list[int], bool]:
        """Which models and whether the base are read for a block."""
        job = self.job
        if ref.action == "copy":
            return ([], True) if job.base is not None else ([0], False)
        return list(range(len(job.models))), ref.action == "merge" and job.base is not None and (
            job.method.needs_base or job.method.base_statistics != ())

    def _read(self, ckpt: Checkpoint, index: int, role: str, name: str, start: int, stop: int, crcs: dict[str, int],
              loan: _Loan | None = None) -> torch.Tensor:
        """Rows of a tensor, checked finite and hashed (a checksum into `crcs[role]`); into a pool buffer lent to
        `loan` if one is given."""
        if loan is None:
            t = ckpt.read(name, start, stop)
        else:
            buffer, out = self.pool.take(ckpt.specs[name], stop - start)
            t = ckpt.read_into(name, start, stop, out)
            if t is out:
                loan.buffers.append(buffer)
            else:
                self.pool.give([buffer])
        seen = (id(ckpt), name, start, stop)
        if t.is_floating_point() and seen not in self.checked:
            if not all_finite(t):
                raise BlockmergeError("contains NaN or Inf", path=ckpt.label, param=name)
            self.checked.add(seen)
        index = index if self.input_hashes is not None else -1
        if index >= 0 or self.crc_reads:
            if self.hasher is not None and loan is not None:
                loan.hashing.append(self.hasher.submit(self._hash, ckpt, index, role, name, t, stop, crcs))
            else:
                self._hash(ckpt, index, role, name, t, stop, crcs)
        return t

    def _hash(self, ckpt: Checkpoint, index: int, role: str, name: str, t: torch.Tensor, stop: int,
              crcs: dict[str, int]) -> None:
        """A 32-bit checksum of the rows into `crcs[role]` (when `crc_reads`); for `index` >= 0, the rows (up to
        `stop`) added to the input's running sha256, checked against a stored checksum at the tensor's end.

        With a running sha256 the checksum is taken from it (it covers the tensor's rows so far, and costs no
        second pass over the bytes); else it is their CRC-32.
        """
        if index < 0:
            if self.crc_reads:
                crcs[role] = zlib.crc32(tensor_bytes(t))
            return
        key = (index, name)
        if key not in self.input_hashes:
            self.input_hashes[key] = hashlib.sha256()
        self.input_hashes[key].update(tensor_bytes(t))
        if self.crc_reads:
            crcs[role] = int.from_bytes(self.input_hashes[key].copy().digest()[:4], "little")
        if (stop if t.dim() else 1) >= ckpt.specs[name].rows and ckpt.checksum(name):
            if self.input_hashes[key].hexdigest() != ckpt.checksum(name):
                raise BlockmergeError("checksum mismatch: the stored data is corrupt", path=ckpt.label, param=name)

    def prefetch(self, ref: BlockRef) -> None:
        """Start bringing a block's model and base rows into the page cache."""
        models, with_base = self._inputs(ref)
        for ckpt in [*(self.job.models[t] for t in models), *([self.job.base] if with_base else [])]:
            ckpt.prefetch(ref.name, ref.start, ref.stop)

    def read(self, ref: BlockRef, after: BlockRef | None = None) -> _Raw:
        """A block's inputs, read and checked; the block `after` it is prefetched first."""
        if after is not None:
            self.prefetch(after)
        job = self.job
        if ref.name != self.whole_name:  # the Grams kept for the previous parameter's row blocks go
            self.whole_name, self.whole_stats, self.fresh = ref.name, {}, set()
        models, with_base = self._inputs(ref)
        rows = (ref.start, ref.stop)
        loan, crcs = _Loan(), {}
        try:
            raw_models = [self._read(job.models[t], t, f"models[{t}]", ref.name, *rows, crcs, loan) for t in models]
            base = self._read(job.base, len(job.models), "base", ref.name, *rows, crcs, loan) if with_base else None
            stats, base_stats = {}, {}
            if ref.action == "merge":
                for kind in self.layout.stat_kinds[ref.name]:
                    stats[kind] = [self._read_stat(s[kind], kind, ref, (t, kind), crcs, loan)
                                   for t, s in enumerate(job.stats)]
                for kind in job.method.base_statistics:
                    base_stats[kind] = self._read_stat(job.base_stats[kind], kind, ref, ("base", kind), crcs, loan)
        except BaseException:
            loan.settle(self.pool)
            raise
        whole = {id(t) for t in self.whole_stats.values()}
        nbytes = sum(t.numel() * t.element_size() for t in [*raw_models, *([base] if base is not None else []),
                                                             *(x for v in stats.values() for x in v),
                                                             *base_stats.values()] if id(t) not in whole)
        nbytes += sum(t.numel() * t.element_size() for key, t in self.whole_stats.items() if key in self.fresh)
        return _Raw(ref, raw_models, base, stats, base_stats, nbytes, loan, self.pool, crcs)

    def _read_stat(self, ckpt: Checkpoint, kind: str, ref: BlockRef, key: tuple, crcs: dict[str, int], loan: _Loan
                   ) -> torch.Tensor:
        """A statistic of the parameter's own shape is cut to the block's rows; others (Grams) are whole,
        read once per parameter and kept for its next row blocks."""
        role = f"base_stats.{kind}" if key[0] == "base" else f"stats[{key[0]}].{kind}"
        if is_elementwise(kind):
            return self._read(ckpt, -1, role, ref.name, ref.start, ref.stop, crcs, loan)
        if key in self.whole_stats:
            self.fresh.discard(key)
            return self.whole_stats[key]
        self.whole_stats[key] = self._read(ckpt, -1, role, ref.name, 0, ckpt.specs[ref.name].rows, crcs)
        self.fresh.add(key)
        return self.whole_stats[key]

    def blocks(self, refs: list[BlockRef], desc: str) -> Iterator[_Raw]:
        """Blocks read one ahead on a background thread, in plan order."""
        total = sum(self.input_row_bytes(r.name) * (r.stop - r.start) for r in refs)
        bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not self.job.progress, leave=False)
        try:
            # The reader's checks are memory-bound; a team of OpenMP threads of its own would compete with the merge.
            with (ThreadPoolExecutor(1, thread_name_prefix="blockmerge-read", initializer=torch.set_num_threads,
                                     initargs=(1,)) as pool,
                  ThreadPoolExecutor(1, thread_name_prefix="blockmerge-hash") as self.hasher):
                def read(i: int) -> Future:
                    return pool.submit(self.read, refs[i], refs[i + 1] if i + 1 < len(refs) else None)

                pending = read(0) if refs else None
                for i in range(len(refs)):
                    raw = pending.result()
                    # A block with whole statistics (Grams) is not read ahead of, nor alongside, another:
                    # two parameters' Grams would be live at once.
                    ahead = i + 1 < len(refs) and not (self.has_whole_stats(refs[i]) or
                                                       self.has_whole_stats(refs[i + 1]))
                    pending = read(i + 1) if ahead else None
                    self.summary.bytes_read += raw.nbytes
                    bar.set_postfix_str(f"block {i + 1}/{len(refs)}", refresh=False)
                    bar.update(raw.nbytes)
                    yield raw
                    self.sample_memory()
                    raw.release()
                    if self.crc_reads:
                        self.block_inputs[(raw.ref.name, raw.ref.start, raw.ref.stop)] = raw.crcs
                    if pending is None and i + 1 < len(refs):
                        pending = read(i + 1)
        finally:
            self.hasher = None
            bar.close()

    def sample_memory(self) -> None:
        """Fold the process's resident anonymous and file-backed bytes now into `peak_parts`."""
        parts = memory.rss_parts()
        anon, file = self.peak_parts
        self.peak_parts = (max(anon, parts.get("RssAnon", 0)), max(file, parts.get("RssFile", 0)))

    def has_whole_stats(self, ref: BlockRef) -> bool:
        """Whether a block reads statistics whole (Gram matrices, blockwise Fishers)."""
        return ref.action == "merge" and any(not is_elementwise(k) for k in self.layout.stat_kinds[ref.name])

    def input_row_bytes(self, name: str) -> int:
        """Bytes read per row of a tensor: its models and base, and float32 statistics of its own shape."""
        models, with_base = self._inputs(BlockRef(name, 0, 1, self.layout.actions[name]))
        spec = self.layout.specs[name]
        same_shape = sum(1 for k in self.layout.stat_kinds.get(name, ()) if is_elementwise(k))
        checkpoints = itemsize(spec.dtype) * (len(models) + with_base)
        return spec.row_numel * (checkpoints + 4 * same_shape * len(self.job.stats))

    def to_block(self, raw: _Raw, rows: tuple[int, int] | None = None) -> Block:
        """The block (or its rows `rows`, counted from the block's start) as compute-dtype tensors on the device."""
        def dev(t: torch.Tensor, elementwise: bool = True) -> torch.Tensor:
            if rows is not None and elementwise and t.dim():
                t = t[rows[0]:rows[1]]
            return t.to(self.device, non_blocking=True).to(self.compute)

        ref, spec = raw.ref, self.layout.specs[raw.ref.name]
        start, stop = (ref.start, ref.stop) if rows is None else (ref.start + rows[0], ref.start + rows[1])
        return Block(ref.name, start, stop, spec.shape, [dev(m) for m in raw.models],
                     dev(raw.base) if raw.base is not None else None,
                     {k: [dev(x, is_elementwise(k)) for x in v] for k, v in raw.stats.items()},
                     {k: dev(v, is_elementwise(k)) for k, v in raw.base_stats.items()})

    def compute_block(self, raw: _Raw, state: dict, out: torch.Tensor) -> torch.Tensor:
        """The merged block, in `out` (the output dtype, on the CPU), merged slice by slice (see `map_slices`)."""
        ref = raw.ref
        if ref.action == "copy":
            return out.copy_(raw.base if raw.base is not None else raw.models[0])
        method = self.job.method if ref.action == "merge" else get("average")
        hp = self.job.hyperparameters if ref.action == "merge" else method.hyperparameters()

        def merge_slice(block: Block) -> tuple[int, int, dict]:
            result = method.merge(block, hp, state)
            expected = block.models[0].shape
            if tuple(result.shape) != tuple(expected):
                raise BlockmergeError(f"{method.name} returned shape {list(result.shape)} for a block of shape "
                                      f"{list(expected)}", param=ref.name)
            target = out[block.start - ref.start:block.stop - ref.start] if out.dim() else out
            target.copy_(result)
            if not all_finite(target):
                raise BlockmergeError(f"{method.name} produced NaN or Inf in "
                                      f"{self.layout.out_specs[ref.name].dtype} (check the hyperparameters, "
                                      "statistics and --dtype)", param=ref.name)
            return block.start, block.stop, block.report

        for start, stop, report in self.map_slices(raw, merge_slice, method):
            if report:
                self.summary.reports.setdefault(ref.name, []).append({"rows": [start, stop], **report})
        return out

    def slice_rows(self, name: str, method: Method) -> int | None:
        """Rows of each slice `map_slices` cuts a block of the tensor into; None: blocks are not cut."""
        spec = self.layout.specs[name]
        if method.row_blocks and self.device.type == "cpu" and spec.shape and spec.nbytes:
            return max(1, SLICE_ELEMENTS // max(1, spec.row_numel))
        return None

    def map_slices(self, raw: _Raw, fn: Callable[[Block], Any], method: Method | None = None) -> Iterator[Any]:
        """fn of the block, or for a row-wise method on the CPU of each of its slices of about SLICE_ELEMENTS
        elements, in order; with `workers`, slices run on those threads, a few at a time.

        Slices give the same bytes as whole blocks (row-wise methods do not depend on the block
        size), and their temporaries stay in the cache and come from the heap, not fresh pages.
        """
        method = method or self.job.method
        shape = raw.models[0].shape
        rows = shape[0] if len(shape) else 1
        step = self.slice_rows(raw.ref.name, method) or rows
        ranges = [None] if step >= rows else [(first, min(rows, first + step)) for first in range(0, rows, step)]

        def task(rows: tuple[int, int] | None) -> Any:
            return fn(self.to_block(raw, rows))

        if self.workers is None or len(ranges) == 1:
            yield from map(task, ranges)
            return
        window: collections.deque[Future] = collections.deque()
        try:
            for rows in ranges:
                window.append(self.workers.submit(task, rows))
                if len(window) > 2 * self.worker_count:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for pending in window:
                pending.cancel()
            wait(window)


def _provenance_bytes(job: Job, engine: Engine, refs: list[BlockRef], metadata: dict | None) -> int:
    """A bound on the characters of the provenance's JSON: exact but for the method's reports, bounded by
    `report_bytes` a slice (checksums have a fixed length)."""
    size = len(json.dumps({**_provenance(job, engine, {}, {}), **(metadata or {})}))
    if job.method.report_bytes:
        merged = [r for r in refs if r.action == "merge"]
        for ref in merged:
            step = engine.slice_rows(ref.name, job.method)
            slices = -(-(ref.stop - ref.start) // step) if step else 1
            size += slices * (job.method.report_bytes + REPORT_ENTRY_BYTES)
        size += sum(len(json.dumps(name)) + REPORT_ENTRY_BYTES for name in {r.name for r in merged})
    return size


def _identity(ckpt: Checkpoint) -> list:
    """What identifies an input for resuming: its files' sizes and times (in-memory inputs never match)."""
    paths = ckpt.paths()
    if not paths:
        return [ckpt.label, uuid.uuid4().hex]
    return [ckpt.label, sorted((str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths)]


def input_paths(job: Job) -> list[Path]:
    """Every file and store the job's checkpoints read."""
    ckpts = [*job.models, *([job.base] if job.base else []), *(c for s in job.stats for c in s.values()),
             *job.base_stats.values()]
    paths = []
    for ckpt in ckpts:
        paths += [*ckpt.paths(), *ckpt.files]
        if isinstance(ckpt, StoreCheckpoint):
            paths.append(ckpt.reader.path)
    return paths


def request_of(job: Job, layout: Layout, out_format: str, extra: dict) -> dict:
    """The description a resumed run must match exactly."""
    return {
        "blockmerge": __version__, "method": job.method.name,
        "hyperparameters": _jsonable(dataclasses.asdict(job.hyperparameters)),
        "common": _jsonable(dataclasses.asdict(job.common)),
        "models": [_identity(m) for m in job.models], "base": _identity(job.base) if job.base else None,
        "stats": [{k: _identity(c) for k, c in sorted(s.items())} for s in job.stats],
        "base_stats": {k: _identity(c) for k, c in sorted(job.base_stats.items())},
        "dtype": job.dtype, "compute_dtype": job.compute_dtype, "block_bytes": job.block_bytes,
        "format": out_format, **extra,
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def execute(job: Job, layout: Layout, out: str | os.PathLike | None = None, *, out_format: str = "store",
            codec: str = "none", shard_bytes: int = 0, resume: bool = False, overwrite: bool = False,
            files: list[Path] | None = None, kind: str = "param", metadata: dict | None = None,
            executor: Executor | None = None, inputs: Iterable[str | os.PathLike] = ()
            ) -> tuple[Summary, dict[str, torch.Tensor] | None]:
    """Run the method's passes and the merge; write to `out` (atomically) or return the tensors.

    `kind` and `metadata` label a store output (a statistic computed through the engine). The blocks are read,
    merged and written by `executor` (default: this process; another may need `out`). `out` is
    never one of `inputs` (the paths the caller was given) or of the files the job's checkpoints read.
    """
    start_time = time.perf_counter()
    memory.return_freed_blocks_to_the_os()
    engine = Engine(job, layout)
    summary = engine.summary
    align = {n: chunk_rows(s) if out_format == "store" else 1 for n, s in layout.out_specs.items()}
    row_bytes = {name: engine.input_row_bytes(name) for name in layout.specs}
    whole = set() if job.method.row_blocks else {n for n, a in layout.actions.items() if a == "merge"}
    refs = plan(layout.specs, layout.actions, row_bytes, job.block_bytes, align, whole)
    output = None
    if out is not None:
        extra = {"codec": codec, "shard_bytes": shard_bytes}
        output = Output(out, request_of(job, layout, out_format, extra), resume=resume, overwrite=overwrite,
                        format=out_format, inputs=[*inputs, *input_paths(job)])
        provenance_bytes = _provenance_bytes(job, engine, refs, metadata)
    written = False  # every block is in the output: a failure from then on keeps it, to be finished by a resume
    # Elementwise kernels on the CPU run on cache-sized slices, one torch thread each and as many slices at once
    # as torch has threads: threads within each small op would only wait at its barrier.
    elementwise = engine.device.type == "cpu" and all(is_elementwise(k) for k in layout.used_kinds)
    threads = torch.get_num_threads()
    with (_torch_threads(1 if elementwise else threads),
          ThreadPoolExecutor(threads, thread_name_prefix="blockmerge-merge", initializer=torch.set_num_threads,
                             initargs=(1,)) as workers):
        if elementwise and threads > 1:
            engine.workers, engine.worker_count = workers, threads
        try:
            sink: Sink
            if output is None:
                sink = DictSink(layout.out_specs)
            else:
                sink = open_sink(output.payload, out_format, layout.out_specs, codec=codec, shard_bytes=shard_bytes,
                                 files=files or [], create=not output.resumed, kind=kind,
                                 provenance_bytes=provenance_bytes)
            executor = executor or LocalExecutor()
            state = _run_passes(engine, refs, executor.map_blocks, output)
            reopen = None if output is None else functools.partial(
                open_sink, output.payload, out_format, layout.out_specs, codec=codec, shard_bytes=shard_bytes,
                files=[], create=False, kind=kind, provenance_bytes=provenance_bytes)
            checksums, input_checksums = executor.merge_pass(engine, refs, sink, reopen, state, output)
            summary.tensors_merged = sum(a == "merge" for a in layout.actions.values())
            summary.tensors_copied = sum(a == "copy" for a in layout.actions.values())
            summary.tensors_averaged_missing_statistic = sum(a == "average" for a in layout.actions.values())
            summary.blocks = len(refs)
            _say_changed(engine)
            written = True
            if output is not None:
                sink.seal(checksums, {**_provenance(job, engine, checksums, input_checksums), **(metadata or {})})
                output.commit()
                summary.output = str(output.out)
        except KeyboardInterrupt:
            if output is not None:
                output.suspend()
            raise
        except BaseException as err:
            if output is None:
                raise
            if not written:
                output.abort()
                if isinstance(err, OSError):
                    raise os_error(err, Path(out)) from None
                raise
            output.suspend()
            if isinstance(err, (OSError, BlockmergeError)):
                failure = os_error(err, Path(out)) if isinstance(err, OSError) else err
                raise BlockmergeError(f"{failure} (every block is merged and kept: rerun with --resume to finish)"
                                      ) from None
            raise
    parts = engine.peak_parts
    summary.seconds = time.perf_counter() - start_time
    summary.peak_rss_bytes = memory.peak_rss_bytes()
    summary.peak_rss_anon_bytes, summary.peak_rss_file_bytes = parts
    summary.peak_gpu_bytes = memory.peak_gpu_bytes(engine.device)
    return summary, (sink.tensors if isinstance(sink, DictSink) else None)


class Executor(Protocol):
    """Where a merge's blocks are read and mapped (reduction passes), merged and written."""

    def map_blocks(self, engine: Engine, refs: list[BlockRef], index: int, state: dict, desc: str
                   ) -> Iterator[tuple[Block, Any]]:
        """Each block or slice (tensors dropped) and its partial of pass `index`, in plan order."""

    def merge_pass(self, engine: Engine, refs: list[BlockRef], sink: Sink, reopen_sink: Callable[[], Sink] | None,
                   state: dict, output: Output | None) -> tuple[dict[str, str], dict[tuple[int, str], str]]:
        """Every block merged into `sink` (and journaled in `output`); the sha256 of each output tensor and of
        each input tensor read. `reopen_sink` opens the sink again (for workers elsewhere)."""


class LocalExecutor:
    """Runs a merge in this process."""

    def map_blocks(self, engine: Engine, refs: list[BlockRef], index: int, state: dict, desc: str
                   ) -> Iterator[tuple[Block, Any]]:
        return map_pass(engine, refs, index, state, desc)

    def merge_pass(self, engine: Engine, refs: list[BlockRef], sink: Sink, reopen_sink: Callable[[], Sink] | None,
                   state: dict, output: Output | None) -> tuple[dict[str, str], dict[tuple[int, str], str]]:
        return _merge_pass(engine, refs, sink, state, output)


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


MapBlocks = Callable[[Engine, list[BlockRef], int, dict, str], Iterator[tuple[Block, Any]]]


def _run_passes(engine: Engine, refs: list[BlockRef], map_blocks: MapBlocks, output: Output | None = None) -> dict:
    """The method's reductions, folded in plan order; `map_blocks` maps the blocks. With an `output`, what the
    first pass read is checked against (and journaled in) its journal."""
    job = engine.job
    state: dict = {}
    passes = job.method.passes(job.hyperparameters, engine.layout.used_kinds)
    merge_refs = [r for r in refs if r.action == "merge"]
    for i, p in enumerate(passes):
        engine.crc_reads = output is not None and i == 0
        started, acc = time.perf_counter(), None
        for block, partial in map_blocks(engine, merge_refs, i, state, f"pass {i + 1}/{len(passes)}"):
            acc = p.fold(acc, partial, block)
            faults.point("pass")
        state.update(p.finish(acc if acc is not None else {}, job.hyperparameters, state))
        engine.summary.pass_seconds.append(time.perf_counter() - started)
        if engine.crc_reads:
            _check_passes(engine, refs, output)
    engine.crc_reads = False
    engine.summary.passes = len(passes) + 1
    return state


def map_pass(engine: Engine, refs: list[BlockRef], index: int, state: dict, desc: str
                ) -> Iterator[tuple[Block, Any]]:
    """Each block and its partial result of the method's pass `index`, in plan order."""
    job = engine.job
    p = job.method.passes(job.hyperparameters, engine.layout.used_kinds)[index]

    def map_slice(block: Block) -> tuple[Block, Any]:
        partial = p.map(block, job.hyperparameters, state)
        return Block(block.name, block.start, block.stop, block.shape, []), partial

    for raw in engine.blocks(refs, desc):
        yield from engine.map_slices(raw, map_slice)


def write_blocks(engine: Engine, refs: list[BlockRef], sink: Sink, state: dict, done: dict[tuple[str, int, int],
                  Journaled]) -> Iterator[tuple[BlockRef, memoryview, Journaled, bool]]:
    """Each block merged and written, or kept where `done` journals it and both its bytes in the sink and the
    inputs read for it still have the journaled checksums (a kept block's reports come from the journal).

    Yields (block, its output bytes, its journal entry, kept) in plan order, each once its bytes are
    written. A block is written on a thread of its own while the next one is merged.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="blockmerge-write") as writer:
        previous = None
        for raw in engine.blocks(refs, engine.job.label or engine.job.method.name):
            ref = raw.ref
            key = (ref.name, ref.start, ref.stop)
            existing = _kept(engine, sink, raw, done[key]) if key in done else None
            if existing is not None:
                if previous is not None:
                    yield from _written(engine, *previous)
                    previous = None
                if done[key].reports:
                    engine.summary.reports.setdefault(ref.name, []).extend(done[key].reports)
                yield ref, existing, done[key], True
                continue
            buffer, out = engine.pool.take(engine.layout.out_specs[ref.name], ref.stop - ref.start)
            engine.compute_block(raw, state, out)
            written = writer.submit(_write, sink, ref, out)
            if previous is not None:
                yield from _written(engine, *previous)
            previous = (ref, out, buffer, written)
        if previous is not None:
            yield from _written(engine, *previous)


def _kept(engine: Engine, sink: Sink, raw: _Raw, journaled: Journaled) -> memoryview | None:
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


def _write(sink: Sink, ref: BlockRef, rows: torch.Tensor) -> int:
    """Write a merged block; the CRC-32 of its bytes."""
    sink.write(ref.name, ref.start, rows)
    return zlib.crc32(tensor_bytes(rows))


def _written(engine: Engine, ref: BlockRef, rows: torch.Tensor, buffer: torch.Tensor, written: Future
             ) -> Iterator[tuple[BlockRef, memoryview, Journaled, bool]]:
    crc = written.result()
    faults.point("write")
    reports = [r for r in engine.summary.reports.get(ref.name, []) if ref.start <= r["rows"][0] < ref.stop]
    yield ref, tensor_bytes(rows), Journaled(crc, engine.block_inputs.get((ref.name, ref.start, ref.stop), {}),
                                             reports), False
    engine.pool.give([buffer])


def _merge_pass(engine: Engine, refs: list[BlockRef], sink: Sink, state: dict, output: Output | None
                ) -> tuple[dict[str, str], dict[tuple[int, str], str]]:
    """Checksums of the output tensors and of the input tensors read."""
    engine.input_hashes = {}
    engine.crc_reads = output is not None
    out_hashes: dict[str, Any] = {}
    for ref, data, entry, kept in write_blocks(engine, refs, sink, state, output.done if output is not None else {}):
        out_hashes.setdefault(ref.name, hashlib.sha256()).update(data)
        if kept:
            engine.summary.blocks_resumed += 1
            continue
        engine.summary.bytes_written += len(data)
        if output is not None:
            output.record(ref.name, ref.start, ref.stop, entry)
        faults.point("block")
    return ({n: h.hexdigest() for n, h in out_hashes.items()},
            {k: h.hexdigest() for k, h in engine.input_hashes.items()})


def _check_passes(engine: Engine, refs: list[BlockRef], output: Output) -> None:
    """Journal what the reduction passes read; on a resume where it differs from what they read before, the
    merged blocks are forgotten (every one depends on every block read through the passes' state)."""
    merged = [r for r in refs if r.action == "merge"]
    digest: dict[str, int] = {}
    for ref in merged:
        for role, crc in engine.block_inputs.get((ref.name, ref.start, ref.stop), {}).items():
            digest[role] = zlib.crc32(crc.to_bytes(4, "little"), digest.get(role, 0))
    if output.passes == digest:
        return
    if output.passes is not None:
        engine.changed.update(r for r in digest.keys() | output.passes.keys() if digest.get(r) != output.passes.get(r))
    for ref in merged:
        output.done.pop((ref.name, ref.start, ref.stop), None)
    output.restart_journal(digest)


def _say_changed(engine: Engine) -> None:
    """One line for each input found to differ from the bytes a resumed partial output was started from."""
    for label in sorted({engine.roles[r] for r in engine.changed if r in engine.roles}):
        print(f"blockmerge: {label} changed since the partial output was started (same size and time, other "
              "bytes): the blocks merged from its old bytes are merged again", file=sys.stderr)


def _provenance(job: Job, engine: Engine, checksums: dict[str, str], input_checksums: dict[tuple[int, str], str]
                ) -> dict:
    per_input: dict[int, list[str]] = {}
    for (index, name), digest in sorted(input_checksums.items()):
        per_input.setdefault(index, []).append(f"{name}:{digest}")
    inputs = []
    for index, label in enumerate(engine.labels):
        role = "base" if index == len(job.models) else "model"
        digest = hashlib.sha256("\n".join(per_input.get(index, [])).encode()).hexdigest()
        inputs.append({"role": role, "path": label, "sha256_of_tensors_read": digest})
    return {
        "blockmerge": __version__,
        "method": job.method.name,
        "hyperparameters": _jsonable(dataclasses.asdict(job.hyperparameters)),
        "common": _jsonable(dataclasses.asdict(job.common)),
        "inputs": inputs,
        "statistics": [{k: c.label for k, c in sorted(s.items())} for s in job.stats],
        "base_statistics": {k: c.label for k, c in sorted(job.base_stats.items())},
        "reports": engine.summary.reports,
        "output_sha256": hashlib.sha256("\n".join(f"{n}:{c}" for n, c in sorted(checksums.items())).encode())
        .hexdigest(),
        "dtype": job.dtype, "compute_dtype": job.compute_dtype,
    }
