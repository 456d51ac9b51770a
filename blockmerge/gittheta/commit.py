"""`blockmerge merge ... --out PATH --commit`: the merge committed to a git-theta repository with its provenance.

The engine streams the merge into a temporary file under the git directory; its parameters become LFS
objects and a git-theta metadata file, which is committed at PATH with the method, hyperparameters, input
revisions (with commits and content hashes) and statistics as trailers of the message. Only then does the
merged file replace PATH in the work tree. Anything that fails before the commit leaves the repository as
it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import api
from ..engine.adapters import open_model
from ..engine.job import Summary
from ..engine.sources import open_checkpoint, open_statistics
from ..errors import BlockmergeError
from .install import is_installed
from .repo import Repo
from .revision import RevisionCheckpoint
from .threeway import read_header, trailers
from .writer import track_safetensors


def committing(message: str | None) -> Callable[..., Summary]:
    """`api.merge` that commits its output to the git-theta repository instead of only writing it."""
    def run(method: str, models: list, base: Any = None, stats: list | None = None, base_stats: Any = None,
            out: str | os.PathLike | None = None, *, repo: str | os.PathLike | None = None, resume: bool = False,
            overwrite: bool = False, **options: Any) -> Summary:
        return merge_and_commit(method, models, base, stats, base_stats, out, message=message, repo=repo,
                                **options)
    return run


def _check_target(git: Repo, out: str | os.PathLike | None) -> str:
    if out is None or not str(out).endswith(".safetensors"):
        raise BlockmergeError("--commit writes a .safetensors file tracked with git-theta: pass --out FILE.safetensors")
    if not is_installed(git):
        raise BlockmergeError("the repository is not set up for blockmerge (run `python3 -m blockmerge.gittheta "
                              "install`)", path=git.root)
    path = git.relative(out)
    attribute = git.git("check-attr", "filter", "--", path).decode().strip()
    if not attribute.endswith(": theta"):
        raise BlockmergeError("not tracked with git-theta (run `git theta track` on it and commit .gitattributes)",
                              path=path)
    if not git.succeeds("diff", "--cached", "--quiet"):
        raise BlockmergeError("the index has staged changes; commit or unstage them first", path=git.root)
    if (git.root / path).exists() and not git.succeeds("diff", "--quiet", "--", path):
        raise BlockmergeError("has uncommitted changes that the merge would replace", path=path)
    return path


def merge_and_commit(method: str, models: list, base: Any, stats: list | None, base_stats: Any,
                     out: str | os.PathLike | None, *, message: str | None, repo: str | os.PathLike | None = None,
                     **options: Any) -> Summary:
    """Merge (REV:PATH inputs read from the repository) and commit the result at `out`; the merge's Summary."""
    git = Repo(repo or ".")
    path = _check_target(git, out)
    opened_base = open_checkpoint(base, "base", repo=git.root) if base is not None else None
    opened = [open_model(m, f"models[{i}]", opened_base, git.root) for i, m in enumerate(models)]
    opened_stats = [open_statistics(s, f"stats[{i}]", git.root) for i, s in enumerate(stats)] if stats else None
    opened_base_stats = open_statistics(base_stats, "base_stats", git.root) if base_stats is not None else None
    head = git.commit_of("HEAD")
    work = git.git_dir / "blockmerge"
    work.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=work, prefix="commit-"))
    try:
        merged = tmp / "merged.safetensors"
        summary = api.merge(method, opened, base=opened_base, stats=opened_stats, base_stats=opened_base_stats,
                            out=merged, **options)
        blob = git.git("hash-object", "-w", "--stdin", input=track_safetensors(git, merged, head)).decode().strip()
        inputs = [("model", m) for m in opened] + ([("base", opened_base)] if opened_base is not None else [])
        revisions = [(role, c.rev, c.commit) if isinstance(c, RevisionCheckpoint) else (role, c.label, "-")
                     for role, c in inputs]
        text = (message or f"Merge with {method}").rstrip() + "\n\n" + trailers(path, read_header(merged),
                                                                                 revisions)
        git.git("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}")
        try:
            git.git("commit", "-q", "-m", text)
        except BlockmergeError:
            git.git("reset", "-q", "--", path)
            raise
        target = git.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(merged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary.output = str(git.root / path)
    return summary
