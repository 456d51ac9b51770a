"""Tensor descriptions and the dtype names shared by every format."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# name -> (torch dtype, safetensors code)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float64": (torch.float64, "F64"),
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "int64": (torch.int64, "I64"),
    "int32": (torch.int32, "I32"),
    "int16": (torch.int16, "I16"),
    "int8": (torch.int8, "I8"),
    "uint8": (torch.uint8, "U8"),
    "bool": (torch.bool, "BOOL"),
}
FLOATING = frozenset({"float64", "float32", "float16", "bfloat16"})
_BY_TORCH = {v[0]: k for k, v in DTYPES.items()}
_BY_SAFETENSORS = {v[1]: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The blockmerge name of a torch dtype."""
    if dtype not in _BY_TORCH:
        raise ValueError(f"unsupported dtype {dtype}")
    return _BY_TORCH[dtype]


def from_safetensors_code(code: str) -> str | None:
    """The blockmerge dtype name of a safetensors dtype code, or None if unsupported."""
    return _BY_SAFETENSORS.get(code)


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name][0]


def safetensors_code(name: str) -> str:
    return DTYPES[name][1]


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a blockmerge dtype name (for zarr and tensorstore)."""
    if name == "bfloat16":
        return np.dtype(_bfloat16())
    return np.dtype(name)


def itemsize(name: str) -> int:
    return DTYPES[name][0].itemsize


def _bfloat16() -> type:
    import ml_dtypes  # its import takes most of a second: only merges that store bfloat16 through numpy pay it

    return ml_dtypes.bfloat16


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def rows(self) -> int:
        """Length of the first axis (1 for a scalar): the axis blocks are cut along."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def floating(self) -> bool:
        return self.dtype in FLOATING


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor, bfloat16 included."""
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(_bfloat16())
    return tensor.numpy()


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """A zero-copy tensor over a numpy array, bfloat16 included."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN or Inf.

    A sum is finite only if every term is, and summing is several times faster than `isfinite`;
    a sum that overflows is not proof of a bad value, so then every element is checked.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor."""
    flat = tensor.contiguous().reshape(-1)
    return memoryview((flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat).numpy().view(np.uint8))


def dense_layout_problem(t: torch.Tensor) -> str | None:
    """Why `t` does not own numel × itemsize bytes of its storage (None when it does): its strides must lay out
    its elements without overlap or gap (in any order of dimensions, so a transposed tensor is read), within
    the storage. An expanded tensor (stride 0) of a few stored bytes could otherwise declare terabytes."""
    if not t.numel():
        return None
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1):
        if stride != expected:
            return (f"tensor of shape {list(t.shape)} with strides {list(t.stride())} shares or skips bytes of its "
                    "storage (only dense, non-overlapping tensors are read)")
        expected *= size
    end = (t.storage_offset() + t.numel()) * t.element_size()
    if end > t.untyped_storage().nbytes():
        return f"tensor needs {end} bytes of a storage of {t.untyped_storage().nbytes()}"
    return None
