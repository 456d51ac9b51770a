"""Safetensors files read by row range and written block by block, without mapping them.

Reads use `pread` into fresh buffers, so the file's pages never count in this process's
memory; writes lay out the header first and `pwrite` each block at its offset, so a file
larger than memory is written without holding it.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import stat
import struct
from pathlib import Path

import torch

from ..errors import BlockmergeError
from .memory import libc_function
from .tensors import TensorSpec, from_safetensors_code, itemsize, safetensors_code, tensor_bytes, torch_dtype

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate tensor name {key!r}")
        out[key] = value
    return out


def read_header(path: Path, fd: int) -> tuple[dict[str, tuple[TensorSpec, int]], dict[str, str], int]:
    """Validate a safetensors header: {name: (spec, absolute data offset)}, metadata, file size."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise BlockmergeError("not a safetensors file (shorter than its 8-byte header length)", path=path)
    (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if header_len > MAX_HEADER_BYTES or header_len > size - 8:
        raise BlockmergeError(f"corrupt or truncated safetensors file (header length {header_len} "
                              f"does not fit in a file of {size} bytes)", path=path)
    raw = os.pread(fd, header_len, 8)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise BlockmergeError(f"corrupt safetensors header ({err})", path=path) from None
    if not isinstance(header, dict):
        raise BlockmergeError("corrupt safetensors header (not a JSON object)", path=path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BlockmergeError("corrupt safetensors header (__metadata__ must map strings to strings)", path=path)
    data_start = 8 + header_len
    data_len = size - data_start
    entries: dict[str, tuple[TensorSpec, int]] = {}
    spans = []
    for name, info in header.items():
        if not name:
            raise BlockmergeError("corrupt safetensors header (empty tensor name)", path=path)
        try:
            dtype = from_safetensors_code(info["dtype"])
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            valid = (type(info["shape"]) is list and all(type(d) is int and d >= 0 for d in shape) and len(shape) <= 64
                     and math.prod(max(d, 1) for d in shape) < 2**62
                     and type(begin) is int and type(end) is int and 0 <= begin <= end)
        except (KeyError, TypeError, ValueError):
            valid, dtype = False, None
        if not valid:
            raise BlockmergeError("corrupt safetensors header (bad dtype, shape or data_offsets)",
                                  path=path, param=name)
        if dtype is None:
            raise BlockmergeError(f"unsupported dtype {info['dtype']!r}", path=path, param=name)
        spec = TensorSpec(shape, dtype)
        if end - begin != spec.nbytes:
            raise BlockmergeError(f"corrupt safetensors header (data_offsets span {end - begin} bytes, "
                                  f"shape {list(shape)} of {dtype} needs {spec.nbytes})", path=path, param=name)
        if end > data_len:
            raise BlockmergeError(f"truncated safetensors file (data ends at byte {data_start + end}, "
                                  f"file has {size})", path=path, param=name)
        spans.append((begin, end, name))
        entries[name] = (spec, data_start + begin)
    _check_contiguous(path, sorted(spans), data_len)
    return entries, metadata, size


def _check_contiguous(path: Path, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """Refuse what safetensors refuses: tensors' data, in order of offsets, must follow one another from the
    start of the data section to the end of the file, with no gap, overlap or byte left over."""
    cursor, previous = 0, None
    for begin, end, name in spans:
        if begin < cursor:
            raise BlockmergeError(f"corrupt safetensors header (data of {previous!r} overlaps {name!r})", path=path)
        if begin > cursor:
            raise BlockmergeError(f"corrupt safetensors file ({begin - cursor} bytes of no tensor before this "
                                  "tensor's data)", path=path, param=name)
        cursor, previous = end, name
    if cursor != data_len:
        raise BlockmergeError(f"corrupt safetensors file ({data_len - cursor} bytes after the last tensor's data)",
                              path=path)


def pread_exact(fd: int, buffer: memoryview, offset: int, path: Path, param: str) -> None:
    """Fill `buffer` from `offset`, or fail naming the file if it ends first."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            raise BlockmergeError("truncated file (ended while reading)", path=path, param=param)
        done += n


class SafetensorsFile:
    """One safetensors file, read by row ranges."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = -1
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO would block the open
        except OSError as err:
            raise BlockmergeError(f"cannot open ({err.strerror})", path=self.path) from None
        try:
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):
                raise BlockmergeError("not a regular file (a FIFO, socket or device cannot be read)", path=self.path)
            self.entries, self.metadata, self.size = read_header(self.path, self._fd)
        except BaseException:
            self.close()
            raise
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def prefetch(self, name: str, start: int, stop: int) -> None:
        """Ask the kernel to start reading rows start:stop into the page cache (a later read waits less)."""
        spec, offset = self.entries[name]
        row_bytes = spec.row_numel * itemsize(spec.dtype)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, offset + start * row_bytes, (stop - start) * row_bytes,
                             os.POSIX_FADV_WILLNEED)

    def read(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start:stop of a tensor, into `out` (a contiguous tensor of their shape and dtype) if given."""
        spec, offset = self.entries[name]
        row_bytes = spec.row_numel * itemsize(spec.dtype)
        shape = ((stop - start),) + spec.shape[1:] if spec.shape else ()
        if out is None:
            out = torch.empty(shape, dtype=torch_dtype(spec.dtype))
        if out.numel():
            pread_exact(self._fd, tensor_bytes(out), offset + start * row_bytes, self.path, name)
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()


def header_bytes(specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None,
                 reserve: int = 0) -> tuple[bytes, dict[str, int]]:
    """The encoded header (with `reserve` spare bytes, padded to 8) and each tensor's absolute data offset."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets, cursor = {}, 0
    for name in sorted(specs):
        spec = specs[name]
        header[name] = {"dtype": safetensors_code(spec.dtype), "shape": list(spec.shape),
                        "data_offsets": [cursor, cursor + spec.nbytes]}
        offsets[name] = cursor
        cursor += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode() + b" " * reserve
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {k: start + v for k, v in offsets.items()}


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a range to disk now, so the closing fsync has little left to wait for
    (Linux `sync_file_range`; elsewhere nothing)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(nbytes), _SYNC_FILE_RANGE_WRITE)


_SYNC_FILE_RANGE_WRITE = 2
_COPY_BYTES = 64 * 1024 * 1024
_sync_file_range = libc_function("sync_file_range")


class SafetensorsWriter:
    """A safetensors file whose tensors are written in row blocks, in any order."""

    def __init__(self, path: str | os.PathLike, specs: dict[str, TensorSpec],
                 metadata: dict[str, str] | None = None, *, create: bool = True, reserve: int = 0):
        self.path = Path(path)
        self.specs = specs
        header, self.offsets = header_bytes(specs, metadata, reserve)
        self._header_len = len(header)
        total = len(header) + sum(s.nbytes for s in specs.values())
        # never through a link; a new file is created, never an existing one truncated
        self._fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT | os.O_EXCL if create else 0), 0o644)
        if create or os.pread(self._fd, len(header), 0) != header or os.fstat(self._fd).st_size != total:
            os.pwrite(self._fd, header, 0)  # new, or reopened damaged: its damaged blocks fail their CRC-32
            os.ftruncate(self._fd, total)

    def _span(self, name: str, start: int) -> int:
        spec = self.specs[name]
        return self.offsets[name] + start * spec.row_numel * itemsize(spec.dtype)

    def write(self, name: str, start: int, rows: torch.Tensor) -> None:
        data = tensor_bytes(rows)
        offset, done = self._span(name, start), 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)
        start_writeback(self._fd, offset, len(data))

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        spec = self.specs[name]
        out = torch.empty(((stop - start),) + spec.shape[1:] if spec.shape else (), dtype=torch_dtype(spec.dtype))
        if out.numel():
            pread_exact(self._fd, tensor_bytes(out), self._span(name, start), self.path, name)
        return out

    def set_metadata(self, metadata: dict[str, str]) -> None:
        """Rewrite the header's metadata: in place within the space reserved at creation, else (more than was
        reserved) into a copy of the file with a larger header."""
        header, _ = header_bytes(self.specs, metadata)
        if len(header) > self._header_len:
            self._grow_header(len(header))
        raw = header[8:].rstrip(b" ") + b" " * (self._header_len - len(header.rstrip(b" ")))
        os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)

    def _grow_header(self, header_len: int) -> None:
        """Move the tensors' bytes into a new file after a header of `header_len` bytes, which replaces this one."""
        copy = self.path.with_name(self.path.name + ".grown")
        fd = os.open(copy, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data_bytes = sum(s.nbytes for s in self.specs.values())
            os.ftruncate(fd, header_len + data_bytes)
            for done in range(0, data_bytes, _COPY_BYTES):
                chunk = os.pread(self._fd, min(_COPY_BYTES, data_bytes - done), self._header_len + done)
                written = 0
                while written < len(chunk):
                    written += os.pwrite(fd, chunk[written:], header_len + done + written)
            os.replace(copy, self.path)
        except BaseException:
            os.close(fd)
            copy.unlink(missing_ok=True)
            raise
        os.close(self._fd)
        self._fd = fd
        self.offsets = {n: o + header_len - self._header_len for n, o in self.offsets.items()}
        self._header_len = header_len

    def close(self, sync: bool = True) -> None:
        if self._fd >= 0:
            if sync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
