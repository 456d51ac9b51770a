"""`blockmerge stats` as tasks on Dask distributed: the examples cut into contiguous shards, one task each.

A task loads the model and its examples from paths every worker sees, computes the sums of its shard
(not the means) and the token counts, and writes the sums as a partial statistics store in the output's
work directory; it returns only counts, checksums and figures. The client then reduces tensor by tensor:
it reads each shard's sum (checking it against its worker's digest), adds them in shard order, divides by
the total count exactly as a local run does (:func:`blockmerge.stats.fisher.mean`) and writes the result
into the output. The partial stores go with the work directory once the output is in place (or abandoned).

Shards are whole batches of the local run, so every float32 sum is the local one's, regrouped: the
results equal a local run's to float32 rounding (~1e-6 relative); counts are exact. A worker that dies is
replaced and its shard rerun by Dask; a rerun rewrites the shard's partial store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import uuid
from typing import Any

from tqdm.auto import tqdm

from .. import __version__
from ..engine import memory
from ..engine.cluster import connect, disconnect, task_result
from ..engine.digest import hexdigest
from ..engine.store import StoreReader
from ..engine.tensors import tensor_bytes
from ..errors import BlockmergeError
from .data import load_task
from .fisher import mean
from .shard import Request, inputs_of, positive_int, write_shard
from .store import StatisticsWriter


@dataclasses.dataclass(frozen=True)
class _Shard:
    """What one task is given: the request (paths absolute), its examples [start, stop) and where to write."""

    version: str
    request: Request
    start: int
    stop: int
    out: str
    stop_event: str


def _shard_task(shard: _Shard) -> dict[str, Any]:
    from distributed import Event

    if shard.version != __version__:
        raise BlockmergeError(f"this worker runs blockmerge {__version__}, the client {shard.version}")
    stop = Event(shard.stop_event)

    def check() -> None:
        if stop.is_set():
            raise BlockmergeError("stopped: another shard of this computation failed")

    check()
    with StatisticsWriter(shard.out, overwrite=True) as writer:
        figures = write_shard(shard.request, writer, shard.start, shard.stop, sums=True, check=check)
        writer.close({**figures, "start": shard.start, "stop": shard.stop})
    return {**figures, "checksums": writer.checksums, "peak_rss_bytes": memory.peak_rss_bytes()}


def compute_on_dask(request: Request, out: str | os.PathLike, *, overwrite: bool = False, progress: bool = False,
                    scheduler: str | None = None, shards: int | None = None) -> dict[str, Any]:
    """`request` computed in `shards` tasks (default: one per worker thread) on the Dask cluster at `scheduler`
    (or $BLOCKMERGE_DASK_SCHEDULER, else a LocalCluster) into the statistics store `out`; its summary."""
    started = time.perf_counter()
    if shards is not None and not positive_int(shards):
        raise BlockmergeError(f"shards must be a positive integer, got {shards!r}")
    if not os.path.isdir(request.model):
        raise BlockmergeError("not a model directory (the dask executor loads it from a path every worker sees)",
                              path=request.model)
    remote = dataclasses.replace(request, model=os.path.abspath(request.model),
                                 task=dataclasses.replace(request.task, data=os.path.abspath(request.task.data)))
    examples = len(load_task(remote.task))
    total = examples if request.num_examples is None else min(request.num_examples, examples)
    with StatisticsWriter(out, overwrite=overwrite, inputs=inputs_of(request.model, request.task)) as writer:
        client, cluster = connect(scheduler, progress)
        try:
            bounds = _bounds(total, request.batch_size, shards or sum(client.nthreads().values()))
            root = writer.output.work / "shards"
            root.mkdir()
            stop = f"blockmerge-stop-{uuid.uuid4().hex}"
            tasks = [_Shard(__version__, remote, a, b, str(root / f"shard-{i:05d}"), stop)
                     for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
            results = _run(client, tasks, progress)
        finally:
            disconnect(client, cluster)
        result = _reduce(writer, tasks, results)
        peak = max([memory.peak_rss_bytes()] + [r["peak_rss_bytes"] for r in results])
        summary = request.summary(result, sorted({k for k, _ in writer.checksums}), time.perf_counter() - started,
                                  peak)
        writer.close(summary)
    return summary


def _bounds(total: int, batch_size: int, shards: int) -> list[int]:
    """Shard boundaries: `shards` (at most one per batch) contiguous runs of whole batches covering [0, total)."""
    batches = math.ceil(total / batch_size)
    shards = max(1, min(shards, batches))
    return [min(total, k * batches // shards * batch_size) for k in range(shards + 1)]


def _run(client: Any, tasks: list[_Shard], progress: bool) -> list[dict[str, Any]]:
    """Each shard's result, in shard order; a failing shard stops the others (and waits for them) first."""
    from distributed import Event, as_completed

    futures = [client.submit(_shard_task, task, pure=False) for task in tasks]
    position = {f.key: i for i, f in enumerate(futures)}
    results: dict[int, dict[str, Any]] = {}
    bar = tqdm(total=tasks[-1].stop, desc=tasks[0].request.statistic, unit="example", disable=not progress,
               leave=False)
    try:
        for future in as_completed(futures, loop=client.loop):
            i = position[future.key]
            results[i] = task_result(future, "this statistics computation")
            bar.update(tasks[i].stop - tasks[i].start)
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: the scheduler may be what failed
            Event(tasks[0].stop_event, client=client).set()
            client.gather(futures, errors="skip")  # no task writes once the work directory is removed
        raise
    finally:
        bar.close()
    return [results[i] for i in range(len(tasks))]


def _reduce(writer: StatisticsWriter, tasks: list[_Shard], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Every tensor summed over the shards in shard order, divided by its total count and written; the figures
    of the whole computation."""
    first = results[0]
    for task, result in zip(tasks, results):
        if set(result["checksums"]) != set(first["checksums"]):
            raise BlockmergeError(f"holds other tensors than the shard at {tasks[0].out} (a parameter without "
                                  "gradient in some shard? run with one shard)", path=task.out)
        if result["model_sha256"] != first["model_sha256"]:
            raise BlockmergeError("workers loaded different models (changed during the computation, or not on "
                                  "storage every worker sees)", path=task.request.model)
    readers: dict[tuple[str, str], StoreReader] = {}
    for kind, name in sorted(first["checksums"]):
        total, count = None, 0
        for task, result in zip(tasks, results):
            if (task.out, kind) not in readers:
                readers[task.out, kind] = StoreReader(task.out, kind)
            reader = readers[task.out, kind]
            part = reader.read(name, 0, reader.entries[name].spec.rows)
            if hexdigest(tensor_bytes(part)) != result["checksums"][(kind, name)]:
                raise BlockmergeError(f"{kind!r} statistic as stored differs from what the worker wrote (is the "
                                      "output on storage every worker sees?)", path=task.out, param=name)
            total = part if total is None else total.add_(part)
            count += result["counts"][kind][name]
        writer.add(kind, name, mean(total, count))
    return {"examples": sum(r["examples"] for r in results), "tokens": sum(r["tokens"] for r in results),
            "target_tokens": sum(r["target_tokens"] for r in results), "labels": first["labels"],
            "model_sha256": first["model_sha256"], "model_kind": first["model_kind"]}
