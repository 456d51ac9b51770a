"""The content digest of tensors, and of what an output records about them: BLAKE3.

Stores written before BLAKE3 record sha256 checksums; they are still checked, by the digest they name.
"""

from __future__ import annotations

import hashlib
from typing import Any

import blake3

NAME = "blake3"
CHECKABLE = ("blake3", "sha256")  # digests a store manifest may record for a tensor


def hasher(name: str = NAME) -> Any:
    """A running hash of digest `name` (one of CHECKABLE)."""
    return blake3.blake3() if name == "blake3" else hashlib.new(name)


def hexdigest(data: bytes | memoryview) -> str:
    """The content digest of `data`, as 64 hex digits."""
    return blake3.blake3(data).hexdigest()
