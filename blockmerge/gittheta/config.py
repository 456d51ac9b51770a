"""The merge method and hyperparameters `git merge` uses, from the environment or git config, never a prompt.

    git config blockmerge.method ties                  BLOCKMERGE_METHOD=ties
    git config blockmerge.set.scaling-factor 0.3       BLOCKMERGE_SET_SCALING_FACTOR=0.3

git config names allow letters, digits and '-' only, so hyperparameters are spelled with dashes there and
with underscores in the environment; both mean the canonical name (`scaling_factor`). The environment wins.
"""

from __future__ import annotations

import os

from .repo import Repo

ENV_METHOD = "BLOCKMERGE_METHOD"
ENV_SET = "BLOCKMERGE_SET_"


def merge_settings(repo: Repo) -> tuple[str | None, dict[str, str]]:
    """(method or None when none is configured, hyperparameters by canonical name)."""
    method = os.environ.get(ENV_METHOD) or repo.config("blockmerge.method")
    hyperparameters = {name.replace("-", "_").lower(): value
                       for name, value in repo.config_section("blockmerge.set").items()}
    hyperparameters.update({key[len(ENV_SET):].lower(): value for key, value in os.environ.items()
                            if key.startswith(ENV_SET) and len(key) > len(ENV_SET)})
    return method or None, hyperparameters
