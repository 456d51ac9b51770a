"""Checkpoints and statistics tracked with git-theta, read at any revision without a checkout.

`REV:PATH` names a tracked file at a revision (`main:model.safetensors`, `HEAD~2:stats/fisher.safetensors`);
PATH is relative to the repository root. Each parameter is read from its LFS object when first asked for
(a git-theta parameter is the smallest readable block), and only the last one read is kept.
"""

from __future__ import annotations

import json
import threading
from pathlib import PurePosixPath

import numpy as np
import torch

from ..engine.sources import Checkpoint
from ..engine.tensors import TensorSpec, from_numpy
from ..errors import BlockmergeError
from . import metadata
from .parameters import decode, decode_parts
from .repo import Repo
from .updates import INCREMENTAL, apply_update


class TrackedCheckpoint(Checkpoint):
    """The tensors a git-theta metadata file describes, read lazily from the repository's LFS objects."""

    def __init__(self, repo: Repo, data: bytes, label: str, path: str | None = None):
        self.repo = repo
        self.label = label
        self.path = path
        self.entries = metadata.parse(data, label)
        self.specs = {n: TensorSpec(e.shape, e.dtype) for n, e in sorted(self.entries.items())
                      if n != metadata.HEADER_NAME}
        for name, entry in self.entries.items():
            if entry.update_type == "dense":
                continue
            if entry.update_type not in INCREMENTAL:
                raise BlockmergeError(f"git-theta update type {entry.update_type!r} is not supported (dense, "
                                      f"{', '.join(INCREMENTAL)} are)", path=label, param=name)
            if entry.dtype != entry.stored_dtype:
                raise BlockmergeError(f"a {entry.dtype} parameter stored as a {entry.update_type} update is not "
                                      "supported (half precision is tracked dense)", path=label, param=name)
            if not entry.last_commit or path is None:
                raise BlockmergeError(f"git-theta {entry.update_type} update without the commit of its previous "
                                      "value", path=label, param=name)
        self._lock = threading.Lock()
        self._cached: tuple[str, torch.Tensor] | None = None
        self._previous: dict[str, TrackedCheckpoint] = {}

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor `name`, decoded from its LFS object."""
        with self._lock:
            if self._cached is not None and self._cached[0] == name:
                return self._cached[1]
            tensor = from_numpy(np.asarray(self.array(name), order="C"))
            self._cached = (name, tensor)
            return tensor

    def array(self, name: str) -> np.ndarray:
        """The stored array of `name`, in the tensor's dtype (halves viewed back from their bits); an incremental
        update applied to the value at the commit it names."""
        entry = self.entries[name]
        data = self.repo.read_lfs(entry.oid, entry.size, self.label, name)
        if entry.update_type == "dense":
            array = decode(data, self.label, name)
        else:
            array = apply_update(entry.update_type, decode_parts(data, self.label, name),
                                 self.previous(entry.last_commit).array(name), self.label, name)
        if tuple(array.shape) != entry.shape or array.dtype.name != entry.stored_dtype:
            raise BlockmergeError(f"LFS object holds {array.dtype.name} {list(array.shape)}, metadata says "
                                  f"{entry.stored_dtype} {list(entry.shape)}", path=self.label, param=name)
        if entry.dtype != entry.stored_dtype:
            import ml_dtypes

            array = array.view(ml_dtypes.bfloat16 if entry.dtype == "bfloat16" else np.float16)
        return array

    def previous(self, commit: str) -> TrackedCheckpoint:
        """The same file at `commit` (where an incremental update finds the value it changes)."""
        if commit not in self._previous:
            blob = self.repo.blob_of(commit, self.path)
            if blob is None:
                raise BlockmergeError(f"the commit {commit[:12]} that an update is based on has no {self.path}",
                                      path=self.label)
            self._previous[commit] = TrackedCheckpoint(self.repo, self.repo.blob(blob), f"{commit[:12]}:{self.path}",
                                                       self.path)
        return self._previous[commit]

    def file_name(self) -> str:
        return PurePosixPath(self.path).name

    def header(self) -> dict[str, str]:
        """The safetensors header metadata stored with the checkpoint (empty when none was)."""
        if metadata.HEADER_NAME not in self.entries:
            return {}
        raw = self.array(metadata.HEADER_NAME).tobytes()
        try:
            header = json.loads(raw)
        except ValueError as err:
            raise BlockmergeError(f"corrupt stored safetensors header ({err})", path=self.label) from None
        return header if isinstance(header, dict) else {}

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        tensor = self.tensor(name)
        return tensor[start:stop] if tensor.dim() else tensor


class RevisionCheckpoint(TrackedCheckpoint):
    """A tracked file at a revision: `rev:path`, with the commit and blob it resolved to."""

    def __init__(self, repo: Repo, rev: str, path: str):
        self.rev = rev
        self.commit = repo.commit_of(rev)
        blob = repo.blob_of(self.commit, path)
        if blob is None:
            raise BlockmergeError(f"no such file at revision {rev} ({self.commit[:12]})", path=f"{rev}:{path}")
        self.blob = blob
        super().__init__(repo, repo.blob(blob), f"{rev}:{path}", path)


def split_revision(spec: str) -> tuple[str, str] | None:
    """(rev, path) of a `REV:PATH` string, or None when it is not one."""
    rev, sep, path = spec.partition(":")
    if not sep or not rev or not path:
        return None
    return rev, path.removeprefix("/")


def open_revision(spec: str, repo: str | None) -> RevisionCheckpoint:
    """The checkpoint `REV:PATH` in the repository holding `repo` (default: the current directory)."""
    parts = split_revision(spec)
    if parts is None:
        raise BlockmergeError("expected REV:PATH (a revision and a path from the repository root)", path=spec)
    return RevisionCheckpoint(Repo(repo or "."), *parts)


def resolve(source: str, repo: str | None) -> RevisionCheckpoint | None:
    """`REV:PATH` as a checkpoint (registered under `blockmerge.resolvers`); None for strings of other forms."""
    return open_revision(source, repo) if split_revision(source) is not None else None


def statistics_path(checkpoint_path: str, kind: str) -> str:
    """Where the statistic `kind` of a tracked checkpoint lives: `<kind>.safetensors` in its directory."""
    return str(PurePosixPath(checkpoint_path).parent / f"{kind}.safetensors").removeprefix("./")
