"""blockmerge: merge fine-tuned models of one architecture, one parameter block at a time."""

__version__ = "0.1.0"

from .api import merge, methods  # noqa: E402
from .engine.run import Summary  # noqa: E402
from .errors import BlockmergeError  # noqa: E402

__all__ = ["BlockmergeError", "Summary", "__version__", "merge", "methods"]
