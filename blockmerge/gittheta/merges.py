"""blockmerge's methods in git-theta's interactive merge menu: one `blockmerge-<method>` entry per registered
method (`menu`), added to git-theta's own plugins when blockmerge's merge driver opens the menu.

Choosing `blockmerge-ties` for a parameter merges the whole checkpoint once with TIES (ours and theirs as
the models, the merge base as `base`, statistics at the same revisions) and takes that parameter from the
result; later parameters given the same choice reuse it. Hyperparameters come from git config or the
environment (`config.merge_settings`), their defaults otherwise. This module imports only git-theta: the
engine is loaded when a merge runs.
"""

from __future__ import annotations

import json
import sys

from git_theta.merges import Merge
from git_theta.utils import DiffState

# A whole-checkpoint merge needs every parameter in ours, theirs and the base.
PARTIAL = frozenset({DiffState.ADDED_A, DiffState.ADDED_B, DiffState.ADDED_BOTH, DiffState.DELETED_A,
                     DiffState.DELETED_B, DiffState.DELETED_BOTH})
_merged: dict[tuple[str, str], dict] = {}  # (method, path) -> {parameter keys: merged ParamMetadata}


def _metadata_bytes(flat) -> bytes:
    from git_theta import metadata

    return json.dumps(metadata.Metadata(flat).unflatten().serialize(), cls=metadata.MetadataEncoder).encode()


def _merge(self, param_name, paramA, paramB, paramO, metadataA, metadataB, metadataO, modelA, modelB, modelO,
           path, **kwargs):
    """The parameter's value in the whole checkpoint merged with this plugin's method."""
    key = (self.METHOD, path)
    if key not in _merged:
        from git_theta import metadata

        from ..errors import BlockmergeError
        from .config import merge_settings
        from .repo import Repo
        from .threeway import merge_in_progress

        try:
            repo = Repo(".")
            _, hyperparameters = merge_settings(repo)
            merged = merge_in_progress(repo, path, _metadata_bytes(metadataO), _metadata_bytes(metadataA),
                                       _metadata_bytes(metadataB), self.METHOD, hyperparameters)
        except BlockmergeError as err:
            print(f"blockmerge: error: {err}", file=sys.stderr)
            sys.exit(2)
        _merged[key] = metadata.Metadata.from_metadata_dict(json.loads(merged)).flatten()
    return _merged[key][param_name]


def _plugin(method: str) -> type:
    return type(method.title().replace("_", ""), (Merge,), {
        "NAME": f"blockmerge-{method}",
        "DESCRIPTION": f"Merge the whole checkpoint with blockmerge's <b>{method}</b> (ours, theirs; the merge base "
                       "as base) and take this parameter from it.",
        "SHORT_CUT": f"bm-{method.replace('_', '-')}",
        "INACTIVE_STATES": PARTIAL,
        "METHOD": method,
        "merge": _merge,
        "__module__": __name__,
    })


def two_way() -> list[str]:
    """The registered methods that merge two models (ours and theirs)."""
    from ..plugins import registry

    return [name for name, method in sorted(registry().items())
            if method.model_count[0] <= 2 and (method.model_count[1] is None or method.model_count[1] >= 2)]


def menu() -> dict[str, type]:
    """git-theta's merge plugins and a `blockmerge-<method>` plugin for every registered method that merges two
    models."""
    from git_theta.merges.base import all_merge_handlers

    return {**all_merge_handlers(), **{f"blockmerge-{name}": _plugin(name) for name in two_way()}}
