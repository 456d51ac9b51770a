"""blockmerge's store: a directory of zarr v3 arrays, one per tensor and kind, with a manifest.

    STORE/blockmerge.json        manifest: format, tensors (name, kind, path, shape, dtype, blake3), metadata
    STORE/arrays/000000/...      one zarr v3 array per entry, full-width row chunks
    STORE/files/...              non-tensor files of the source (config, tokenizer), for export

Array paths are assigned by the store, never taken from tensor names, so a name is data only.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import BlockmergeError
from .digest import CHECKABLE, NAME
from .durable import fsync_tree
from .kinds import STATISTIC_KINDS
from .tensors import DTYPES, TensorSpec, from_numpy, itemsize, to_numpy, torch_dtype

if TYPE_CHECKING:
    import tensorstore as ts

MANIFEST = "blockmerge.json"
FORMAT = "blockmerge-store"
VERSION = 1
CHUNK_BYTES = 8 * 1024 * 1024
CODECS = {
    "none": [],
    "zstd": [{"name": "zstd", "configuration": {"level": 3, "checksum": False}}],
    "gzip": [{"name": "gzip", "configuration": {"level": 5}}],
    "blosc": [{"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle",
                                                  "typesize": 4, "blocksize": 0}}],
}
KINDS = ("param", *STATISTIC_KINDS)  # what an array holds: parameters, or one kind of statistic
_ARRAY_PATH = re.compile(r"^arrays/[0-9]{6}$")


@dataclass(frozen=True)
class Entry:
    """One array of a store."""

    name: str
    kind: str
    path: str
    spec: TensorSpec
    checksum: tuple[str, str] | None  # (digest name, hex) of the tensor's bytes


def chunk_rows(spec: TensorSpec, most: int | None = None) -> int:
    """Rows per chunk: full-width rows, about CHUNK_BYTES per chunk, and at most `most` rows (the rows written at
    once: a write of part of a chunk rewrites the whole chunk)."""
    row_bytes = max(1, spec.row_numel * itemsize(spec.dtype))
    return max(1, min(spec.rows, CHUNK_BYTES // row_bytes, most or spec.rows))


def is_store(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _array_spec(root: Path, entry: Entry, layout: tuple[str, int] | None = None) -> dict:
    """tensorstore's spec of an array; to create one, its `layout` (codec, rows per chunk)."""
    spec: dict = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / entry.path)}}
    metadata = {"shape": list(entry.spec.shape), "data_type": entry.spec.dtype}
    if layout is not None:
        codec, rows = layout
        chunk = [rows, *(max(1, d) for d in entry.spec.shape[1:])] if entry.spec.shape else []
        metadata["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": chunk}}
        metadata["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}}, *CODECS[codec]]
    spec["metadata"] = metadata
    return spec


def read_manifest(root: Path) -> tuple[list[Entry], dict]:
    """Validated entries and metadata of a store's manifest."""
    try:
        raw = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise BlockmergeError(f"not a blockmerge store (no {MANIFEST})", path=root) from None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as err:
        raise BlockmergeError(f"corrupt store manifest ({err})", path=root / MANIFEST) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise BlockmergeError(f"not a {FORMAT} version {VERSION} manifest", path=root / MANIFEST)
    entries, seen, paths = [], set(), set()
    if not isinstance(raw.get("tensors", []), list):
        raise BlockmergeError("corrupt store manifest (tensors is not a list)", path=root / MANIFEST)
    for item in raw.get("tensors", []):
        try:
            name, kind, path = item["name"], item["kind"], item["path"]
            shape, dtype = tuple(item["shape"]), item["dtype"]
            recorded = [(d, item[d]) for d in CHECKABLE if d in item]
            ok = (isinstance(name, str) and name and kind in KINDS and isinstance(path, str)
                  and _ARRAY_PATH.fullmatch(path) and dtype in DTYPES
                  and all(type(d) is int and d >= 0 for d in shape) and len(recorded) <= 1
                  and all(isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for _, h in recorded))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise BlockmergeError(f"corrupt store manifest (bad entry {str(item)[:200]})", path=root / MANIFEST)
        if (kind, name) in seen or path in paths:
            raise BlockmergeError("corrupt store manifest (duplicate entry)", path=root / MANIFEST, param=name)
        seen.add((kind, name))
        paths.add(path)
        entries.append(Entry(name, kind, path, TensorSpec(shape, dtype), recorded[0] if recorded else None))
    metadata = raw.get("metadata", {})
    if not isinstance(metadata, dict):
        raise BlockmergeError("corrupt store manifest (metadata is not an object)", path=root / MANIFEST)
    return entries, metadata


class StoreReader:
    """Row-range reads of one kind of tensor from a store."""

    def __init__(self, root: str | os.PathLike, kind: str = "param"):
        self.path = Path(root)
        entries, self.metadata = read_manifest(self.path)
        self.all_entries = entries
        self.entries = {e.name: e for e in entries if e.kind == kind}
        self._arrays: dict[str, ts.TensorStore] = {}
        for e in self.entries.values():
            _only_regular_files(self.path / e.path, e.name)
            try:
                meta = json.loads((self.path / e.path / "zarr.json").read_text())
                ok = list(meta["shape"]) == list(e.spec.shape)
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                ok = True  # a missing or unreadable array is reported when it is read
            if not ok:
                raise BlockmergeError(f"manifest shape {list(e.spec.shape)} does not match the array's",
                                      path=self.path / e.path, param=e.name)

    def kinds(self) -> set[str]:
        return {e.kind for e in self.all_entries}

    def _array(self, name: str) -> ts.TensorStore:
        if name not in self._arrays:
            entry = self.entries[name]
            try:
                # tensorstore refuses paths with `..`: it gets the store's resolved path
                spec = _array_spec(self.path.resolve(), entry)
                self._arrays[name] = _tensorstore().open(spec, open=True, read=True).result()
            except Exception as err:  # tensorstore raises ValueError and its own status errors
                raise BlockmergeError(f"corrupt or missing array ({str(err).splitlines()[0]})",
                                      path=self.path / entry.path, param=name) from None
        return self._arrays[name]

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        spec = self.entries[name].spec
        if not spec.numel:  # numpy cannot hold some empty shapes, such as [2**61, 0]
            return _empty(spec, start, stop)
        array = self._array(name)
        try:
            data = array[start:stop].read().result() if array.rank else array.read().result()
        except Exception as err:
            raise BlockmergeError(f"corrupt array data ({str(err).splitlines()[0]})",
                                  path=self.path / self.entries[name].path, param=name) from None
        return from_numpy(np.asarray(data, order="C"))


def _only_regular_files(array: Path, name: str) -> None:
    """Refuse an array holding a FIFO, socket or device, whose read would block or never end."""
    for folder, _, files in os.walk(array):
        for f in files:
            regular_file(Path(folder, f), name)


def regular_file(path: Path, param: str | None = None) -> Path:
    """`path`, refused unless it is a regular file (or a link to one): a FIFO, socket or device would block
    a read or never end."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise BlockmergeError(f"cannot open ({err.strerror.lower()})", path=path, param=param) from None
    if not stat.S_ISREG(mode):
        raise BlockmergeError("not a regular file (a FIFO, socket or device cannot be read)", path=path,
                              param=param)
    return path


class StoreWriter:
    """Creates a store's arrays, writes them in row blocks, and seals it with a manifest."""

    def __init__(self, root: str | os.PathLike, specs: dict[tuple[str, str], TensorSpec], codec: str = "none",
                 *, create: bool = True, write_rows: dict[tuple[str, str], int] | None = None):
        """`write_rows`: the rows each array is written in (its chunks are no taller: whole chunks are written)."""
        if codec not in CODECS:
            raise BlockmergeError(f"unknown codec {codec!r} (choose from {', '.join(CODECS)})")
        self.path = Path(root)
        self.codec = codec
        self.entries: dict[tuple[str, str], Entry] = {}
        self._arrays = {}
        self._touched: set[tuple[str, str]] = set()  # arrays written since the last `close`
        self._chunk_rows: dict[tuple[str, str], int] = {}
        for key, spec in sorted(specs.items()):
            self.add(key[0], key[1], spec, create=create, write_rows=(write_rows or {}).get(key))

    def add(self, kind: str, name: str, spec: TensorSpec, *, create: bool = True, write_rows: int | None = None
            ) -> None:
        """Create (or reopen) the array of one more tensor; one that cannot be reopened (or is chunked otherwise)
        is made anew."""
        entry = Entry(name, kind, f"arrays/{len(self.entries):06d}", spec, None)
        self.entries[(kind, name)] = entry
        self._chunk_rows[(kind, name)] = chunk_rows(spec, write_rows)
        array_spec = _array_spec(self.path, entry, (self.codec, self._chunk_rows[(kind, name)]))
        try:
            if not create:
                try:
                    self._arrays[(kind, name)] = _tensorstore().open(array_spec, open=True,
                                                                     context=_write_context()).result()
                    return
                except ValueError:
                    pass  # missing or damaged: its blocks are written again
            self._arrays[(kind, name)] = _tensorstore().open(array_spec, create=True, delete_existing=True,
                                                             context=_write_context()).result()
        except ValueError as err:
            raise _write_error(err, self.path / entry.path, name) from None

    def write(self, kind: str, name: str, start: int, rows: torch.Tensor) -> None:
        if not rows.numel():
            return
        self._touched.add((kind, name))
        array = self._arrays[(kind, name)]
        data = to_numpy(rows)
        try:
            (array[start:start + rows.shape[0]] if array.rank else array).write(data).result()
        except ValueError as err:
            raise _write_error(err, self.path / self.entries[(kind, name)].path, name) from None

    def close(self) -> None:
        """Put the arrays written since the last `close` on storage."""
        for key in sorted(self._touched):
            fsync_tree(self.path / self.entries[key].path)
        self._touched.clear()

    def read(self, kind: str, name: str, start: int, stop: int) -> torch.Tensor:
        spec = self.entries[(kind, name)].spec
        if not spec.numel:
            return _empty(spec, start, stop)
        array = self._arrays[(kind, name)]
        return from_numpy(np.asarray((array[start:stop] if array.rank else array).read().result(), order="C"))

    def discard(self, kind: str, name: str, start: int, stop: int) -> None:
        """Delete the chunks holding rows start:stop (damaged ones could not be written over); they read as 0."""
        entry = self.entries[(kind, name)]
        root = self.path / entry.path / "c"
        if not entry.spec.shape:
            root.unlink(missing_ok=True)
            return
        rows = self._chunk_rows[(kind, name)]
        for index in range(start // rows, (max(stop, start + 1) - 1) // rows + 1):
            root.joinpath(str(index), *["0"] * (len(entry.spec.shape) - 1)).unlink(missing_ok=True)

    def seal(self, checksums: dict[tuple[str, str], str], metadata: dict) -> None:
        """Write the manifest last: a store without one is incomplete (its owner puts it on storage)."""
        tensors = [{"name": e.name, "kind": e.kind, "path": e.path, "shape": list(e.spec.shape),
                    "dtype": e.spec.dtype, NAME: checksums[key]} for key, e in self.entries.items()]
        manifest = {"format": FORMAT, "version": VERSION, "tensors": tensors, "metadata": metadata}
        write_json_atomic(self.path / MANIFEST, manifest)


def _empty(spec: TensorSpec, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of a tensor of no elements."""
    return torch.empty((stop - start, *spec.shape[1:]) if spec.shape else (), dtype=torch_dtype(spec.dtype))


def _write_error(err: ValueError, path: Path, name: str) -> BlockmergeError:
    """A tensorstore write failure as a one-line error; a full disk is said so."""
    code = re.search(r"os_error_code='?([0-9]+)", str(err))
    if code and int(code.group(1)) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return BlockmergeError(f"no space left for the output ({os.strerror(int(code.group(1)))})", path=path,
                               param=name)
    return BlockmergeError(f"cannot write ({str(err).splitlines()[0]})", path=path, param=name)


def write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_files(files: list[Path], dest: Path) -> None:
    """Copy non-tensor files (config, tokenizer) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dest / f.name)


@functools.cache
def _write_context() -> ts.Context:
    """tensorstore's resources for writing: no fsync after each chunk (`close`, or the commit of the output,
    puts the whole store on storage at once)."""
    return _tensorstore().Context({"file_io_sync": False})


def _tensorstore():
    import tensorstore  # with ml_dtypes, most of a second to import: merges that touch no store skip it

    return tensorstore
