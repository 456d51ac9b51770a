"""A statistic of a saved model over a task, from files to a statistics store: what `blockmerge stats` runs.

The examples can be split into contiguous shards, each accumulated on its own (on Dask workers,
:mod:`blockmerge.stats.cluster`); a local run is one shard that writes means instead of sums.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..engine import memory
from ..errors import BlockmergeError
from .data import TaskSpec
from .shard import Request, inputs_of, write_shard
from .store import StatisticsWriter


def compute(statistic: str, model_path: str | os.PathLike, task: TaskSpec, out: str | os.PathLike, *,
            labels: str = "empirical", num_examples: int | None = 1000, batch_size: int = 8, device: str = "cpu",
            seed: int = 0, parameters: str | None = None, inputs: bool = True, outputs: bool = False,
            max_memory: int | None = None, modules: str | None = None, overwrite: bool = False,
            progress: bool = False,
            executor: str = "local", scheduler: str | None = None, shards: int | None = None) -> dict[str, Any]:
    """Compute `fisher`, `gram` or `blockwise_fisher` of the model at `model_path` over `task`; write to `out`.

    parameters (Fisher) and modules (Gram: Linear module names) are regexes restricting what is computed.
    executor: `local`, or `dask` to split the examples into `shards` (default: one per worker thread)
    computed by the Dask cluster at `scheduler` (default $BLOCKMERGE_DASK_SCHEDULER, else a local cluster);
    the model, the task's data and `out` must then be on storage every worker sees.
    Returns the summary written into the store's metadata (examples, tokens, seconds, peak RSS).
    """
    request = Request(statistic, str(model_path), task, labels=labels, num_examples=num_examples,
                      batch_size=batch_size, device=device, seed=seed, parameters=parameters, inputs=inputs,
                      outputs=outputs, max_memory=max_memory, modules=modules)
    request.check()
    if executor == "dask":
        from .cluster import compute_on_dask

        return compute_on_dask(request, out, overwrite=overwrite, progress=progress, scheduler=scheduler,
                               shards=shards)
    if executor != "local":
        raise BlockmergeError(f"unknown executor {executor!r} (local or dask)")
    if scheduler is not None or shards is not None:
        raise BlockmergeError("a scheduler or shards are given but the executor is local "
                              "(pass executor='dask' / --executor dask)")
    start = time.perf_counter()
    with StatisticsWriter(out, overwrite=overwrite, inputs=inputs_of(request.model, request.task)) as writer:
        result = write_shard(request, writer, 0, num_examples, sums=False, progress=progress)
        summary = request.summary(result, sorted({k for k, _ in writer.checksums}), time.perf_counter() - start,
                                  memory.peak_rss_bytes())
        writer.close(summary)
    return summary
