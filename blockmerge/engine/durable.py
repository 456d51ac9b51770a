"""Putting written files on storage: fsync of files and of the directories that name them."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_tree(path: Path) -> None:
    """A file, or every file and directory under a directory, flushed to disk."""
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if path.is_dir():
        for d in [path, *(p for p in path.rglob("*") if p.is_dir())]:
            fsync_dir(d)


def fsync_dir(path: Path) -> None:
    """A directory's entries (the names of the files in it) flushed to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
