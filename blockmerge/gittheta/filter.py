"""git-theta's clean/smudge filter as blockmerge configures it: `python3 .../filter.py clean|smudge %f`.

- The checkpoint format follows the file: `.safetensors` uses the `blockmerge-safetensors` plugin and
  `.pt`/`.pth`/`.bin` `blockmerge-pytorch` (both bit-exact for float16 and bfloat16, and what blockmerge's
  merges write back), whatever `GIT_THETA_CHECKPOINT_TYPE` says: git-theta's documentation has users
  export it for the whole shell, and no other plugin reads these files as blockmerge records them.
  Other files follow `GIT_THETA_CHECKPOINT_TYPE` (git-theta's `safetensors` and `pytorch` replaced by
  blockmerge's); blockmerge merges only files of its own two plugins (`check_checkpoint_type`).
- Parameters are hashed by `parameters.NumpyLSH`: git-theta's own signatures without its JIT compilation.
- A file in a subdirectory is compared with its previous version (git-theta 0.2.0 looks only at the top
  of the tree and so rewrites every parameter of such a file, changing its metadata on every clean).

git runs the filter once per file for every add, checkout and status: it imports nothing of the merge engine.
"""

from __future__ import annotations

import os
import sys

ENV = "GIT_THETA_CHECKPOINT_TYPE"
TYPES = {".safetensors": "blockmerge-safetensors", ".pt": "blockmerge-pytorch", ".pth": "blockmerge-pytorch",
         ".bin": "blockmerge-pytorch"}
STAND_INS = {"safetensors": "blockmerge-safetensors", "pytorch": "blockmerge-pytorch"}


def checkpoint_type(path: str, configured: str | None) -> str | None:
    """The checkpoint plugin for `path` under GIT_THETA_CHECKPOINT_TYPE=`configured` (None: git-theta's default)."""
    by_extension = next((kind for suffix, kind in TYPES.items() if path.endswith(suffix)), None)
    return by_extension or STAND_INS.get(configured or "", configured or None)


def check_checkpoint_type(path: str) -> None:
    """Raise BlockmergeError unless `path` is read by one of blockmerge's checkpoint plugins."""
    kind = checkpoint_type(path, os.environ.get(ENV))
    if kind not in (None, *STAND_INS.values()):
        from ..errors import BlockmergeError

        raise BlockmergeError(f"{ENV}={kind}: blockmerge merges safetensors and PyTorch checkpoints only", path=path)


def foreign_type_note() -> str | None:
    """What GIT_THETA_CHECKPOINT_TYPE means under blockmerge's filter, when it names a plugin of another format."""
    configured = os.environ.get(ENV)
    if not configured or configured in STAND_INS or configured in STAND_INS.values():
        return None
    return (f"{ENV}={configured} applies only to files that are not .safetensors, .pt, .pth or .bin, and "
            "blockmerge does not merge those")


def file_version(repo, path: str, commit_hash: str):
    """git-theta's `git_utils.get_file_version` for files at any depth: the blob of `path` at a commit, or None."""
    import git
    from git_theta import git_utils

    try:
        return repo.commit(commit_hash).tree / git_utils.get_relative_path_from_root(repo, path)
    except (KeyError, ValueError, git.BadName):
        return None


def main() -> None:
    kind = checkpoint_type(sys.argv[-1], os.environ.get(ENV))
    if kind:
        os.environ[ENV] = kind
    from git_theta import git_utils, lsh
    from git_theta.scripts import git_theta_filter

    from blockmerge.gittheta.parameters import NumpyLSH

    lsh.get_lsh = NumpyLSH
    git_utils.get_file_version = file_version
    sys.argv[0] = "git-theta-filter"
    git_theta_filter.main()


if __name__ == "__main__":
    main()
