"""git-theta checkpoint plugins (entry-point group `git_theta.plugins.checkpoints`): safetensors and PyTorch files
tracked bit-exactly, float16 and bfloat16 included, safetensors headers kept, PyTorch files never unpickled
beyond plain tensors (`weights_only=True`).

git-theta picks a plugin by `GIT_THETA_CHECKPOINT_TYPE`; `python3 -m blockmerge.gittheta install` makes the
repository's filter set it from each file's extension (`blockmerge.gittheta.filter`).
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
from git_theta.checkpoints import Checkpoint

from .metadata import HALF_KEYS, HEADER_NAME

# safetensors dtype code -> numpy dtype of the stored array; halves keep their bits as uint16
STORED = {"F64": "float64", "F32": "float32", "F16": "uint16", "BF16": "uint16", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
HALF_CODES = {"F16": "#float16", "BF16": "#bfloat16"}


def _read(checkpoint_path) -> bytes:
    if hasattr(checkpoint_path, "read"):
        return checkpoint_path.read()
    with open(checkpoint_path, "rb") as f:
        return f.read()


def _write(checkpoint_path, data: bytes) -> None:
    if hasattr(checkpoint_path, "write"):
        checkpoint_path.write(data)
        return
    with open(checkpoint_path, "wb") as f:
        f.write(data)


def _tensors(checkpoint: dict) -> dict[str, tuple[str, np.ndarray]]:
    """{name: (dtype, array)} of a (nested) checkpoint dict; halves with their half dtype over uint16 bits."""
    out = {}
    for name, value in checkpoint.items():
        if name == HEADER_NAME:
            continue
        if isinstance(value, dict):
            (key, bits), = value.items()
            out[name] = (HALF_KEYS[key], np.asarray(bits, dtype=np.uint16, order="C"))
        else:
            array = np.asarray(value, order="C")
            out[name] = (array.dtype.name, array)
    return out


def _header(checkpoint: dict) -> dict[str, str] | None:
    raw = checkpoint.get(HEADER_NAME)
    return json.loads(np.asarray(raw, dtype=np.uint8).tobytes()) if raw is not None else None


class SafetensorsCheckpoint(Checkpoint):
    """A `.safetensors` file: every dtype blockmerge reads, and the header's metadata."""

    name: str = "blockmerge-safetensors"

    @classmethod
    def load(cls, checkpoint_path) -> dict:
        import safetensors

        data = _read(checkpoint_path)
        checkpoint: dict = {}
        for name, info in safetensors.deserialize(data):
            if info["dtype"] not in STORED:
                raise ValueError(f"{name}: unsupported safetensors dtype {info['dtype']}")
            array = np.frombuffer(bytes(info["data"]), dtype=STORED[info["dtype"]]).reshape(info["shape"])
            key = HALF_CODES.get(info["dtype"])
            checkpoint[name] = {key: array} if key else array
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length]).get("__metadata__")
        if header:
            checkpoint[HEADER_NAME] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
        return checkpoint

    def save(self, checkpoint_path) -> None:
        import safetensors

        tensors = _tensors(self)
        specs = {name: safetensors.TensorSpec(dtype=dtype, shape=list(array.shape), data_ptr=array.ctypes.data,
                                              data_len=array.nbytes)
                 for name, (dtype, array) in tensors.items()}
        data = bytes(safetensors.serialize(specs, metadata=_header(self)))  # `tensors` keeps the buffers alive
        _write(checkpoint_path, data)


class TorchCheckpoint(Checkpoint):
    """A PyTorch state dict file, loaded with `weights_only=True` (plain tensors only)."""

    name: str = "blockmerge-pytorch"

    @classmethod
    def load(cls, checkpoint_path) -> dict:
        import torch

        from ..engine.tensors import dense_layout_problem

        state = torch.load(io.BytesIO(_read(checkpoint_path)), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ValueError("a PyTorch checkpoint must be a dict of tensors")
        checkpoint: dict = {}
        for name, tensor in state.items():
            problem = dense_layout_problem(tensor)
            if problem:
                raise ValueError(f"{name}: {problem}")
            tensor = tensor.detach().contiguous()
            if tensor.dtype in (torch.float16, torch.bfloat16):
                key = "#float16" if tensor.dtype == torch.float16 else "#bfloat16"
                checkpoint[name] = {key: tensor.view(torch.int16).numpy().view(np.uint16)}
            else:
                checkpoint[name] = tensor.numpy()
        return checkpoint

    def save(self, checkpoint_path) -> None:
        import torch

        state = {}
        for name, (dtype, array) in _tensors(self).items():
            tensor = torch.from_numpy(array.copy())
            state[name] = tensor.view(torch.int16).view(getattr(torch, dtype)) if dtype in HALF_KEYS.values() \
                else tensor
        buffer = io.BytesIO()
        torch.save(state, buffer)
        _write(checkpoint_path, buffer.getvalue())
