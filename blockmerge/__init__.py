"""blockmerge: merge fine-tuned models of one architecture, one parameter block at a time."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Imported on first use, so `import blockmerge` (git filters, plugins, the CLI's --help) does not load torch.
_EXPORTS = {"merge": "api", "methods": "api", "Summary": "engine.job", "BlockmergeError": "errors"}

__all__ = ["BlockmergeError", "Summary", "__version__", "merge", "methods"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
