"""A git repository as git-theta uses it: revisions, blobs, config and the local Git LFS object store."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from ..errors import BlockmergeError

LFS_VERSION = "https://git-lfs.github.com/spec/v1"


class Repo:
    """The git repository holding `directory` (its work tree root, git directory and LFS store)."""

    def __init__(self, directory: str | os.PathLike = "."):
        self.directory = Path(directory)
        try:
            self.root = Path(self.git("rev-parse", "--show-toplevel").decode().strip())
        except BlockmergeError:
            raise BlockmergeError("not inside a git repository", path=self.directory) from None
        self.git_dir = Path(self.git("rev-parse", "--absolute-git-dir").decode().strip())
        common = Path(self.git("rev-parse", "--git-common-dir").decode().strip())
        storage = self.config("lfs.storage")
        base = common if common.is_absolute() else self.root / common
        self.lfs_dir = (base / storage if storage else base / "lfs").resolve()

    def git(self, *args: str, input: bytes | None = None, env: dict[str, str] | None = None,
            check: bool = True) -> bytes:
        """Run git in the repository; its stdout. A failure raises a one-line BlockmergeError."""
        result = subprocess.run(["git", *args], cwd=self.directory, input=input, capture_output=True,
                                env={**os.environ, **(env or {})})
        if check and result.returncode != 0:
            lines = result.stderr.decode(errors="replace").strip().splitlines()
            detail = next((line for line in lines if line.startswith(("fatal", "error"))), lines[-1] if lines else "")
            raise BlockmergeError(f"git {args[0]} failed ({detail.strip()})", path=self.directory)
        return result.stdout

    def succeeds(self, *args: str) -> bool:
        """Whether a git command exits with status 0 (for commands that answer by it)."""
        return subprocess.run(["git", *args], cwd=self.directory, capture_output=True).returncode == 0

    def config(self, key: str) -> str | None:
        out = self.git("config", "--get", key, check=False).decode().strip()
        return out or None

    def config_section(self, prefix: str) -> dict[str, str]:
        """Every `prefix.NAME value` of the git config, by NAME (last one wins)."""
        out = self.git("config", "--null", "--get-regexp", f"^{prefix}\\.", check=False).decode()
        values = {}
        for item in filter(None, out.split("\0")):
            key, _, value = item.partition("\n")
            values[key[len(prefix) + 1:]] = value
        return values

    def commit_of(self, rev: str) -> str:
        """The commit a revision names."""
        out = self.git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False).decode().strip()
        if not out:
            raise BlockmergeError(f"unknown revision {rev!r}", path=self.root)
        return out

    def blob_of(self, commit: str, path: str) -> str | None:
        """The blob id of `path` (relative to the work tree root) at a commit, or None if it has none."""
        out = self.git("rev-parse", "--verify", "--quiet", f"{commit}:{path}", check=False).decode().strip()
        return out or None

    def blob(self, blob: str) -> bytes:
        return self.git("cat-file", "blob", blob)

    def relative(self, path: str | os.PathLike) -> str:
        """`path` (relative to the current directory) relative to the work tree root."""
        absolute = (Path.cwd() / path).resolve()
        try:
            return absolute.relative_to(self.root.resolve()).as_posix()
        except ValueError:
            raise BlockmergeError(f"outside the repository {self.root}", path=path) from None

    def lfs_path(self, oid: str) -> Path:
        return self.lfs_dir / "objects" / oid[:2] / oid[2:4] / oid

    def read_lfs(self, oid: str, size: int, label: str, param: str) -> bytes:
        """The verified bytes of an LFS object: local, else fetched through `git lfs smudge`."""
        path = self.lfs_path(oid)
        if path.is_file():
            data = path.read_bytes()
            where = str(path)
        else:
            pointer = f"version {LFS_VERSION}\noid sha256:{oid}\nsize {size}\n".encode()
            data = self.git("lfs", "smudge", input=pointer, env={"GIT_TERMINAL_PROMPT": "0"}, check=False)
            where = None
            if hashlib.sha256(data).hexdigest() != oid:
                raise BlockmergeError(f"Git LFS object {oid} is missing (not in {self.lfs_dir / 'objects'} and "
                                      "not fetchable; run `git lfs fetch`)", path=label, param=param)
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise BlockmergeError(f"Git LFS object {oid} is corrupt ({where}: {len(data)} bytes, sha256 does not "
                                  "match its pointer)", path=label, param=param)
        return data

    def write_lfs(self, data: bytes) -> tuple[str, int]:
        """Store bytes as a local LFS object (atomically, once); their (oid, size)."""
        oid = hashlib.sha256(data).hexdigest()
        path = self.lfs_path(oid)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return oid, len(data)
