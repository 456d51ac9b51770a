"""Reading a merge's blocks: each input's rows checked finite and hashed, read one block ahead of the merge."""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import BlockmergeError
from . import memory
from .buffers import BufferPool
from .digest import NAME, hasher
from .job import Job, Layout, Summary
from .kinds import is_elementwise
from .plan import BlockRef
from .sources import Checkpoint
from .tensors import all_finite, itemsize, tensor_bytes


@dataclass
class RawBlock:
    """One block's inputs as read from disk (CPU tensors in their stored dtypes)."""

    ref: BlockRef
    models: list[torch.Tensor]
    base: torch.Tensor | None
    stats: dict[str, list[torch.Tensor]]
    base_stats: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    nbytes: int
    loan: Loan
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
        self.models, self.base, self.stats, self.base_stats, self.inputs = [], None, {}, {}, {}
        loan, self.loan = self.loan, Loan()
        loan.settle(self.pool)


@dataclass
class Loan:
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


PREFETCH_BYTES = 64 << 20  # inputs asked of the disk ahead of the block read (page cache, not the process's memory)
HEAP_SLACK = 128 << 20  # the least growth of resident memory that returns free heap to the OS


class Reader:
    """Reads the blocks of one merge into buffers of `pool`, counting the bytes read in `summary`."""

    def __init__(self, job: Job, layout: Layout, summary: Summary, pool: BufferPool):
        self.job, self.layout, self.summary, self.pool = job, layout, summary, pool
        self.needs = job.method.needs(job.hyperparameters)
        self.input_hashes: dict[tuple[int, str], Any] | None = None
        self.stored_hashes: dict[tuple[int, str], Any] = {}  # an older store's sha256, to check its checksum
        self.crc_reads = False  # whether reads compute the checksums that resuming checks
        self.block_inputs: dict[tuple[str, int, int], dict[str, int]] = {}  # checksums of each block read, by role
        self.peak_parts = (0, 0)  # (anonymous, file-backed) resident bytes, sampled after each block
        self.trim_above: int | None = None  # resident anonymous bytes over which freed heap goes back to the OS
        self.checked: set[tuple[int, str, int, int]] = set()  # (input, name, rows) found finite in an earlier pass
        # The whole statistics (Grams) of the parameter read last, kept for its next row blocks.
        self.whole_name: str | None = None
        self.whole_stats: dict[tuple, torch.Tensor] = {}
        self.fresh: set[tuple] = set()  # keys of whole_stats read by the latest read()
        self.hasher: ThreadPoolExecutor | None = None  # hashes inputs while blocks() runs
        self.bar: tqdm | None = None  # one progress bar for the reads of several blocks() (else one per call)

    def _inputs(self, ref: BlockRef) -> tuple[list[int], bool]:
        """Which models and whether the base are read for a block."""
        job = self.job
        if ref.action == "copy":
            return ([], True) if job.base is not None else ([0], False)
        return list(range(len(job.models))), ref.action == "merge" and job.base is not None and (
            self.needs.base or self.needs.base_statistics != ())

    def _read(self, ckpt: Checkpoint, index: int, role: str, name: str, start: int, stop: int, crcs: dict[str, int],
              loan: Loan | None = None) -> torch.Tensor:
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
        `stop`) added to the input's running content digest, checked against a stored checksum at the tensor's end.

        With a running digest the checksum is taken from it (it covers the tensor's rows so far, and costs no
        second pass over the bytes); else it is their CRC-32.
        """
        data = tensor_bytes(t)
        if index < 0:
            if self.crc_reads:
                crcs[role] = zlib.crc32(data)
            return
        key = (index, name)
        running = self.input_hashes.setdefault(key, hasher())
        running.update(data)
        if self.crc_reads:
            crcs[role] = int.from_bytes(running.copy().digest()[:4], "little")
        stored = ckpt.checksum(name)
        if stored is not None and stored[0] != NAME:
            self.stored_hashes.setdefault(key, hasher(stored[0])).update(data)
        if stored is not None and (stop if t.dim() else 1) >= ckpt.specs[name].rows:
            checked = running if stored[0] == NAME else self.stored_hashes.pop(key)
            if checked.hexdigest() != stored[1]:
                raise BlockmergeError("checksum mismatch: the stored data is corrupt", path=ckpt.label, param=name)

    def prefetch(self, ref: BlockRef) -> None:
        """Start bringing a block's model and base rows into the page cache."""
        models, with_base = self._inputs(ref)
        for ckpt in [*(self.job.models[t] for t in models), *([self.job.base] if with_base else [])]:
            ckpt.prefetch(ref.name, ref.start, ref.stop)

    def read(self, ref: BlockRef, ahead: list[BlockRef] = ()) -> RawBlock:
        """A block's inputs, read and checked; the blocks `ahead` of it are prefetched first."""
        for later in ahead:
            self.prefetch(later)
        job = self.job
        if ref.name != self.whole_name:  # the Grams kept for the previous parameter's row blocks go
            self.whole_name, self.whole_stats, self.fresh = ref.name, {}, set()
        models, with_base = self._inputs(ref)
        rows = (ref.start, ref.stop)
        loan, crcs = Loan(), {}
        try:
            raw_models = [self._read(job.models[t], t, f"models[{t}]", ref.name, *rows, crcs, loan) for t in models]
            base = self._read(job.base, len(job.models), "base", ref.name, *rows, crcs, loan) if with_base else None
            stats, base_stats, inputs = {}, {}, {}
            if ref.action == "merge":
                for i, (field, ckpt) in enumerate(job.inputs.items()):
                    inputs[field] = self._read(ckpt, len(job.models) + 1 + i, f"inputs.{field}", ref.name, *rows,
                                               crcs, loan)
                for kind in self.layout.stat_kinds[ref.name]:
                    stats[kind] = [self._read_stat(s[kind], kind, ref, (t, kind), crcs, loan)
                                   for t, s in enumerate(job.stats)]
                for kind in self.needs.base_statistics:
                    base_stats[kind] = self._read_stat(job.base_stats[kind], kind, ref, ("base", kind), crcs, loan)
        except BaseException:
            loan.settle(self.pool)
            raise
        whole = {id(t) for t in self.whole_stats.values()}
        nbytes = sum(t.numel() * t.element_size() for t in [*raw_models, *([base] if base is not None else []),
                                                             *(x for v in stats.values() for x in v),
                                                             *base_stats.values(), *inputs.values()]
                     if id(t) not in whole)
        nbytes += sum(t.numel() * t.element_size() for key, t in self.whole_stats.items() if key in self.fresh)
        return RawBlock(ref, raw_models, base, stats, base_stats, inputs, nbytes, loan, self.pool, crcs)

    def _read_stat(self, ckpt: Checkpoint, kind: str, ref: BlockRef, key: tuple, crcs: dict[str, int], loan: Loan
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

    def blocks(self, refs: list[BlockRef], desc: str) -> Iterator[RawBlock]:
        """Blocks read one ahead on a background thread, in plan order."""
        bar = self.bar or self.progress_bar(self.bytes_of(refs), desc)
        try:
            # The reader's checks are memory-bound; a team of OpenMP threads of its own would compete with the merge.
            with (ThreadPoolExecutor(1, thread_name_prefix="blockmerge-read", initializer=torch.set_num_threads,
                                     initargs=(1,)) as pool,
                  ThreadPoolExecutor(1, thread_name_prefix="blockmerge-hash") as self.hasher):
                # Bytes of refs[:k]: the blocks within PREFETCH_BYTES after the one read are prefetched, so the
                # disk has that much to work on while a block merges (a queue one block deep leaves it idle).
                ends = list(itertools.accumulate((self.bytes_of([r]) for r in refs), initial=0))
                window = max(PREFETCH_BYTES, 2 * (self.job.block_bytes or 0))
                prefetched = 0  # refs[:prefetched] are prefetched

                def read(i: int) -> Future:
                    nonlocal prefetched
                    first = prefetched = max(prefetched, i + 1)
                    while prefetched < len(refs) and (prefetched == i + 1
                                                      or ends[prefetched + 1] - ends[i + 1] <= window):
                        prefetched += 1
                    return pool.submit(self.read, refs[i], refs[first:prefetched])

                pending = read(0) if refs else None
                for i in range(len(refs)):
                    raw = pending.result()
                    # A block with whole statistics (Grams) is not read ahead of, nor alongside, another:
                    # two parameters' Grams would be live at once.
                    ahead = i + 1 < len(refs) and not (self.has_whole_stats(refs[i]) or
                                                       self.has_whole_stats(refs[i + 1]))
                    pending = read(i + 1) if ahead else None
                    self.summary.bytes_read += raw.nbytes
                    if bar is not self.bar:
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
            if bar is not self.bar:
                bar.close()

    def bytes_of(self, refs: list[BlockRef]) -> int:
        """Bytes read for the blocks `refs`."""
        return sum(self.input_row_bytes(r.name) * (r.stop - r.start) for r in refs)

    def progress_bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not self.job.progress, leave=False)

    def sample_memory(self) -> None:
        """Fold the process's resident anonymous and file-backed bytes now into `peak_parts`.

        Temporaries of different sizes and lifetimes, freed on several threads, can leave the heap fragmented:
        freed but resident, growing run by run differently. Where resident memory has grown by more than the
        block budget's work needs since the first block (or the last time), free heap pages go back to the OS.
        """
        parts = memory.rss_parts()
        slack = max(HEAP_SLACK, 16 * (self.job.block_bytes or 0))
        if self.trim_above is None:
            self.trim_above = parts.get("RssAnon", 0) + slack
        elif parts.get("RssAnon", 0) > self.trim_above and memory.return_free_heap():
            parts = memory.rss_parts()
            self.trim_above = parts.get("RssAnon", 0) + slack
        anon, file = self.peak_parts
        self.peak_parts = (max(anon, parts.get("RssAnon", 0)), max(file, parts.get("RssFile", 0)))

    def has_whole_stats(self, ref: BlockRef) -> bool:
        """Whether a block reads statistics whole (Gram matrices, blockwise Fishers)."""
        return ref.action == "merge" and any(not is_elementwise(k) for k in self.layout.stat_kinds[ref.name])

    def input_row_bytes(self, name: str) -> int:
        """Bytes read per row of a tensor: its models and base, the checkpoints named by hyperparameters, and float32
        statistics of its own shape."""
        models, with_base = self._inputs(BlockRef(name, 0, 1, self.layout.actions[name]))
        spec = self.layout.specs[name]
        same_shape = sum(1 for k in self.layout.stat_kinds.get(name, ()) if is_elementwise(k))
        checkpoints = itemsize(spec.dtype) * (len(models) + with_base)
        if self.layout.actions[name] == "merge":
            checkpoints += sum(itemsize(c.specs[name].dtype) for c in self.job.inputs.values())
        return spec.row_numel * (checkpoints + 4 * same_shape * len(self.job.stats))
