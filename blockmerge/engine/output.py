"""Where an output is written until it is complete: a sibling work directory, a lock and a journal.

    .NAME.blockmerge-partial/request.json   what is being merged (a resume must match it)
    .NAME.blockmerge-partial/journal.jsonl  blocks written, with the CRC-32 of their bytes, checksums of the
                                            inputs read for them (and of everything the reduction passes
                                            read), and the method's reports on them
    .NAME.blockmerge-partial/NAME           the output itself, moved onto OUT when complete
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BlockmergeError
from . import faults
from .durable import fsync_dir, fsync_tree
from .safetensors_io import read_header
from .sinks import PROVENANCE_FILE, infer_format
from .store import FORMAT as STORE_FORMAT
from .store import MANIFEST

KINDS = {"file": "a blockmerge .safetensors file", "store": "a blockmerge store",
         "directory": "a blockmerge safetensors (or Hugging Face) directory"}


@dataclass
class Journaled:
    """What the journal says of a written block: the CRC-32 of its bytes, a 32-bit checksum of each input's bytes
    it was merged from (by role: `models[0]`, `base`, ...), and the method's reports on it."""

    crc32: int
    inputs: dict[str, int] = field(default_factory=dict)
    reports: list[dict] = field(default_factory=list)


class Output:
    """The temporary location of one output, resumable, moved into place atomically.

    Everything about OUT is decided before anything is written: it is no input and holds none (inside an
    input directory it may only be new, and never inside a store); an existing OUT is replaced only with
    `overwrite` and only when it is a blockmerge output of the same kind; missing parent directories are
    created (and removed again by `abort`).
    """

    def __init__(self, out: str | os.PathLike, request: dict, *, resume: bool, overwrite: bool,
                 format: str | None = None, inputs: Iterable[str | os.PathLike] = ()):
        self.out = check_output(out, format=format, overwrite=overwrite, inputs=inputs)
        self.kind = output_kind(self.out, format)
        self.overwrite = overwrite
        self.work = self.out.parent / f".{self.out.name}.blockmerge-partial"
        self.payload = self.work / self.out.name
        self._lock_path = self.out.parent / f".{self.out.name}.blockmerge-lock"
        self._lock = -1
        self._created = make_parents(self.out.parent)
        try:
            self._lock = self._acquire_lock()
            self._start(request, resume)
        except BaseException:
            self._release_lock()
            remove_dirs(self._created)
            raise

    def _start(self, request: dict, resume: bool) -> None:
        try:
            self._check_work_dir()
            self._recover()
        except OSError as err:
            raise os_error(err, self.work) from None
        check_existing(self.out, self.kind, self.overwrite)
        self.done: dict[tuple[str, int, int], Journaled] = {}
        self.passes: dict[str, int] | None = None  # checksum of each input's bytes the reduction passes read
        self.tensor_passes: dict[str, dict[str, int]] = {}  # the same per tensor, for passes run tensor by tensor
        request = json.loads(json.dumps(request, sort_keys=True))
        journal_path = self.work / "journal.jsonl"
        try:
            if resume and self._resumable(request):
                self.done, self.passes, self.tensor_passes = _read_journal(journal_path)
            elif resume and _read_journal(journal_path)[0]:
                print(f"blockmerge: {self.out}: the partial output was started with other inputs or options (or "
                      "is missing): merging from the start", file=sys.stderr)
            if not self.done:
                if os.path.lexists(self.work):
                    shutil.rmtree(self.work)
                os.mkdir(self.work, 0o700)
                try:
                    _write_new(self.work / "request.json", json.dumps(request, sort_keys=True))
                except OSError:
                    shutil.rmtree(self.work, ignore_errors=True)
                    raise
            self.resumed = bool(self.done)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | (0 if self.resumed else os.O_EXCL)
            self._journal = os.fdopen(os.open(journal_path, flags, 0o600), "a")
        except OSError as err:
            raise os_error(err, self.work) from None

    def _check_work_dir(self) -> None:
        """An existing work directory must be this user's own directory, not a link to one."""
        try:
            st = self.work.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else (
                "not a directory" if not stat.S_ISDIR(st.st_mode) else "owned by another user")
            raise BlockmergeError(f"the output's work directory is {what}; remove it", path=self.work)

    def _recover(self) -> None:
        """Finish what a run killed between the renames of an overwrite left."""
        replaced = self.work / "replaced"
        if not os.path.lexists(replaced):
            return
        if not os.path.lexists(self.out):
            os.rename(replaced, self.out)  # killed between the renames: the previous output goes back
        elif not os.path.lexists(self.payload):
            shutil.rmtree(self.work)  # killed after them: OUT is the new output, the rest is left over
        else:
            raise BlockmergeError(f"an interrupted overwrite left the previous output in {replaced} while OUT "
                                  "exists; move one of them away", path=self.out)

    def _resumable(self, request: dict) -> bool:
        """Whether the work directory holds a run of `request` made of plain files and directories of this user."""
        if not os.path.lexists(self.payload) or not _plain_tree(self.work):
            return False
        try:
            return json.loads(_read_plain(self.work / "request.json")) == request
        except (OSError, ValueError, RecursionError):
            return False  # missing or damaged: the merge starts over

    def _acquire_lock(self) -> int:
        while True:
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise BlockmergeError("the output's lock file is a symbolic link; remove it",
                                          path=self._lock_path) from None
                raise BlockmergeError(f"cannot write ({err.strerror})", path=self.out) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BlockmergeError("another blockmerge run is writing this output", path=self.out) from None
            try:
                same = os.fstat(fd).st_ino == os.lstat(self._lock_path).st_ino
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

    def record_tensor_passes(self, name: str, passes: dict[str, int]) -> None:
        """Journal the checksum of each input's bytes one tensor's reduction passes read (run tensor by tensor): a
        resume keeps the tensor's blocks if its passes read the same."""
        self.tensor_passes[name] = passes
        self._write({"tensor_passes": name, "passes": passes})

    def restart_journal(self, passes: dict[str, int]) -> None:
        """Journal anew: the checksum of each input's bytes the reduction passes read, then the blocks in `done`."""
        self.passes, self.tensor_passes = passes, {}
        self._rewrite()

    def forget(self, blocks: list[tuple[str, int, int]]) -> None:
        """Drop journaled blocks (from `done` and the journal): they are merged again."""
        if any(self.done.pop(key, None) is not None for key in blocks):
            self._rewrite()

    def _rewrite(self) -> None:
        self._journal.seek(0)
        self._journal.truncate()
        if self.passes is not None:
            self._write({"passes": self.passes})
        for name, passes in self.tensor_passes.items():
            self._write({"tensor_passes": name, "passes": passes})
        for (name, start, stop), block in self.done.items():
            self.record(name, start, stop, block)

    def _write(self, entry: dict) -> None:
        self._journal.write(json.dumps(entry) + "\n")
        self._journal.flush()

    def commit(self) -> None:
        """Move the finished output onto OUT (replacing it when allowed) and clean up."""
        self._journal.close()
        check_existing(self.out, self.kind, self.overwrite)
        fsync_tree(self.payload)
        faults.point("commit")
        if self.kind != "file" and os.path.lexists(self.out):
            # a directory cannot be renamed over a non-empty one: the previous output is moved aside first
            os.rename(self.out, self.work / "replaced")
            faults.point("swap")
        os.rename(self.payload, self.out)  # a file replaces a previous one atomically
        fsync_dir(self.out.parent)
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
        remove_dirs(self._created)


def output_kind(out: Path, format: str | None) -> str:
    """'file', 'store' or 'directory': what an output of `format` (default: from its name) at `out` is."""
    fmt = infer_format(out, format)
    if fmt == "store":
        return "store"
    return "file" if out.name.endswith(".safetensors") else "directory"


def check_output(out: str | os.PathLike, *, format: str | None = None, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """OUT as an absolute path (its directory's symbolic links and `..` resolved), checked before anything is
    written: a usable place that is no input and holds none (see `_refuse_inputs`), and nothing at it that may
    not be replaced."""
    given = Path(out).absolute()
    if given.name in ("", ".."):
        given = Path(os.path.realpath(given))
    if not given.name:
        raise BlockmergeError("the output must name a file or directory", path=out)
    _check_parent(given.parent)
    path = Path(os.path.realpath(given.parent)) / given.name
    _refuse_inputs(path, inputs)
    check_existing(path, output_kind(path, format), overwrite)
    return path


def check_existing(out: Path, kind: str, overwrite: bool) -> None:
    """Refuse what is at OUT unless `overwrite` is given and it is a previous blockmerge output of `kind`."""
    try:
        st = out.lstat()
    except FileNotFoundError:
        return
    except OSError as err:
        raise BlockmergeError(f"cannot write ({err.strerror})", path=out) from None
    if stat.S_ISLNK(st.st_mode):
        raise BlockmergeError("the output is a symbolic link; name its target or remove it", path=out)
    if not overwrite:
        raise BlockmergeError("output already exists (pass --overwrite to replace it)", path=out)
    found = previous_kind(out)
    if found is None:
        raise BlockmergeError("exists and is not a blockmerge output (no blockmerge provenance); --overwrite "
                              "replaces only blockmerge's own outputs: remove it or choose another output", path=out)
    if found != kind:
        raise BlockmergeError(f"is {KINDS[found]}, not {KINDS[kind]}; --overwrite replaces an output only with "
                              "one of its kind", path=out)


def previous_kind(path: Path) -> str | None:
    """Which kind of blockmerge output is at `path` ('file', 'store', 'directory'), None when it is not one.

    A `.safetensors` file carries its provenance in its header (`blockmerge`), a store its manifest, a
    safetensors or Hugging Face directory its provenance file.
    """
    mode = path.lstat().st_mode
    if stat.S_ISREG(mode):
        return "file" if "blockmerge" in _safetensors_metadata(path) else None
    if not stat.S_ISDIR(mode):
        return None
    if _json_object(path / MANIFEST).get("format") == STORE_FORMAT:
        return "store"
    if "blockmerge" in _json_object(path / PROVENANCE_FILE):
        return "directory"
    return None


def _safetensors_metadata(path: Path) -> dict:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {}
    try:
        return read_header(path, fd)[1]
    except BlockmergeError:
        return {}
    finally:
        os.close(fd)


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(_read_plain(path))
    except (OSError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_plain(path: Path) -> str:
    """The text of a regular file, read without following a symbolic link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return f.read()


def _write_new(path: Path, text: str) -> None:
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "w") as f:
        f.write(text)


def _plain_tree(root: Path) -> bool:
    """Whether everything under `root` is a directory or a regular file of one name, owned by this user (no
    symbolic or hard links, through which a write would reach a file elsewhere)."""
    uid = os.getuid()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            plain = stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink == 1)
            if st.st_uid != uid or not plain:
                return False
    return True


def _check_parent(parent: Path) -> None:
    """The deepest existing directory above OUT must be one (following links); below it nothing exists yet."""
    existing = parent
    while not os.path.lexists(existing):
        existing = existing.parent
    if not os.path.isdir(existing):
        what = "a broken symbolic link" if os.path.islink(existing) else "not a directory"
        raise BlockmergeError(f"is {what}, so the output cannot be written under it", path=existing)


def _refuse_inputs(out: Path, inputs: Iterable[str | os.PathLike]) -> None:
    """OUT is no input and holds none; inside an input directory it may only be new (statistics written next to
    their model), and never inside a store."""
    real = Path(os.path.realpath(out))
    for given in inputs:
        path = Path(os.path.realpath(given))
        if path in (out, real) or _same_file(out, path):
            raise BlockmergeError(f"is an input of this run ({given}); choose another output", path=out)
        if path.is_relative_to(out) or path.is_relative_to(real):
            raise BlockmergeError(f"holds an input of this run ({given}); choose another output", path=out)
        if out.is_relative_to(path) or real.is_relative_to(path):
            if (path / MANIFEST).is_file():
                raise BlockmergeError(f"lies inside a store this run reads ({given}); choose another output",
                                      path=out)
            if os.path.lexists(out):
                raise BlockmergeError(f"exists inside an input directory of this run ({given}), where nothing is "
                                      "replaced; choose another output", path=out)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def source_paths(*sources: object) -> list[Path]:
    """The paths among inputs given as paths, or lists and mappings of them (tensors are skipped)."""
    found: list[Path] = []
    for source in sources:
        if isinstance(source, (str, os.PathLike)):
            found.append(Path(source))
        elif isinstance(source, Mapping):
            found += source_paths(*source.values())
        elif isinstance(source, (list, tuple)):
            found += source_paths(*source)
    return found


def make_parents(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents (mkdir -p); the directories created, outermost first."""
    missing = []
    while not os.path.lexists(directory):
        missing.append(directory)
        directory = directory.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            if not os.path.isdir(d):  # made by someone else meanwhile: usable only as a directory
                remove_dirs(created)
                raise BlockmergeError("is not a directory, so the output cannot be written under it", path=d) from None
            continue
        except OSError as err:
            remove_dirs(created)
            raise os_error(err, d) from None
        created.append(d)
    return created


@contextlib.contextmanager
def parents_made(directory: Path | None) -> Iterator[None]:
    """`directory` and its missing parents created (none for None), and removed again if the body fails."""
    created = make_parents(directory) if directory is not None else []
    try:
        yield
    except BaseException:
        remove_dirs(created)
        raise


def remove_dirs(created: list[Path]) -> None:
    """Remove directories `make_parents` created, innermost first, those still empty."""
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            return


def _read_journal(path: Path) -> tuple[dict[tuple[str, int, int], Journaled], dict[str, int] | None,
                                        dict[str, dict[str, int]]]:
    """The blocks journaled, what the reduction passes read (None: not journaled) and what each tensor's read (where
    they ran tensor by tensor)."""
    done, passes, tensor_passes = {}, None, {}
    try:
        lines = _read_plain(path).splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    for line in lines:
        try:
            item = json.loads(line)
            if "tensor_passes" in item:
                tensor_passes[str(item["tensor_passes"])] = {str(k): int(v) for k, v in item["passes"].items()}
                continue
            if "passes" in item:
                passes = {str(k): int(v) for k, v in item["passes"].items()}
                continue
            inputs = {str(k): int(v) for k, v in item["inputs"].items()}
            reports = [dict(r) for r in item["reports"]]
            done[(str(item["name"]), int(item["start"]), int(item["stop"]))] = Journaled(int(item["crc32"]), inputs,
                                                                                         reports)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            break  # a torn last line: the blocks after it are redone
    return done, passes, tensor_passes


def os_error(err: OSError, path: Path) -> BlockmergeError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return BlockmergeError(f"no space left for the output ({err.strerror})", path=path)
    return BlockmergeError(f"cannot write ({err.strerror})", path=err.filename or path)
