"""Read buffers reused from block to block.

A fresh buffer for every block is a fresh mapping whose pages the kernel faults in and zeroes:
that costs several times the copy out of the page cache. Blocks are read into the buffers an
earlier, finished block gave back instead.
"""

from __future__ import annotations

import threading

import torch

from .tensors import TensorSpec, torch_dtype


class BufferPool:
    """Byte buffers lent for one block's reads and given back when the block is done.

    At most `keep` buffers wait unused; a request no waiting buffer can hold replaces the largest
    of them, so the buffers alive stay as many as the blocks in flight need.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, spec: TensorSpec, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(buffer, a tensor of `rows` rows of `spec` over its first bytes)."""
        shape = (rows, *spec.shape[1:]) if spec.shape else ()
        nbytes = TensorSpec(shape, spec.dtype).nbytes
        with self._lock:  # _free is sorted largest first
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            buffer = self._free.pop(fits[-1]) if fits else None
            if buffer is None and self._free:
                del self._free[0]
        if buffer is None:
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buffer, buffer[:nbytes].view(torch_dtype(spec.dtype)).view(shape)

    def give(self, buffers: list[torch.Tensor]) -> None:
        """Buffers whose tensors are no longer used."""
        with self._lock:
            self._free.extend(buffers)
            self._free.sort(key=torch.Tensor.numel, reverse=True)
            del self._free[self.keep:]
