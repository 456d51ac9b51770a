"""Where an output is written until it is complete: a sibling work directory, a lock and a journal.

    .NAME.blockmerge-partial/request.json   what is being merged (a resume must match it)
    .NAME.blockmerge-partial/journal.jsonl  blocks written, with the CRC-32 of their bytes, checksums of the
                                            inputs read for them (and of everything the reduction passes
                                            read), and the method's reports on them
    .NAME.blockmerge-partial/NAME           the output itself, moved onto OUT when complete
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BlockmergeError
from . import faults


@dataclass
class Journaled:
    """What the journal says of a written block: the CRC-32 of its bytes, a 32-bit checksum of each input's bytes
    it was merged from (by role: `models[0]`, `base`, ...), and the method's reports on it."""

    crc32: int
    inputs: dict[str, int] = field(default_factory=dict)
    reports: list[dict] = field(default_factory=list)


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
        self.done: dict[tuple[str, int, int], Journaled] = {}
        self.passes: dict[str, int] | None = None  # checksum of each input's bytes the reduction passes read
        request = json.loads(json.dumps(request, sort_keys=True))
        request_path = self.work / "request.json"
        journal_path = self.work / "journal.jsonl"
        try:
            if resume and _same_request(request_path, request) and self.payload.exists():
                self.done, self.passes = _read_journal(journal_path)
            elif resume and _read_journal(journal_path)[0]:
                print(f"blockmerge: {self.out}: the partial output was started with other inputs or options (or "
                      "is missing): merging from the start", file=sys.stderr)
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

    def record(self, name: str, start: int, stop: int, block: Journaled) -> None:
        """Journal a block as written: a resume keeps it if its bytes and inputs still have these checksums."""
        self._write({"name": name, "start": start, "stop": stop, "crc32": block.crc32, "inputs": block.inputs,
                     "reports": block.reports})

    def restart_journal(self, passes: dict[str, int]) -> None:
        """Journal anew: the checksum of each input's bytes the reduction passes read, then the blocks in `done`."""
        self._journal.seek(0)
        self._journal.truncate()
        self.passes = passes
        self._write({"passes": passes})
        for (name, start, stop), block in self.done.items():
            self.record(name, start, stop, block)

    def _write(self, entry: dict) -> None:
        self._journal.write(json.dumps(entry) + "\n")
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


def _same_request(path: Path, request: dict) -> bool:
    try:
        return json.loads(path.read_text()) == request
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False  # missing or damaged: the merge starts over


def _read_journal(path: Path) -> tuple[dict[tuple[str, int, int], Journaled], dict[str, int] | None]:
    """The blocks journaled, and what the reduction passes read (None: not journaled)."""
    done, passes = {}, None
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    for line in lines:
        try:
            item = json.loads(line)
            if "passes" in item:
                passes = {str(k): int(v) for k, v in item["passes"].items()}
                continue
            inputs = {str(k): int(v) for k, v in item["inputs"].items()}
            reports = [dict(r) for r in item["reports"]]
            done[(str(item["name"]), int(item["start"]), int(item["stop"]))] = Journaled(int(item["crc32"]), inputs,
                                                                                         reports)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            break  # a torn last line: the blocks after it are redone
    return done, passes


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
