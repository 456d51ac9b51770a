"""The one exception type blockmerge raises for bad input or an unusable environment."""


class BlockmergeError(Exception):
    """A one-line, user-facing error naming the file and parameter at fault."""

    def __init__(self, message: str, *, path: object = None, param: str | None = None):
        parts = [str(path)] if path is not None else []
        if param is not None:
            parts.append(f"parameter {param!r}")
        prefix = ": ".join(parts)
        text = f"{prefix}: {message}" if prefix else message
        super().__init__(" ".join(text.split()))
