"""What a merge records: the request a resumed run must match, and the provenance sealed into its output."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any

from .. import __version__
from .context import Engine
from .digest import hexdigest
from .dispatch import slice_rows
from .job import Job, Layout
from .plan import BlockRef
from .sources import Checkpoint, StoreCheckpoint

# Characters of the provenance around one report of a method, or around one tensor's list of them (a bound).
REPORT_ENTRY_BYTES = 64


def provenance_of(job: Job, engine: Engine, checksums: dict[str, str],
                  input_checksums: dict[tuple[int, str], str]) -> dict:
    """What an output records of how it was made: the method, options, inputs (and a BLAKE3 digest of the tensors
    read of each), the method's reports and a BLAKE3 digest of the output tensors' `checksums`."""
    per_input: dict[int, list[str]] = {}
    for (index, name), digest in sorted(input_checksums.items()):
        per_input.setdefault(index, []).append(f"{name}:{digest}")
    inputs = []
    for index, role, label in engine.sources:
        digest = hexdigest("\n".join(per_input.get(index, [])).encode())
        inputs.append({"role": role, "path": label, "blake3_of_tensors_read": digest})
    return {
        "blockmerge": __version__,
        "method": job.method.name,
        "hyperparameters": _jsonable(dataclasses.asdict(job.hyperparameters)),
        "common": _jsonable(dataclasses.asdict(job.common)),
        "inputs": inputs,
        "statistics": [{k: c.label for k, c in sorted(s.items())} for s in job.stats],
        "base_statistics": {k: c.label for k, c in sorted(job.base_stats.items())},
        "reports": engine.summary.reports,
        "output_blake3": hexdigest("\n".join(f"{n}:{c}" for n, c in sorted(checksums.items())).encode()),
        "dtype": job.dtype, "compute_dtype": job.compute_dtype,
    }


def provenance_bound(job: Job, engine: Engine, refs: list[BlockRef], metadata: dict | None) -> int:
    """A bound on the characters of the provenance's JSON: exact but for the method's reports, bounded by
    `report_bytes` a slice (checksums have a fixed length)."""
    size = len(json.dumps({**provenance_of(job, engine, {}, {}), **(metadata or {})}))
    if job.method.report_bytes:
        merged = [r for r in refs if r.action == "merge"]
        for ref in merged:
            step = slice_rows(engine, ref.name, job.method)
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
             *job.base_stats.values(), *job.inputs.values()]
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
        **({"inputs": {k: _identity(c) for k, c in sorted(job.inputs.items())}} if job.inputs else {}),
    }


def _jsonable(obj: Any) -> Any:
    """`obj` with its tuples as lists (as JSON reads them back)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
