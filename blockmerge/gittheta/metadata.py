"""git-theta metadata files (what git stores for a tracked checkpoint) and blockmerge's keys inside them.

A metadata file is JSON: nested keys down to one entry per parameter with its shape, dtype, LSH hash,
LFS pointer and update type. blockmerge's checkpoint plugins add two conventions, both plain parameters
to git-theta:
- a float16 or bfloat16 tensor `name` is stored as its raw uint16 bits under the keys (name, "#float16")
  or (name, "#bfloat16"), since git-theta 0.2.0's hash and serializer reject half precision;
- a safetensors header's `__metadata__` (provenance) is stored as uint8 JSON bytes under `__metadata__`,
  a name safetensors forbids for a tensor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BlockmergeError

HALF_KEYS = {"#float16": "float16", "#bfloat16": "bfloat16"}
HEADER_NAME = "__metadata__"
STORED_DTYPES = {"float64", "float32", "int64", "int32", "int16", "int8", "uint8", "bool", "uint16"}
_SHAPE = re.compile(r"^\((\d+(?:, \d+)*,?)?\)$")


@dataclass(frozen=True)
class Entry:
    """One tracked parameter: where its bytes are and what they decode to."""

    keys: tuple[str, ...]
    name: str
    shape: tuple[int, ...]
    dtype: str  # the tensor's dtype (float16/bfloat16 for halves)
    stored_dtype: str  # the dtype of the array in the LFS object
    oid: str
    size: int
    update_type: str
    last_commit: str | None  # for an incremental update: the commit holding the value it updates


def parse(data: bytes, label: str) -> dict[str, Entry]:
    """The parameters of a metadata file by tensor name (the header entry under HEADER_NAME)."""
    try:
        tree = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise BlockmergeError(f"not a git-theta metadata file ({str(err)[:120]}); is the file tracked with "
                              "`git theta track`?", path=label) from None
    if not isinstance(tree, dict):
        raise BlockmergeError("not a git-theta metadata file (not a JSON object)", path=label)
    entries: dict[str, Entry] = {}
    for keys, leaf in _leaves(tree, (), label):
        entry = _entry(keys, leaf, label)
        if entry.name in entries:
            raise BlockmergeError("parameter listed twice in git-theta metadata", path=label, param=entry.name)
        entries[entry.name] = entry
    return entries


def _leaves(node: dict, prefix: tuple[str, ...], label: str):
    for key, value in node.items():
        if not isinstance(value, dict):
            raise BlockmergeError(f"not a git-theta metadata file (entry {'/'.join(prefix + (key,))!r} is not an "
                                  "object)", path=label)
        if "lfs_metadata" in value:
            yield prefix + (key,), value
        else:
            yield from _leaves(value, prefix + (key,), label)


def _entry(keys: tuple[str, ...], leaf: dict, label: str) -> Entry:
    half = HALF_KEYS.get(keys[-1]) if len(keys) > 1 else None
    name = "/".join(keys[:-1] if half else keys)
    try:
        tensor, lfs, theta = leaf["tensor_metadata"], leaf["lfs_metadata"], leaf["theta_metadata"]
        match = _SHAPE.match(tensor["shape"])
        stored = tensor["dtype"]
        oid, size, update_type = lfs["oid"], int(lfs["size"]), theta["update_type"]
        last_commit = theta.get("last_commit")
    except (KeyError, TypeError, ValueError) as err:
        raise BlockmergeError(f"corrupt git-theta metadata entry ({type(err).__name__}: {err})", path=label,
                              param=name) from None
    if match is None or stored not in STORED_DTYPES or not re.fullmatch(r"[0-9a-f]{64}", str(oid)):
        raise BlockmergeError(f"corrupt git-theta metadata entry (shape {tensor['shape']!r}, dtype {stored!r}, "
                              f"oid {oid!r})", path=label, param=name)
    if half and stored != "uint16":
        raise BlockmergeError(f"corrupt git-theta metadata entry ({keys[-1]} stored as {stored})", path=label,
                              param=name)
    if stored == "uint16" and not half:
        raise BlockmergeError("uint16 tensors are not supported", path=label, param=name)
    shape = tuple(int(d) for d in match.group(1).rstrip(",").split(", ")) if match.group(1) else ()
    if last_commit is not None and not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", str(last_commit)):
        raise BlockmergeError(f"corrupt git-theta metadata entry (last_commit {last_commit!r})", path=label, param=name)
    return Entry(keys, name, shape, half or stored, stored, oid, size, str(update_type), last_commit)


def stored_form(name: str, array: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """The metadata keys and the array git-theta stores for tensor `name` (halves as raw uint16 bits)."""
    dtype = "bfloat16" if array.dtype.name == "bfloat16" else array.dtype.name
    for key, half in HALF_KEYS.items():
        if dtype == half:
            return (name, key), array.view(np.uint16)
    return (name,), array


def param_metadata(array: np.ndarray, oid: str, size: int, signature: list[int], commit: str | None) -> dict:
    """A parameter's metadata entry, field for field as git-theta writes it."""
    return {
        "tensor_metadata": {"shape": str(tuple(array.shape)), "dtype": str(array.dtype), "hash": signature},
        "lfs_metadata": {"version": "https://git-lfs.github.com/spec/v1", "oid": oid, "size": str(size)},
        "theta_metadata": {"update_type": "dense", "last_commit": commit},
    }


def dump(params: dict[tuple[str, ...], Any]) -> bytes:
    """A metadata file from {keys: entry}, laid out byte for byte as git-theta's clean filter writes it."""
    tree: dict = {}
    for keys, value in sorted(params.items()):
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return json.dumps(tree, indent=4).encode()
