"""A merge run as tasks on Dask distributed, for when one machine is not enough.

Workers reopen the inputs from their paths and write merged blocks straight into the output's work
directory, so both must be on storage every worker sees; tasks return only checksums and small
figures. A task is one tensor's blocks, read one ahead and merged in plan order on one worker: the
inputs' checksums are per tensor, and memory per worker thread stays within two blocks. Store
outputs take each block as whole chunks of a zarr array; safetensors outputs as a byte range of a
file laid out in advance: either way the writes of different tasks never overlap. The client
journals each block as its task finishes, folds the method's passes in plan order, reads every
block back to check it against its worker's digest, and seals the output.

A worker that dies is replaced and its tasks rerun by Dask; a rerun writes the same bytes again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import BlockmergeError
from ..plugins import Block
from . import memory
from .context import Engine
from .digest import hasher
from .executor import Folded, by_tensor, map_pass, write_blocks
from .job import Job, Layout
from .output import Output
from .plan import BlockRef
from .sinks import Sink
from .sources import Checkpoint, open_checkpoint
from .tensors import TensorSpec, tensor_bytes

if TYPE_CHECKING:
    from distributed import Client, Future, LocalCluster

SCHEDULER_ENV = "BLOCKMERGE_DASK_SCHEDULER"


@dataclasses.dataclass(frozen=True)
class _Reopen:
    """How a worker opens an input again: its path, the kind of tensors read, and what it must find there."""

    path: str
    kind: str
    label: str
    stamp: tuple[tuple[int, int], ...]
    specs: dict[str, TensorSpec]

    def open(self) -> Checkpoint:
        ckpt = open_checkpoint(self.path, self.label, self.kind)
        if _stamp(ckpt) != self.stamp or ckpt.specs != self.specs:
            raise BlockmergeError("differs from the file the client opened (changed during the merge, or not on "
                                  "storage every worker sees)", path=self.path)
        ckpt.label = self.label
        return ckpt


def _stamp(ckpt: Checkpoint) -> tuple[tuple[int, int], ...]:
    return tuple(sorted((os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in ckpt.paths()))


class _Stand(Checkpoint):
    """A checkpoint's label and specs in place of the checkpoint, in a view shipped to a worker."""

    def __init__(self, label: str, specs: dict[str, TensorSpec]):
        self.label, self.specs = label, specs


@dataclasses.dataclass(frozen=True)
class _ReopenView:
    """How a worker opens an assembled view again: the view over stand-ins, and how to reopen its inputs."""

    view: Checkpoint
    inputs: list[Any]

    def open(self) -> Checkpoint:
        return self.view.over([r.open() for r in self.inputs])


def _reopen(ckpt: Checkpoint, kind: str) -> _Reopen | _ReopenView:
    if ckpt.assembled:
        inputs = ckpt.inputs()
        return _ReopenView(ckpt.over([_Stand(c.label, c.specs) for c in inputs]), [_reopen(c, kind) for c in inputs])
    path = os.path.abspath(ckpt.label)
    if not ckpt.paths() or not os.path.exists(path):
        raise BlockmergeError("not a file: the dask executor reads inputs from files every worker sees "
                              "(not from memory or a git repository)", path=ckpt.label)
    return _Reopen(path, kind, ckpt.label, _stamp(ckpt), ckpt.specs)


def _each_input(job: Job, fn: Callable[[Any, str], Any]) -> Job:
    """The job with `fn(input, kind)` in place of every model, base and statistic."""
    return dataclasses.replace(
        job, models=[fn(m, "param") for m in job.models], base=fn(job.base, "param") if job.base else None,
        stats=[{k: fn(c, k) for k, c in s.items()} for s in job.stats],
        base_stats={k: fn(c, k) for k, c in job.base_stats.items()},
        inputs={k: fn(c, "param") for k, c in job.inputs.items()}, progress=False)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What every task of one merge is given: the job with its inputs as paths, and the layout."""

    token: str
    version: str
    job: Job
    layout: Layout


# ---------------------------------------------------------------------------------------------- worker side

_opened: dict[str, Job] = {}
_opened_lock = threading.Lock()


def _worker_engine(spec: _Spec) -> Engine:
    """An engine over this merge's inputs, opened once per worker process."""
    with _opened_lock:
        if spec.token not in _opened:
            if spec.version != __version__:
                raise BlockmergeError(f"this worker runs blockmerge {__version__}, the client {spec.version}")
            memory.return_freed_blocks_to_the_os()  # the worker process is the cluster's own: its allocator is ours
            _opened.clear()
            _opened[spec.token] = _each_input(spec.job, lambda r, kind: r.open())
    return Engine(_opened[spec.token], spec.layout)


def _pass_task(spec: _Spec, refs: list[BlockRef], index: int, state: dict, crc_reads: bool
               ) -> tuple[list[tuple[Block, Any]] | list[Folded], int, dict]:
    """Each block's (or slice's) partial of pass `index` with its rows, in plan order, or for a pass with
    `combine` their fold (one small result in place of a partial per slice); the bytes read; the checksums of the
    inputs read for each block."""
    engine = _worker_engine(spec)
    engine.reader.crc_reads = crc_reads
    job = engine.job
    p = job.method.passes(job.hyperparameters, engine.layout.used_kinds)[index]
    if p.combine is None:
        return list(map_pass(engine, refs, index, state, "")), engine.summary.bytes_read, engine.reader.block_inputs
    acc = None
    for block, partial in map_pass(engine, refs, index, state, ""):
        acc = p.fold(acc, partial, block)
    return [Folded(acc)], engine.summary.bytes_read, engine.reader.block_inputs


def _merge_task(spec: _Spec, refs: list[BlockRef], state: dict, done: dict, reopen_sink: Callable[[], Sink],
                stop_event: str) -> dict:
    from distributed import Event

    engine = _worker_engine(spec)
    engine.reader.input_hashes = {}
    engine.reader.crc_reads = True
    stop = Event(stop_event)
    blocks = []
    sink = reopen_sink()
    try:
        for ref, data, entry, kept in write_blocks(engine, refs, sink, state, done):
            blocks.append((ref, entry, kept, len(data)))
            if stop.is_set():
                raise BlockmergeError("stopped: another task of this merge failed")
    finally:
        sink.close()  # fsync: the client may be on another machine
    return {"blocks": blocks, "inputs": {k: h.hexdigest() for k, h in engine.reader.input_hashes.items()},
            "reports": engine.summary.reports, "bytes_read": engine.summary.bytes_read, "changed": engine.changed}


# ---------------------------------------------------------------------------------------------- client side

def connect(scheduler: str | None, progress: bool = False) -> tuple[Client, LocalCluster | None]:
    """A client of the Dask scheduler at `scheduler` (or $BLOCKMERGE_DASK_SCHEDULER), else of a new LocalCluster
    of one single-threaded worker process per core (returned too, for `disconnect`); it has at least one worker."""
    import dask
    from distributed import Client, LocalCluster

    address = scheduler or os.environ.get(SCHEDULER_ENV) or None
    cluster = None
    if address is None:
        workers = len(os.sched_getaffinity(0))
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True)
        address = cluster.scheduler_address
    timeout = dask.config.get("distributed.comm.timeouts.connect")
    try:
        client = Client(address, set_as_default=False, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as err:
        disconnect(None, cluster)
        raise BlockmergeError(f"cannot reach the Dask scheduler at {address} "
                              f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        disconnect(client, cluster)
        raise BlockmergeError(f"the Dask scheduler at {address} has no workers (start some: "
                              f"dask worker {address})") from None
    if progress:
        print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
    return client, cluster


def disconnect(client: Client | None, cluster: LocalCluster | None) -> None:
    """Close what `connect` opened."""
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()


class DaskExecutor:
    """Runs merges on a Dask cluster: the one at `scheduler` (or $BLOCKMERGE_DASK_SCHEDULER), else a
    LocalCluster of one single-threaded worker process per core. Use it as a context manager."""

    def __init__(self, job: Job, scheduler: str | None = None):
        self.job = _each_input(job, _reopen)  # before connecting: in-memory inputs fail at once
        self.client, self.cluster = connect(scheduler, job.progress)

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        disconnect(self.client, self.cluster)

    def _spec(self, engine: Engine) -> _Spec:
        return _Spec(uuid.uuid4().hex, __version__, self.job, engine.layout)

    def map_blocks(self, engine: Engine, refs: list[BlockRef], index: int, state: dict, desc: str
                   ) -> Iterator[tuple[Block, Any]]:
        """Each block or slice (its name, rows and shape; no tensors) and its partial result of pass `index`, in plan
        order: what the local executor folds, in the same order; for a pass with `combine`, each tensor's fold."""
        spec = self._spec(engine)
        groups = by_tensor(refs)
        crc_reads = engine.reader.crc_reads
        shared = self._share(state)
        futures = [self.client.submit(_pass_task, spec, g, index, shared, crc_reads, pure=False) for g in groups]
        bar = engine.reader.progress_bar(engine.reader.bytes_of(refs), desc)
        try:
            for group, future in zip(groups, futures):
                partials, bytes_read, block_inputs = task_result(future)
                engine.summary.bytes_read += bytes_read
                engine.reader.block_inputs.update(block_inputs)
                bar.update(engine.reader.bytes_of(group))
                yield from partials
        finally:
            bar.close()
            self.client.cancel([*futures, shared])

    def merge_pass(self, engine: Engine, refs: list[BlockRef], sink: Sink, reopen_sink: Callable[[], Sink],
                   state: dict, output: Output) -> tuple[dict[str, str], dict[tuple[int, str], str]]:
        """Blocks merged and written by the workers, journaled as they finish; checksums of outputs and inputs."""
        from distributed import Event, as_completed

        spec = self._spec(engine)
        stop = f"blockmerge-stop-{spec.token}"
        groups = by_tensor(refs)
        shared = self._share(state)
        futures = [self.client.submit(_merge_task, spec, g, shared,
                                      {k: v for k, v in output.done.items() if k[0] == g[0].name}, reopen_sink, stop,
                                      pure=False) for g in groups]
        position = {f.key: i for i, f in enumerate(futures)}
        results: dict[int, dict] = {}
        bar = engine.reader.progress_bar(engine.reader.bytes_of(refs), engine.job.method.name)
        try:
            for future in as_completed(futures, loop=self.client.loop):
                result = task_result(future)
                for ref, entry, kept, _ in result["blocks"]:
                    if not kept:
                        output.record(ref.name, ref.start, ref.stop, entry)
                engine.changed.update(result["changed"])
                i = position[future.key]
                results[i] = result
                bar.update(engine.reader.bytes_of(groups[i]))
                engine.reader.sample_memory()
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: the scheduler may be what failed
                Event(stop, client=self.client).set()
                self.client.gather(futures, errors="skip")  # no task writes once the work directory is removed
            raise
        finally:
            bar.close()
            self.client.cancel([shared])
        return _verify(engine, groups, results, sink)

    def _share(self, state: dict) -> Future:
        """The passes' state sent to every worker once, for tasks to take as an argument: sent with each task, a
        state that holds every tensor's results (TIES's tie counts: about 45 MB at 7B) is pickled once per tensor
        in the client."""
        return self.client.scatter([state], broadcast=True, hash=False)[0]


def _verify(engine: Engine, groups: list[list[BlockRef]], results: dict[int, dict], sink: Sink
            ) -> tuple[dict[str, str], dict[tuple[int, str], str]]:
    """Every block read back and checked against its worker's CRC-32; the summary filled in plan order."""
    summary = engine.summary
    out_hashes: dict[str, Any] = {}
    inputs: dict[tuple[int, str], str] = {}
    for i in range(len(groups)):
        result = results[i]
        for ref, entry, kept, nbytes in result["blocks"]:
            data = tensor_bytes(sink.read(ref.name, ref.start, ref.stop).contiguous())
            if zlib.crc32(data) != entry.crc32:
                raise BlockmergeError(f"rows {ref.start}:{ref.stop} as stored differ from what the worker wrote "
                                      "(is the output on storage every worker sees?)", param=ref.name)
            out_hashes.setdefault(ref.name, hasher()).update(data)
            summary.blocks_resumed += kept
            summary.bytes_written += 0 if kept else nbytes
        for name, reports in result["reports"].items():
            summary.reports.setdefault(name, []).extend(reports)
        inputs.update(result["inputs"])
        summary.bytes_read += result["bytes_read"]
    return {n: h.hexdigest() for n, h in out_hashes.items()}, inputs


def task_result(future: Any, work: str = "this merge") -> Any:
    """A task's result; a worker that died on it too often is one line."""
    from distributed import KilledWorker

    try:
        return future.result()
    except KilledWorker as err:
        raise BlockmergeError(f"Dask workers died running a task of {work} ({err}); "
                              "see the workers' logs (out of memory?)") from None
