"""Runs a merge: the blocks planned, streamed through the method's passes and merged into the output, which is
sealed with its provenance (the job's inputs are checked before, by `job.check`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import BlockmergeError
from . import memory
from .context import Engine
from .dispatch import merged_whole
from .executor import Executor, LocalExecutor, merge_tensor_by_tensor, passes_are_local, run_passes, say_changed
from .job import Job, Layout, Summary
from .output import Output, os_error
from .plan import DEFAULT_BLOCK_BYTES, plan, rows_per_block
from .provenance import input_paths, provenance_bound, provenance_of, request_of
from .sinks import DictSink, Sink, open_sink
from .store import chunk_rows


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
    engine = Engine(job, layout)
    row_bytes = {name: engine.reader.input_row_bytes(name) for name in layout.specs}
    whole = {n for n, a in layout.actions.items() if a == "merge" and merged_whole(job.method, layout.specs[n].shape)}
    needs = {name: row_bytes[name] * layout.specs[name].rows  # a row is the least block of the other methods
             for name in (whole if job.method.granularity == "tensor" else ())}
    if job.block_bytes is None:  # the default budget, or the largest whole tensor a method must hold
        job = dataclasses.replace(job, block_bytes=max([DEFAULT_BLOCK_BYTES, *needs.values()]))
        engine = Engine(job, layout)
    for name, need in sorted(needs.items()):
        if need > job.block_bytes:
            raise BlockmergeError(f"{job.method.name} merges whole tensors, and this one's inputs take {need} bytes, "
                                  f"over the block budget of {job.block_bytes}: raise --block-size (block_size=) to "
                                  f"at least {need}", param=name)
    # A store's chunks are no taller than a block and blocks are cut at whole chunks: a block never writes part of
    # a chunk (which would rewrite the whole chunk, once per block sharing it).
    align = {n: chunk_rows(s, rows_per_block(row_bytes[n], job.block_bytes)) if out_format == "store" else 1
             for n, s in layout.out_specs.items()}
    summary = engine.summary
    refs = plan(layout.specs, layout.actions, row_bytes, job.block_bytes, align, whole)
    output = None
    if out is not None:
        extra = {"codec": codec, "shard_bytes": shard_bytes}
        output = Output(out, request_of(job, layout, out_format, extra), resume=resume, overwrite=overwrite,
                        format=out_format, inputs=[*inputs, *input_paths(job)])
        provenance_bytes = provenance_bound(job, engine, refs, metadata)
    written = False  # every block is in the output: a failure from then on keeps it, to be finished by a resume
    # Elementwise kernels on the CPU run on cache-sized slices, one torch thread each and as many slices at once
    # as torch has threads: threads within each small op would only wait at its barrier.
    elementwise = engine.device.type == "cpu" and job.method.granularity == "elementwise"
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
                                 provenance_bytes=provenance_bytes, write_rows=align)
            executor = executor or LocalExecutor()
            if isinstance(executor, LocalExecutor) and passes_are_local(engine):
                checksums, input_checksums = merge_tensor_by_tensor(engine, refs, sink, output)
            else:
                state = run_passes(engine, refs, executor.map_blocks, output)
                reopen = None if output is None else functools.partial(
                    open_sink, output.payload, out_format, layout.out_specs, codec=codec, shard_bytes=shard_bytes,
                    files=[], create=False, kind=kind, provenance_bytes=provenance_bytes, write_rows=align)
                checksums, input_checksums = executor.merge_pass(engine, refs, sink, reopen, state, output)
            summary.tensors_merged = sum(a == "merge" for a in layout.actions.values())
            summary.tensors_copied = sum(a == "copy" for a in layout.actions.values())
            summary.tensors_averaged_missing_statistic = sum(a == "average" for a in layout.actions.values())
            summary.blocks = len(refs)
            say_changed(engine)
            written = True
            if output is not None:
                sink.seal(checksums, {**provenance_of(job, engine, checksums, input_checksums), **(metadata or {})})
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
    parts = engine.reader.peak_parts
    summary.seconds = time.perf_counter() - start_time
    summary.peak_rss_bytes = memory.peak_rss_bytes()
    summary.peak_rss_anon_bytes, summary.peak_rss_file_bytes = parts
    summary.peak_gpu_bytes = memory.peak_gpu_bytes(engine.device)
    return summary, (sink.tensors if isinstance(sink, DictSink) else None)


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch's thread count set to `count`, and restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
