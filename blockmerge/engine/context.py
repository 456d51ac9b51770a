"""One merge run's context: its job and layout, summary, device and compute dtype, block reader and merge threads."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..plugins import Block, Method
from ..plugins.hyperparameters import places, resolve
from .buffers import BufferPool
from .job import Job, Layout, Summary, device
from .reader import Reader
from .tensors import torch_dtype


class Engine:
    """What every stage of one merge shares: the job, its layout and summary, the device and compute dtype, the
    reader of its blocks, the threads that merge slices, and the inputs' roles and labels."""

    def __init__(self, job: Job, layout: Layout):
        self.job, self.layout = job, layout
        self.device = device(job.device)
        self.compute = torch_dtype(job.compute_dtype)
        self.summary = Summary(method=job.method.name)
        self.roles = {f"models[{t}]": m.label for t, m in enumerate(job.models)}
        self.roles.update({"base": job.base.label} if job.base else {})
        self.roles.update({f"stats[{t}].{k}": c.label for t, s in enumerate(job.stats) for k, c in s.items()})
        self.roles.update({f"base_stats.{k}": c.label for k, c in job.base_stats.items()})
        self.roles.update({f"inputs.{k}": c.label for k, c in job.inputs.items()})
        self.changed: set[str] = set()  # roles of inputs found to differ from what a resumed output was merged from
        # (index of its checksums, role, label) of each checkpoint read, as the provenance lists them
        self.sources = [(t, "model", m.label) for t, m in enumerate(job.models)]
        self.sources += [(len(job.models), "base", job.base.label)] if job.base else []
        self.sources += [(len(job.models) + 1 + i, k, c.label) for i, (k, c) in enumerate(job.inputs.items())]
        self.workers: ThreadPoolExecutor | None = None  # merges slices in parallel (see dispatch.map_slices)
        self.worker_count = 0
        # Buffers for the block being merged and the one read ahead (each input and statistic), and its output.
        self.pool = BufferPool(keep=2 * (len(job.models) + 1) * (1 + len(job.stats and job.stats[0])) + 1)
        self.reader = Reader(job, layout, self.summary, self.pool)
        self.places = places(list(layout.specs))
        self.resolved: dict[str, Any] = {}  # the hyperparameters at each tensor, schedules resolved
        self.prepared: tuple[str, Any] | None = None  # the method's `prepare` of the tensor merged last
        self.prepare_lock = threading.Lock()

    def hyperparameters_at(self, name: str) -> Any:
        """The job's hyperparameters with their schedules resolved at tensor `name`."""
        if name not in self.resolved:
            self.resolved[name] = resolve(self.job.hyperparameters, self.places[name])
        return self.resolved[name]

    def prepare(self, method: Method, block: Block, hp: Any, state: Mapping[str, Any]) -> Any:
        """What `method.prepare` gives for the block's tensor, computed once per tensor (by the first of its slices
        to ask)."""
        with self.prepare_lock:
            if self.prepared is None or self.prepared[0] != block.name:
                self.prepared = (block.name, method.prepare(block, hp, state))
            return self.prepared[1]
