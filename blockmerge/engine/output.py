"""Where an output is written until it is complete: a sibling work directory, a lock and a journal.

    .NAME.blockmerge-partial/request.json   what is being merged (a resume must match it)
    .NAME.blockmerge-partial/journal.jsonl  blocks written, with the CRC-32 of their bytes
    .NAME.blockmerge-partial/NAME           the output itself, moved onto OUT when complete
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from ..errors import BlockmergeError
from . import faults


class Output:
    """The temporary location of one output, resumable, moved into place atomically."""

    def __init__(self, out: str | os.PathLike, request: dict, *, resume: bool, overwrite: bool):
        self.out = Path(out).absolute()
        self.work = self.out.parent / f".{self.out.name}.blockmerge-partial"
        self.payload = self.work / self.out.name
        self._lock_path = self.out.parent / f".{self.out.name}.blockmerge-lock"
        self._lock = self._acquire_lock() if self.out.parent.is_dir() else -1
        try:
            self._start(request, resume, overwrite)
        except BaseException:
            self._release_lock()
            raise

    def _start(self, request: dict, resume: bool, overwrite: bool) -> None:
        replaced = self.work / "replaced"
        if replaced.exists() and not self.out.exists():
            os.rename(replaced, self.out)  # a run killed mid-swap: the previous output goes back first
        try:
            exists = self.out.lstat() is not None
        except FileNotFoundError:
            exists = False
        except OSError as err:
            raise BlockmergeError(f"cannot write ({err.strerror})", path=self.out) from None
        if exists and not overwrite:
            raise BlockmergeError("output already exists (pass --overwrite to replace it)", path=self.out)
        if not self.out.parent.is_dir():
            raise BlockmergeError("output directory does not exist", path=self.out.parent)
        self.done: dict[tuple[str, int, int], int] = {}
        request = json.loads(json.dumps(request, sort_keys=True))
        request_path = self.work / "request.json"
        journal_path = self.work / "journal.jsonl"
        try:
            if resume and request_path.is_file() and json.loads(request_path.read_text()) == request:
                self.done = _read_journal(journal_path)
            if not self.done:
                shutil.rmtree(self.work, ignore_errors=True)
                try:
                    self.work.mkdir()
                    request_path.write_text(json.dumps(request, sort_keys=True))
                except OSError:
                    shutil.rmtree(self.work, ignore_errors=True)
                    raise
            self.resumed = bool(self.done)
            self._journal = open(journal_path, "a")
        except OSError as err:
            raise _os_error(err, self.work) from None

    def _acquire_lock(self) -> int:
        while True:
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise BlockmergeError(f"cannot write ({err.strerror})", path=self.out) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BlockmergeError("another blockmerge run is writing this output", path=self.out) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self._lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the file was replaced between open and lock: take the new one

    def _release_lock(self) -> None:
        if self._lock >= 0:
            try:
                os.unlink(self._lock_path)
            except FileNotFoundError:
                pass
            os.close(self._lock)
            self._lock = -1

    def record(self, name: str, start: int, stop: int, crc32: int) -> None:
        """Journal a block as written; `crc32` of its bytes lets a resume tell it was written whole."""
        self._journal.write(json.dumps({"name": name, "start": start, "stop": stop, "crc32": crc32}) + "\n")
        self._journal.flush()

    def commit(self) -> None:
        """Move the finished output onto OUT (replacing it when allowed) and clean up."""
        self._journal.close()
        _fsync_tree(self.payload)
        faults.point("commit")
        old = self.work / "replaced"
        if self.out.exists():
            os.rename(self.out, old)
            faults.point("swap")
        os.rename(self.payload, self.out)
        _fsync_dir(self.out.parent)
        shutil.rmtree(self.work, ignore_errors=True)
        self._release_lock()

    def suspend(self) -> None:
        """Stop without removing anything: a later run with resume continues from the journal."""
        if not self._journal.closed:
            self._journal.close()
        self._release_lock()

    def abort(self) -> None:
        """Remove everything this run wrote; OUT and the inputs are untouched."""
        if not self._journal.closed:
            self._journal.close()
        shutil.rmtree(self.work, ignore_errors=True)
        self._release_lock()


def _read_journal(path: Path) -> dict[tuple[str, int, int], int]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                item = json.loads(line)
                done[(item["name"], item["start"], item["stop"])] = int(item["crc32"])
            except (ValueError, KeyError, TypeError):
                break  # a torn last line: the blocks after it are redone
    return done


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if path.is_dir():
        for d in [path, *(p for p in path.rglob("*") if p.is_dir())]:
            _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(err: OSError, path: Path) -> BlockmergeError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return BlockmergeError(f"no space left for the output ({err.strerror})", path=path)
    return BlockmergeError(f"cannot write ({err.strerror})", path=err.filename or path)
