"""One git-theta parameter: its LFS object (a msgpack'd in-memory zarr array) and its locality-sensitive hash.

The encoding is byte-for-byte git-theta 0.2.0's dense update (`params.TensorStoreSerializer` inside
`MsgPackCombiner`), and the hash is its `FastEuclideanLSH` computed in numpy with the same sequential float64
sums, so signatures are identical to git-theta's without its per-process JIT compilation.
"""

from __future__ import annotations

import os

import msgpack
import numpy as np
import tensorstore as ts

from ..errors import BlockmergeError

LSH_CHUNK = 1 << 15  # features hashed at once: 32768 x signature size float64 values in flight


def encode(array: np.ndarray) -> bytes:
    """The LFS object git-theta writes for a dense parameter."""
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "memory"},
                     "metadata": {"shape": list(array.shape), "dtype": array.dtype.str}, "create": True}).result()
    store.write(array).result()
    kv = store.kvstore
    chunks = {key.decode("utf-8"): kv[key] for key in kv.list().result()}
    return msgpack.packb({"parameter": chunks}, use_bin_type=True)


def decode(data: bytes, label: str, param: str) -> np.ndarray:
    """The array of a dense parameter's LFS object."""
    parts = decode_parts(data, label, param)
    if "parameter" not in parts:
        raise BlockmergeError(f"undecodable git-theta parameter object (holds {', '.join(sorted(parts))}, not "
                              "'parameter')", path=label, param=param)
    return parts["parameter"]


def decode_parts(data: bytes, label: str, param: str) -> dict[str, np.ndarray]:
    """The named arrays of a parameter's LFS object (`parameter` for a dense one; `R` and `C` of a low-rank
    update, and so on)."""
    try:
        parts = msgpack.unpackb(data, raw=False)
        arrays = {}
        for part, chunks in parts.items():
            context = ts.Context()
            kv = ts.KvStore.open("memory://", context=context).result()
            for key, value in chunks.items():
                kv[key] = value
            arrays[part] = ts.open({"driver": "zarr", "kvstore": "memory://"}, context=context,
                                   open=True).result().read().result()
        return arrays
    except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as err:
        raise BlockmergeError(f"undecodable git-theta parameter object ({str(err).splitlines()[0][:200]})",
                              path=label, param=param) from None


def _env(name: str, default: float) -> float:
    value = os.environ.get(name)
    return type(default)(value) if value else default


def lsh_signature(array: np.ndarray) -> list[int]:
    """git-theta's Euclidean LSH signature of an array (settings from the same GIT_THETA_* variables)."""
    size = _env("GIT_THETA_LSH_SIGNATURE_SIZE", 16)
    width = _env("GIT_THETA_PARAMETER_ATOL", 1e-8)
    rng = np.random.Generator(np.random.MT19937(seed=42))
    pool = rng.normal(size=_env("GIT_THETA_LSH_POOL_SIZE", 10_000))
    limits = np.iinfo(np.int64)
    offsets = rng.integers(limits.min, limits.max, size=size, dtype=np.int64)
    flat = array.reshape(-1)
    total = np.zeros(size)
    for start in range(0, flat.size, LSH_CHUNK):
        features = flat[start:start + LSH_CHUNK].astype(np.float64)
        index = np.arange(start, start + features.size, dtype=np.int64)
        hyperplanes = pool[np.mod(np.bitwise_xor(index[:, None], offsets[None, :]), pool.size)]
        terms = np.concatenate([total[None, :], features[:, None] * hyperplanes])
        total = np.cumsum(terms, axis=0)[-1]  # a running sum in order, as git-theta's loop adds
    return np.floor(total / width).astype(np.int64).tolist()


def lsh_distance(query: np.ndarray, data: np.ndarray) -> float:
    """git-theta's estimate of the Euclidean distance between two arrays from their signatures."""
    size = _env("GIT_THETA_LSH_SIGNATURE_SIZE", 16)
    width = _env("GIT_THETA_PARAMETER_ATOL", 1e-8)
    return float(np.linalg.norm(np.asarray(query) - np.asarray(data)) * width / np.sqrt(size))


class NumpyLSH:
    """git-theta's hash family interface (`hash`, `distance`) over `lsh_signature` and `lsh_distance`."""

    def hash(self, x: np.ndarray) -> np.ndarray:
        return np.array(lsh_signature(np.asarray(x)), dtype=np.int64)

    def distance(self, query: np.ndarray, data: np.ndarray) -> float:
        return lsh_distance(query, data)
