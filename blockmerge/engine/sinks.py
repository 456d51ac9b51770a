"""Where merged blocks go: memory, a blockmerge store, safetensors (one file, shards, or a HF directory)."""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from fractions import Fraction
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch

from ..errors import BlockmergeError
from .safetensors_io import SafetensorsWriter
from .store import StoreWriter, copy_files, write_json_atomic
from .tensors import TensorSpec, torch_dtype

SINKS = "blockmerge.sinks"  # entry points: output format name -> a callable with open_sink's arguments
PROVENANCE_FILE = "blockmerge-provenance.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3


class Sink:
    """Receives merged row blocks of known tensors; `seal` finishes it with checksums and provenance."""

    def write(self, name: str, start: int, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def discard(self, name: str, start: int, stop: int) -> None:
        """Make rows that could not be read back writable again (the rows are to be written anew)."""

    def seal(self, checksums: dict[str, str], provenance: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Put the rows written so far on storage and close the files (this sink writes no more; another machine
        may read them next). `seal` closes them too."""


class DictSink(Sink):
    def __init__(self, specs: dict[str, TensorSpec]):
        self.tensors = {n: torch.empty(s.shape, dtype=torch_dtype(s.dtype)) for n, s in specs.items()}

    def write(self, name, start, rows):
        t = self.tensors[name]
        (t[start:start + rows.shape[0]] if t.dim() else t).copy_(rows)

    def read(self, name, start, stop):
        t = self.tensors[name]
        return t[start:stop] if t.dim() else t

    def seal(self, checksums, provenance):
        pass


class StoreSink(Sink):
    """A blockmerge store whose arrays are all of one kind (`param` for checkpoints, or a statistic)."""

    def __init__(self, path: Path, specs: dict[str, TensorSpec], codec: str, files: list[Path], *, create: bool,
                 kind: str = "param", write_rows: dict[str, int] | None = None):
        self.path, self.kind = path, kind
        if create:
            path.mkdir()
            if files:
                copy_files(files, path / "files")
        self.writer = StoreWriter(path, {(kind, n): s for n, s in specs.items()}, codec, create=create,
                                  write_rows={(kind, n): r for n, r in (write_rows or {}).items()})

    def write(self, name, start, rows):
        self.writer.write(self.kind, name, start, rows)

    def read(self, name, start, stop):
        return self.writer.read(self.kind, name, start, stop)

    def discard(self, name, start, stop):
        self.writer.discard(self.kind, name, start, stop)

    def seal(self, checksums, provenance):
        self.writer.seal({(self.kind, n): c for n, c in checksums.items()}, provenance)

    def close(self):
        self.writer.close()


def shard_names(specs: dict[str, TensorSpec], shard_bytes: int) -> dict[str, str]:
    """Hugging Face shard file of each tensor, filled in name order up to `shard_bytes` each."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(specs):
        nbytes = specs[name].nbytes
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        return dict.fromkeys(shards[0], "model.safetensors")
    total = len(shards)
    return {n: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, names in enumerate(shards) for n in names}


def metadata_reserve(provenance_bytes: int) -> int:
    """Header bytes to keep free in a single-file output for a provenance of at most `provenance_bytes` of JSON
    (each of its characters escaped once more as a header string)."""
    return len(',"blockmerge":""') + 2 * provenance_bytes


class SafetensorsSink(Sink):
    """One `.safetensors` file (provenance in its header, `reserve` bytes kept for it), or a directory of shards
    with an index."""

    def __init__(self, path: Path, specs: dict[str, TensorSpec], shard_bytes: int, files: list[Path], *,
                 create: bool, single: bool, reserve: int = 0):
        self.path, self.specs, self.single = path, specs, single
        if "__metadata__" in specs:
            raise BlockmergeError("a safetensors output cannot hold a tensor named '__metadata__' (the header's "
                                  "reserved key); write a store", path=path)
        self.shard_of = dict.fromkeys(specs, path.name) if single else shard_names(specs, shard_bytes)
        if not single and create:
            path.mkdir()
            if files:
                copy_files(files, path)
        self.writers: dict[str, SafetensorsWriter] = {}
        for shard in sorted(set(self.shard_of.values())):
            shard_specs = {n: specs[n] for n, s in self.shard_of.items() if s == shard}
            target = path if single else path / shard
            self.writers[shard] = SafetensorsWriter(target, shard_specs, {"format": "pt"}, create=create,
                                                    reserve=reserve if single else 0)

    def write(self, name, start, rows):
        self.writers[self.shard_of[name]].write(name, start, rows)

    def read(self, name, start, stop):
        return self.writers[self.shard_of[name]].read(name, start, stop)

    def seal(self, checksums, provenance):
        if self.single:
            self.writers[self.path.name].set_metadata({"format": "pt", "blockmerge": json.dumps(provenance)})
        else:
            if len(self.writers) > 1:
                index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs.values())},
                         "weight_map": dict(sorted(self.shard_of.items()))}
                write_json_atomic(self.path / "model.safetensors.index.json", index)
            write_json_atomic(self.path / PROVENANCE_FILE, provenance)
        self.close()

    def close(self):
        for w in self.writers.values():
            w.close()


@functools.cache
def _sinks() -> dict[str, Callable[..., Sink]]:
    return {ep.name: ep.load() for ep in sorted(entry_points(group=SINKS), key=lambda ep: ep.name)}


def formats() -> list[str]:
    """The output formats registered under the entry-point group `blockmerge.sinks`."""
    return list(_sinks())


def infer_format(out: str | os.PathLike, format: str | None) -> str:
    if format is None:
        return "safetensors" if str(out).endswith(".safetensors") else "store"
    if format not in _sinks():
        raise BlockmergeError(f"unknown output format {format!r} (choose from {', '.join(formats())})")
    if format == "store" and str(out).endswith(".safetensors"):
        raise BlockmergeError("a store is a directory; name it without .safetensors", path=out)
    return format


def open_sink(path: Path, format: str, specs: dict[str, TensorSpec], *, codec: str, shard_bytes: int,
              files: list[Path], create: bool, kind: str = "param", provenance_bytes: int = 0,
              write_rows: dict[str, int] | None = None) -> Sink:
    """The sink writing `format` at `path` (created, or reopened to resume); a store's arrays are of `kind`.
    A single `.safetensors` file keeps room in its header for a provenance of `provenance_bytes` of JSON.
    `write_rows`: the rows of each tensor written at once (a block), where the layout can follow them.
    Formats are registered under the entry-point group `blockmerge.sinks`, each a callable of these arguments."""
    return _sinks()[format](path, specs, codec=codec, shard_bytes=shard_bytes, files=files, create=create, kind=kind,
                            provenance_bytes=provenance_bytes, write_rows=write_rows or {})


def store_sink(path: Path, specs: dict[str, TensorSpec], *, codec: str, shard_bytes: int, files: list[Path],
               create: bool, kind: str, provenance_bytes: int, write_rows: dict[str, int]) -> Sink:
    """A blockmerge store of arrays of `kind`, with the checkpoint's other `files`; each array is chunked no taller
    than its `write_rows`, so a block writes whole chunks."""
    return StoreSink(path, specs, codec, files, create=create, kind=kind, write_rows=write_rows)


def safetensors_sink(path: Path, specs: dict[str, TensorSpec], *, files: list[Path], **options: Any) -> Sink:
    """One `.safetensors` file, or shards of at most `shard_bytes` and their index in a directory (no other
    files)."""
    return hf_sink(path, specs, files=[], **options)


def hf_sink(path: Path, specs: dict[str, TensorSpec], *, codec: str, shard_bytes: int, files: list[Path],
            create: bool, kind: str, provenance_bytes: int, write_rows: dict[str, int]) -> Sink:
    """A Hugging Face directory: safetensors shards, their index, and the checkpoint's other `files` (config,
    tokenizer)."""
    return SafetensorsSink(path, specs, shard_bytes, files, create=create, single=path.name.endswith(".safetensors"),
                           reserve=metadata_reserve(provenance_bytes))


def parse_size(text: str | float, param: str | None = None) -> int:
    """Bytes from '512MiB', '5GB', '1e9' or an integer: a whole number from 1 byte to 1 EiB (2^60 bytes);
    `param` names the option in the error."""
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):
        raise BlockmergeError(f"cannot read size {text!r} (examples: 256MiB, 5GB)", param=param)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]{1,3})?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise BlockmergeError(f"cannot read size {text!r} (examples: 256MiB, 5GB)", param=param)
    value = Fraction(m.group(1)) * _UNITS[m.group(2).lower()]
    if not 1 <= value <= MAX_SIZE:
        raise BlockmergeError(f"size {text!r} is out of range (1 byte to 1EiB)", param=param)
    if value.denominator != 1:
        raise BlockmergeError(f"size {text!r} is not a whole number of bytes", param=param)
    return int(value)


MAX_SIZE = 2**60
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15, "eb": 10**18,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50, "eib": 2**60}
