"""A checkpoint file turned into git-theta metadata: each parameter written as an LFS object, one at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..engine.safetensors_io import SafetensorsFile
from ..engine.tensors import to_numpy
from . import metadata
from .parameters import encode, lsh_signature
from .repo import Repo


def write_parameter(repo: Repo, array: np.ndarray, commit: str | None) -> dict:
    """Store one (already stored-form) array as an LFS object; its metadata entry."""
    oid, size = repo.write_lfs(encode(array))
    return metadata.param_metadata(array, oid, size, lsh_signature(array), commit)


def track_safetensors(repo: Repo, path: Path, commit: str | None,
                      keys_of: dict[str, tuple[str, ...]] | None = None) -> bytes:
    """The metadata file git-theta would store for the safetensors file at `path` (its header kept).

    `keys_of` gives a tensor's metadata keys where they are not the name itself (nested checkpoints).
    """
    source = SafetensorsFile(path)
    try:
        params = {}
        for name, (spec, _) in sorted(source.entries.items()):
            array = to_numpy(source.read(name, 0, spec.rows))
            keys, stored = metadata.stored_form(name, array)
            if keys_of and name in keys_of:
                keys = keys_of[name] + keys[1:]
            params[keys] = write_parameter(repo, stored, commit)
        if source.metadata:
            raw = np.frombuffer(json.dumps(source.metadata, sort_keys=True).encode(), dtype=np.uint8)
            params[(metadata.HEADER_NAME,)] = write_parameter(repo, raw, commit)
    finally:
        source.close()
    return metadata.dump(params)
