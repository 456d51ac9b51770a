"""Statistics written to a blockmerge store atomically, one array per parameter and kind, with metadata (§16)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..engine import faults
from ..engine.digest import hexdigest
from ..engine.kinds import STATISTIC_KINDS
from ..engine.output import Output
from ..engine.store import StoreWriter
from ..engine.tensors import TensorSpec, tensor_bytes
from ..errors import BlockmergeError


def model_sha256(model: torch.nn.Module) -> str:
    """A content hash of a model's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


class StatisticsWriter:
    """A statistics store being written: `add` each finished accumulator, then `close` with the metadata.

    Nothing appears at the output path until `close`; an error (or leaving a `with` block by one)
    removes everything written. The output is never one of `inputs` (the model and data read).
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False, codec: str = "none",
                 inputs: Iterable[str | os.PathLike] = ()):
        self.output = Output(out, {"statistics": uuid.uuid4().hex}, resume=False, overwrite=overwrite, format="store",
                             inputs=inputs)
        try:
            self.output.payload.mkdir()
            self.writer = StoreWriter(self.output.payload, {}, codec)
        except BaseException:
            self.output.abort()
            raise
        self.checksums: dict[tuple[str, str], str] = {}

    def add(self, kind: str, name: str, tensor: torch.Tensor) -> None:
        if kind not in STATISTIC_KINDS:
            raise BlockmergeError(f"unknown statistic kind {kind!r} (choose from {', '.join(STATISTIC_KINDS)})")
        if (kind, name) in self.checksums:
            raise BlockmergeError(f"{kind!r} statistic written twice", param=name)
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(tensor).all()):
            raise BlockmergeError(f"{kind!r} statistic contains NaN or Inf", param=name)
        self.writer.add(kind, name, TensorSpec(tuple(tensor.shape), "float32"))
        self.writer.write(kind, name, 0, tensor)
        self.checksums[(kind, name)] = hexdigest(tensor_bytes(tensor))
        faults.point("block")

    def close(self, metadata: dict[str, Any]) -> Path:
        """Seal the store with `metadata` and move it into place."""
        self.writer.seal(self.checksums, {"statistics": {**metadata, "blockmerge": __version__}})
        self.output.commit()
        return self.output.out

    def abort(self) -> None:
        self.output.abort()

    def __enter__(self) -> StatisticsWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()


def write_statistics(tensors: dict[str, dict[str, torch.Tensor]], out: str | os.PathLike, metadata: dict[str, Any],
                     *, overwrite: bool = False) -> Path:
    """Write {kind: {parameter: tensor}} to a statistics store at `out`."""
    with StatisticsWriter(out, overwrite=overwrite) as writer:
        for kind, by_name in sorted(tensors.items()):
            for name, tensor in sorted(by_name.items()):
                writer.add(kind, name, tensor)
        return writer.close(metadata)
