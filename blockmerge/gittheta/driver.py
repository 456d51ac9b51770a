"""The merge driver for git-theta tracked checkpoints: `python3 -m blockmerge.gittheta.driver %O %A %B %P`.

With a method configured (`config.merge_settings`) it merges the whole checkpoint with it and writes the
merged metadata to %A; the prepare-commit-msg hook of `install` puts the method, hyperparameters and inputs
into the merge commit's message. Without one it hands over to git-theta's interactive merge tool, whose menu
lists blockmerge's methods. A statistics file (`fisher.safetensors`, ... next to a checkpoint) keeps our
version: statistics of a merged model have to be computed again. A failed merge leaves %A as it was and
exits non-zero: git reports a conflict and `git merge --abort` restores the repository.
"""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

from ..engine import memory
from ..engine.kinds import STATISTIC_KINDS
from ..errors import BlockmergeError
from .config import merge_settings
from .repo import Repo
from .threeway import merge_in_progress

STATISTIC_FILES = {f"{kind}.safetensors" for kind in STATISTIC_KINDS}


def run(ancestor: str, current: str, other: str, path: str) -> int:
    repo = Repo(".")
    method, hyperparameters = merge_settings(repo)
    if method is None:
        from git_theta import merges
        from git_theta.scripts import git_theta_merge

        from .merges import menu

        merges.all_merge_handlers = menu  # the menu git_theta_merge shows: git-theta's plugins and blockmerge's
        sys.argv = ["git-theta-merge", ancestor, current, other, path]
        return git_theta_merge.main() or 0
    if PurePosixPath(path).name in STATISTIC_FILES:
        print(f"blockmerge: kept our {path} (statistics of the merged model must be computed again)",
              file=sys.stderr)
        return 0
    merged = merge_in_progress(repo, path, Path(ancestor).read_bytes(), Path(current).read_bytes(),
                               Path(other).read_bytes(), method, hyperparameters)
    Path(current).write_bytes(merged)
    print(f"blockmerge: merged {path} with {method}", file=sys.stderr)
    return 0


def main() -> None:
    if len(sys.argv) != 5:
        sys.exit("usage: python3 -m blockmerge.gittheta.driver %O %A %B %P")
    memory.return_freed_blocks_to_the_os()  # git starts the driver as a process of its own, like the command
    try:
        sys.exit(run(*sys.argv[1:]))
    except BlockmergeError as err:
        print(f"blockmerge: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
