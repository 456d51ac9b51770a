"""Checkpoints and statistics opened lazily: names, specs and row-range reads, whatever the format."""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import warnings
import zipfile
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ..errors import BlockmergeError
from .kinds import STATISTIC_KINDS
from .safetensors_io import SafetensorsFile
from .store import StoreReader, is_store, regular_file
from .tensors import TensorSpec, dense_layout_problem, dtype_name

RESOLVERS = "blockmerge.resolvers"  # entry points: (source: str, where) -> Checkpoint | None
FORMATS = "blockmerge.sources"  # entry points: (path: Path, kind: str) -> Checkpoint | None (None: not this format)

KIND_KEY = "blockmerge_statistic"

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


class Checkpoint:
    """A set of named tensors read by row range; `label` names it in errors."""

    label: str
    specs: dict[str, TensorSpec]
    files: list[Path] = []
    assembled = False  # True for a view built from other checkpoints: its label names no file that holds it

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """The rows, in `out` (contiguous, of their shape and dtype) where this source reads into a given
        tensor, else in a tensor of its own."""
        return self.read(name, start, stop)

    def prefetch(self, name: str, start: int, stop: int) -> None:
        """Start bringing rows into memory ahead of their read, where the format allows it."""

    def checksum(self, name: str) -> tuple[str, str] | None:
        """The stored digest of a tensor's bytes, (digest name, hex), where the format records one."""
        return None

    def paths(self) -> list[Path]:
        """The files whose size and time identify this checkpoint (none when it is in memory)."""
        return []

    def header(self) -> dict[str, str]:
        """The metadata stored beside the tensors (a safetensors header), where the format keeps any."""
        return {}

    def file_name(self) -> str:
        """The name of the file the tensors come from, for rules that go by name (`fisher.safetensors`)."""
        return Path(self.label).name

    def inputs(self) -> list[Checkpoint]:
        """The checkpoints an assembled view reads (none for a checkpoint of its own)."""
        return []

    def over(self, inputs: list[Checkpoint]) -> Checkpoint:
        """The same view over other copies of its `inputs` (in their order)."""
        return self


class MappingCheckpoint(Checkpoint):
    """Tensors already in memory."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str):
        self.label = label
        self.tensors = {}
        for name, t in tensors.items():
            if not isinstance(name, str) or not name:
                raise BlockmergeError(f"tensor names must be non-empty strings, got {name!r}", path=label)
            if not isinstance(t, torch.Tensor):
                raise BlockmergeError(f"expected a torch.Tensor, got {type(t).__name__}", path=label, param=name)
            self.tensors[name] = t.detach().cpu().contiguous()
        self.specs = {n: _spec_of(t, label, n) for n, t in self.tensors.items()}

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self.tensors[name]
        return t[start:stop] if t.dim() else t


def _spec_of(t: torch.Tensor, label: str, name: str) -> TensorSpec:
    try:
        return TensorSpec(tuple(t.shape), dtype_name(t.dtype))
    except ValueError as err:
        raise BlockmergeError(str(err), path=label, param=name) from None


class RenamedCheckpoint(Checkpoint):
    """Tensors of other checkpoints under new names (`parts`: new name -> (checkpoint, its name)), with `files` as
    the checkpoint's other files: a model assembled from layers of others."""

    assembled = True

    def __init__(self, parts: Mapping[str, tuple[Checkpoint, str]], label: str, files: list[Path] | None = None):
        self.label = label
        self.parts = dict(parts)
        self.specs = {new: source.specs[old] for new, (source, old) in self.parts.items()}
        self.files = list(files or [])

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        source, old = self.parts[name]
        return source.read(old, start, stop)

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        source, old = self.parts[name]
        return source.read_into(old, start, stop, out)

    def prefetch(self, name: str, start: int, stop: int) -> None:
        source, old = self.parts[name]
        source.prefetch(old, start, stop)

    def checksum(self, name: str) -> tuple[str, str] | None:
        source, old = self.parts[name]
        return source.checksum(old)

    def paths(self) -> list[Path]:
        return sorted({p for source, _ in self.parts.values() for p in source.paths()})

    def inputs(self) -> list[Checkpoint]:
        return list({id(source): source for source, _ in self.parts.values()}.values())

    def over(self, inputs: list[Checkpoint]) -> Checkpoint:
        copies = {id(old): new for old, new in zip(self.inputs(), inputs)}
        return RenamedCheckpoint({name: (copies[id(source)], old) for name, (source, old) in self.parts.items()},
                                 self.label, self.files)


class SafetensorsCheckpoint(Checkpoint):
    """One safetensors file, or Hugging Face shards listed by an index."""

    def __init__(self, path: Path):
        self.label = str(path)
        self._file_of: dict[str, SafetensorsFile] = {}
        if path.name.endswith(".index.json"):
            weight_map = _weight_map(path)
            shards = {}
            for shard in sorted(set(weight_map.values())):
                shards[shard] = SafetensorsFile(_shard_path(path, shard))
                listed = {n for n, s in weight_map.items() if s == shard}
                present = set(shards[shard].entries)
                for name in sorted(present ^ listed):
                    where = "not listed in the index" if name in present else "missing from the shard"
                    raise BlockmergeError(f"index and shard disagree ({where})", path=shards[shard].path, param=name)
            self._file_of = {n: shards[s] for n, s in weight_map.items()}
        else:
            f = SafetensorsFile(path)
            self._file_of = dict.fromkeys(f.entries, f)
        self.specs = {n: f.entries[n][0] for n, f in sorted(self._file_of.items())}

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._file_of[name].read(name, start, stop)

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        return self._file_of[name].read(name, start, stop, out)

    def prefetch(self, name: str, start: int, stop: int) -> None:
        self._file_of[name].prefetch(name, start, stop)

    def paths(self) -> list[Path]:
        return sorted({f.path for f in self._file_of.values()})


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BlockmergeError(f"unreadable shard index ({err})", path=index) from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise BlockmergeError("corrupt shard index (weight_map must map names to file names)", path=index)
    return weight_map


def _shard_path(index: Path, shard: str) -> Path:
    """The shard file named in an index: a file of the index's directory, or a link whose target stays in
    that directory or, in a Hugging Face hub cache, in the model's repository folder (its blobs)."""
    path = index.parent / shard
    if shard in ("", ".", "..") or Path(shard).name != shard:
        raise BlockmergeError(f"shard {shard!r} is outside the index's directory", path=index)
    root = _link_root(index.parent)
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a loop of links
        raise BlockmergeError(f"cannot resolve shard {shard!r} ({err})", path=index) from None
    if not target.is_relative_to(root):
        raise BlockmergeError(f"shard {shard!r} links outside {root}", path=index)
    if not path.exists():
        raise BlockmergeError(f"shard {shard!r} listed in the index does not exist", path=index)
    return regular_file(path.absolute())


def _link_root(directory: Path) -> Path:
    """Where links of a checkpoint directory may point: `models--ORG--NAME/` for a snapshot of a Hugging Face
    hub cache (`models--ORG--NAME/snapshots/REVISION/`, its files linked to `../../blobs/HASH`), else the
    directory itself."""
    directory = directory.resolve()
    repo = directory.parent.parent
    if directory.parent.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
        return repo
    return directory


class TorchCheckpoint(Checkpoint):
    """PyTorch `.bin`/`.pt` files, loaded with `weights_only=True` and memory-mapped."""

    def __init__(self, path: Path):
        self.label = str(path)
        names = _weight_map(path) if path.name.endswith(".index.json") else None
        files = [_shard_path(path, s) for s in sorted(set(names.values()))] if names else [path]
        self.tensors: dict[str, torch.Tensor] = {}
        for f in files:
            for name, t in _torch_load(f).items():
                if name in self.tensors:
                    raise BlockmergeError("tensor appears in two shards", path=f, param=name)
                self.tensors[name] = t
        if names is not None and set(names) != set(self.tensors):
            name = sorted(set(names) ^ set(self.tensors))[0]
            raise BlockmergeError("index and shards disagree", path=path, param=name)
        self.specs = {n: _spec_of(t, self.label, n) for n, t in sorted(self.tensors.items())}
        self._paths = files

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self.tensors[name]
        return (t[start:stop] if t.dim() else t).clone()

    def paths(self) -> list[Path]:
        return self._paths


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                mapped = True
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
                mapped = False
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise BlockmergeError(f"refused: not a plain tensor file, loading it would run code ({first})",
                              path=path) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise BlockmergeError(f"corrupt or unreadable PyTorch file ({str(err).splitlines()[0]})", path=path) from None
    if not isinstance(obj, Mapping):
        raise BlockmergeError(f"expected a state dict, found {type(obj).__name__}", path=path)
    for name, t in obj.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise BlockmergeError(f"expected name -> tensor entries, found {type(t).__name__}", path=path,
                                  param=str(name))
        problem = dense_layout_problem(t)
        if problem:
            raise BlockmergeError(problem, path=path, param=name)
    if mapped:
        _check_records(path, obj)
    return dict(obj)


def _check_records(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse a memory-mapped PyTorch zip whose storages are not exactly its `data/K` records: a storage
    declared larger than its record would be read into the archive's next headers (`torch.load` without
    mmap refuses such a file too), and a compressed record's bytes are not the values.

    The mapped storages are slices of one mapping of the file, so their order and distances are those of
    their records in the file: the i-th storage by address must be the i-th record by offset, of its size.
    """
    records = _data_records(path)
    storages: dict[int, list[tuple[int, str]]] = {}
    for name, t in sorted(tensors.items()):
        s = t.untyped_storage()
        if s.nbytes():
            storages.setdefault(s.data_ptr(), []).append((s.nbytes(), name))
    if len(storages) != len(records):
        raise BlockmergeError(f"{len(records)} non-empty data records for {len(storages)} non-empty storages "
                              "(corrupt file)", path=path)
    if not records:
        return
    by_address, by_offset = sorted(storages.items()), sorted(records.items())
    base = by_address[0][0] - by_offset[0][0]
    for (address, views), (offset, (size, record, stored)) in zip(by_address, by_offset):
        for nbytes, name in views:
            if address - base != offset or nbytes != size:
                raise BlockmergeError(f"storage of {nbytes} bytes does not match its record {record} of {size} "
                                      "bytes (corrupt file)", path=path, param=name)
            if not stored:
                raise BlockmergeError(f"record {record} is compressed (tensor data is stored as is in a PyTorch "
                                      "file)", path=path, param=name)


def _data_records(path: Path) -> dict[int, tuple[int, str, bool]]:
    """{offset: (size, name, stored uncompressed)} of the non-empty `data/K` records of a PyTorch zip, as torch
    locates them."""
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        with zipfile.ZipFile(path) as z:
            compressed = {i.filename.split("/", 1)[-1] for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED}
        records: dict[int, tuple[int, str, bool]] = {}
        for name in sorted(n for n in reader.get_all_records() if n.startswith("data/")):
            size = reader.get_record_size(name)
            if size:
                records.setdefault(reader.get_record_offset(name), (size, name, name not in compressed))
    except (RuntimeError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise BlockmergeError(f"corrupt PyTorch file ({str(err).splitlines()[0]})", path=path) from None
    return records


class StoreCheckpoint(Checkpoint):
    """One kind of tensor of a blockmerge store."""

    def __init__(self, path: Path, kind: str = "param"):
        self.label = str(path)
        self.reader = StoreReader(path, kind)
        self.specs = {n: e.spec for n, e in sorted(self.reader.entries.items())}
        files_dir = path / "files"
        self.files = sorted(p for p in files_dir.iterdir() if p.is_file()) if files_dir.is_dir() else []

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.reader.read(name, start, stop)

    def checksum(self, name: str) -> tuple[str, str] | None:
        return self.reader.entries[name].checksum

    def paths(self) -> list[Path]:
        return [self.reader.path / "blockmerge.json"]


def open_store(path: Path, kind: str) -> Checkpoint | None:
    """A blockmerge store (a directory), read as statistics of `kind` or parameters."""
    return StoreCheckpoint(path, kind) if path.is_dir() and is_store(path) else None


def open_safetensors(path: Path, kind: str) -> Checkpoint | None:
    """A `.safetensors` file or a shard index of them."""
    return SafetensorsCheckpoint(path) if path.name.endswith((".safetensors", ".safetensors.index.json")) else None


def open_torch(path: Path, kind: str) -> Checkpoint | None:
    """A PyTorch `.bin`/`.pt`/`.pth` file or a shard index of them (read without unpickling code)."""
    name = path.name
    return TorchCheckpoint(path) if name.endswith((".bin", ".pt", ".pth", ".bin.index.json")) else None


@functools.cache
def _formats() -> tuple[Callable[[Path, str], Checkpoint | None], ...]:
    return tuple(ep.load() for ep in sorted(entry_points(group=FORMATS), key=lambda ep: ep.name))


def _open_format(path: Path, kind: str) -> Checkpoint | None:
    for opener in _formats():
        checkpoint = opener(path, kind)
        if checkpoint is not None:
            return checkpoint
    return None


def _open_path(path: Path, kind: str) -> Checkpoint:
    try:
        path.stat()
    except OSError as err:
        raise BlockmergeError(f"cannot open ({err.strerror.lower()})", path=path) from None
    if path.is_dir():
        opened = _open_format(path, kind)
        if opened is not None:
            return opened
        for weights in WEIGHT_FILES:
            if (path / weights).is_file():
                ckpt = _open_path(path / weights, kind)
                ckpt.files = sorted(p for p in path.iterdir() if p.is_file() and not _is_weight_file(p))
                return ckpt
        raise BlockmergeError("directory holds no checkpoint (no blockmerge store, "
                              f"no {' / '.join(WEIGHT_FILES)})", path=path)
    regular_file(path)
    opened = _open_format(path, kind)
    if opened is not None:
        return opened
    raise BlockmergeError("unknown checkpoint format (expected .safetensors, a shard index, .bin/.pt, "
                          "a Hugging Face directory or a blockmerge store)", path=path)


TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece",
                           "sentencepiece", "chat_template")


def is_tokenizer_file(path: Path) -> bool:
    """Whether a file of a Hugging Face directory belongs to its tokenizer."""
    return path.name.startswith(TOKENIZER_FILE_PREFIXES) or path.suffix == ".tiktoken"


def _is_weight_file(p: Path) -> bool:
    return p.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json"))


def copy_model_files(directory: Path, where: Path, edit_config: Callable[[dict], None],
                     skip: Callable[[Path], bool] = lambda f: False) -> list[Path]:
    """The files of a model directory that hold no weights (and that `skip` passes over) copied into `where`, its
    config.json as `edit_config` changes it; the copies."""
    out = []
    for f in sorted(directory.iterdir()):
        if not f.is_file() or _is_weight_file(f) or skip(f):
            continue
        copy = where / f.name
        if f.name == "config.json":
            config = json.loads(f.read_text())
            edit_config(config)
            copy.write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(f, copy)
        out.append(copy)
    return out


@functools.cache
def _resolvers() -> tuple[Callable[[str, Any], Checkpoint | None], ...]:
    return tuple(ep.load() for ep in sorted(entry_points(group=RESOLVERS), key=lambda ep: ep.name))


def resolve(source: object, where: str | os.PathLike | None = None) -> Checkpoint | None:
    """The checkpoint that a resolver registered under the entry-point group `blockmerge.resolvers` finds for a
    string naming no file (git-theta's `REV:PATH`, say), given `where` to look (a repository); else None."""
    if not isinstance(source, str) or os.path.exists(source):  # False, not an error, for an unusable name
        return None
    for resolver in _resolvers():
        checkpoint = resolver(source, where)
        if checkpoint is not None:
            return checkpoint
    return None


def open_checkpoint(source: object, label: str, kind: str = "param",
                    repo: str | os.PathLike | None = None) -> Checkpoint:
    """A checkpoint from a path (any supported format), a string a registered resolver knows (`REV:PATH` in the
    git-theta repository `repo`, default the current one), or a mapping of name -> tensor."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        return MappingCheckpoint(source, label)
    resolved = resolve(source, repo)
    if resolved is not None:
        return resolved
    if isinstance(source, (str, os.PathLike)):
        return _open_path(Path(source), kind)
    raise BlockmergeError(f"expected a path or a mapping of tensors, got {type(source).__name__}", path=label)


def statistics_kind(header: dict[str, str], path: str) -> str:
    """The statistic kind of a file, from its header or else its name."""
    kind = header.get(KIND_KEY) or PurePosixPath(path).name.removesuffix(".safetensors")
    if kind not in STATISTIC_KINDS:
        raise BlockmergeError(f"cannot tell which statistic this file holds (no {KIND_KEY!r} in its header and "
                              f"its name is not one of {', '.join(f'{k}.safetensors' for k in STATISTIC_KINDS)})",
                              path=path)
    return kind


def open_statistics_file(source: str | os.PathLike) -> dict[str, Checkpoint]:
    """{kind: checkpoint} of a statistics `.safetensors` file."""
    path = Path(source)
    header = SafetensorsFile(path).metadata
    return {statistics_kind(header, str(path)): SafetensorsCheckpoint(path)}


def open_statistics(source: object, label: str, repo: str | os.PathLike | None = None) -> dict[str, Checkpoint]:
    """Statistics of one model, by kind: a store holding statistic kinds, a one-kind `.safetensors` file (on
    disk or `REV:PATH` in the git-theta repository `repo`), or {kind: path or mapping}."""
    resolved = resolve(source, repo)
    if resolved is not None:
        return {statistics_kind(resolved.header(), resolved.file_name()): resolved}
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".safetensors"):
        return open_statistics_file(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not is_store(path):
            raise BlockmergeError("statistics must be a blockmerge store (or a mapping of kind -> tensors)", path=path)
        kinds = StoreReader(path).kinds() - {"param"}
        return {k: StoreCheckpoint(path, k) for k in sorted(kinds)}
    if isinstance(source, Mapping):
        out = {}
        for kind, value in source.items():
            if kind not in STATISTIC_KINDS:
                raise BlockmergeError(f"unknown statistic kind {kind!r} (choose from {', '.join(STATISTIC_KINDS)})",
                                      path=label)
            out[kind] = open_checkpoint(value, f"{label}[{kind}]", kind, repo)
        return out
    raise BlockmergeError(f"expected a statistics store path or a mapping, got {type(source).__name__}", path=label)
