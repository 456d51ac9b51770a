"""Set a repository up for blockmerge and git-theta: `python3 -m blockmerge.gittheta install [--repo DIR]`.

Writes the repository's own git config (nothing global): git-theta's `theta` filter through
`blockmerge.gittheta.filter` (format from the file name, half precision bit-exact), the `theta` merge driver
through `blockmerge.gittheta.driver` (configured methods merge without a prompt), git-theta's diff, and a
prepare-commit-msg hook that writes the merge method and its inputs into merge commits. Needs `git lfs`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..errors import BlockmergeError
from .repo import Repo

HOOK = """#!/bin/sh
# blockmerge: record how git-theta checkpoints were merged in the merge commit's message
[ "$2" = merge ] || exit 0
theirs=$(git rev-parse -q --verify MERGE_HEAD) || exit 0
notes=$(git rev-parse --git-path "blockmerge/notes/$(git rev-parse HEAD)-$theirs")
[ -d "$notes" ] || exit 0
printf '\\n\\n' >> "$1"
cat "$notes"/* >> "$1"
rm -rf "$notes"
"""
HOOK_MARK = "# blockmerge:"
FILTER = Path(__file__).resolve().with_name("filter.py")


def install(directory: str = ".") -> Repo:
    """Configure the repository holding `directory`; returns it."""
    repo = Repo(directory)
    if not repo.git("lfs", "version", check=False).startswith(b"git-lfs/"):
        raise BlockmergeError("git-lfs is not installed (git-theta stores parameters as Git LFS objects)")
    python = shlex.quote(sys.executable)
    filter_script = shlex.quote(str(FILTER))
    settings = {
        "filter.theta.clean": f"{python} {filter_script} clean %f",
        "filter.theta.smudge": f"{python} {filter_script} smudge %f",
        "filter.theta.required": "true",
        "merge.theta.name": "Merge models with blockmerge and git-theta",
        "merge.theta.driver": f"{python} -m blockmerge.gittheta.driver %O %A %B %P",
        "diff.theta.command": "git-theta-diff",
    }
    for key, value in settings.items():
        repo.git("config", "--local", key, value)
    hooks = repo.git_dir / "hooks"
    hooks.mkdir(exist_ok=True)
    hook = hooks / "prepare-commit-msg"
    if hook.exists() and HOOK_MARK not in hook.read_text(errors="replace"):
        raise BlockmergeError("a prepare-commit-msg hook exists already; add blockmerge's lines to it by hand:\n"
                              + HOOK, path=hook)
    hook.write_text(HOOK)
    hook.chmod(0o755)
    return repo


def is_installed(repo: Repo) -> bool:
    """Whether the repository's filter is blockmerge's (needed to check out what blockmerge commits)."""
    return str(FILTER) in (repo.config("filter.theta.smudge") or "")
