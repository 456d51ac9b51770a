"""git-theta's clean/smudge filter as blockmerge configures it: `python3 .../filter.py clean|smudge %f`.

- The checkpoint format follows the file: `.safetensors` uses the `blockmerge-safetensors` plugin and
  `.pt`/`.pth`/`.bin` `blockmerge-pytorch` (both bit-exact for float16 and bfloat16);
  `GIT_THETA_CHECKPOINT_TYPE`, when set, still wins.
- Parameters are hashed by `parameters.NumpyLSH`: git-theta's own signatures without its JIT compilation.
- A file in a subdirectory is compared with its previous version (git-theta 0.2.0 looks only at the top
  of the tree and so rewrites every parameter of such a file, changing its metadata on every clean).

git runs the filter once per file for every add, checkout and status: it imports nothing of the merge engine.
"""

from __future__ import annotations

import os
import sys

TYPES = {".safetensors": "blockmerge-safetensors", ".pt": "blockmerge-pytorch", ".pth": "blockmerge-pytorch",
         ".bin": "blockmerge-pytorch"}


def file_version(repo, path: str, commit_hash: str):
    """git-theta's `git_utils.get_file_version` for files at any depth: the blob of `path` at a commit, or None."""
    import git
    from git_theta import git_utils

    try:
        return repo.commit(commit_hash).tree / git_utils.get_relative_path_from_root(repo, path)
    except (KeyError, ValueError, git.BadName):
        return None


def main() -> None:
    path = sys.argv[-1]
    for suffix, kind in TYPES.items():
        if path.endswith(suffix):
            os.environ.setdefault("GIT_THETA_CHECKPOINT_TYPE", kind)
    from git_theta import git_utils, lsh
    from git_theta.scripts import git_theta_filter

    from blockmerge.gittheta.parameters import NumpyLSH

    lsh.get_lsh = NumpyLSH
    git_utils.get_file_version = file_version
    sys.argv[0] = "git-theta-filter"
    git_theta_filter.main()


if __name__ == "__main__":
    main()
