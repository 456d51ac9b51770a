"""A three-way merge of one tracked checkpoint with a blockmerge method, as `git merge` needs it.

The two sides are the models (ours first) and the merge base is the pretrained `base` where the method
needs one. Statistics are looked up by the naming rule of `revision.statistics_path` at the revision of
each side (and of the merge base for base statistics). The merge streams through the engine into a
temporary file, which is then stored parameter by parameter as LFS objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import api
from ..engine.digest import hexdigest
from ..engine.safetensors_io import SafetensorsFile
from ..errors import BlockmergeError
from ..plugins import get, parse_hyperparameters
from .filter import check_checkpoint_type
from .repo import Repo
from .revision import RevisionCheckpoint, TrackedCheckpoint, statistics_path
from .writer import track_safetensors

NOTHING_READ = hexdigest(b"")


@dataclass(frozen=True)
class Side:
    """One version of the checkpoint: its metadata file's bytes and the commit it comes from."""

    role: str  # ours, theirs, base
    data: bytes
    commit: str
    label: str


def lookup_statistics(repo: Repo, side: Side, path: str, kinds: list[str], required: set[str]):
    """{kind: checkpoint} of the statistics files next to `path` at the side's commit."""
    found = {}
    for kind in kinds:
        stat_path = statistics_path(path, kind)
        if repo.blob_of(side.commit, stat_path) is not None:
            found[kind] = RevisionCheckpoint(repo, side.commit, stat_path)
        elif kind in required:
            raise BlockmergeError(f"no {stat_path} at {side.commit[:12]} ({side.role}); the method reads "
                                  f"{kind!r} statistics of each model", path=side.label)
    return found


def merge_sides(repo: Repo, path: str, ours: Side, theirs: Side, base: Side, method: str,
                hyperparameters: dict[str, str]) -> tuple[bytes, dict]:
    """The merged metadata file of `path` and the merge's provenance."""
    spec = get(method)
    hp, _ = parse_hyperparameters(spec, hyperparameters)
    needs = spec.needs(hp)
    models = [TrackedCheckpoint(repo, side.data, side.label, path) for side in (ours, theirs)]
    kinds = [*needs.statistics, *needs.optional_statistics, *needs.one_of_statistics]
    stats = [lookup_statistics(repo, side, path, kinds, set(needs.statistics)) for side in (ours, theirs)]
    base_stats = lookup_statistics(repo, base, path, list(needs.base_statistics), set(needs.base_statistics))
    work = repo.git_dir / "blockmerge"
    work.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=work, prefix="merge-"))
    try:
        out = tmp / "merged.safetensors"
        api.merge(method, models, base=TrackedCheckpoint(repo, base.data, base.label, path) if needs.base else None,
                  stats=stats if any(stats) else None, base_stats=base_stats or None, out=out,
                  **hyperparameters)
        keys_of = {name: e.keys[:-1] if e.dtype != e.stored_dtype else e.keys for name, e in
                   models[0].entries.items()}
        merged = track_safetensors(repo, out, ours.commit, keys_of)
        provenance = read_header(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return merged, provenance


def read_header(path: Path) -> dict:
    """The provenance the engine wrote into a merged safetensors file's header."""
    source = SafetensorsFile(path)
    try:
        return json.loads(source.metadata.get("blockmerge", "{}"))
    finally:
        source.close()


def trailers(path: str, provenance: dict, revisions: list[tuple[str, str, str]]) -> str:
    """Commit message trailers recording a merge: method, hyperparameters, inputs (revision, commit, content hash)."""
    lines = [f"Blockmerge-Checkpoint: {path}", f"Blockmerge-Method: {provenance['method']}",
             "Blockmerge-Hyperparameters: " + json.dumps({**provenance["hyperparameters"], **provenance["common"]},
                                                         sort_keys=True, separators=(",", ":"))]
    for (role, rev, commit), item in zip(revisions, provenance["inputs"]):
        digest = item["blake3_of_tensors_read"]
        read = f"tensors-blake3:{digest}" if digest != NOTHING_READ else "(not read by the method)"
        lines.append(f"Blockmerge-Input: {role} {rev} {commit} {read}")
    for index, stats in enumerate(provenance.get("statistics", [])):
        for kind, label in sorted(stats.items()):
            lines.append(f"Blockmerge-Statistics: model {index} {kind} {label}")
    for kind, label in sorted(provenance.get("base_statistics", {}).items()):
        lines.append(f"Blockmerge-Statistics: base {kind} {label}")
    lines.append(f"Blockmerge-Output-Blake3: {provenance['output_blake3']}")
    return "\n".join(lines) + "\n"


def environment_commit(repo: Repo) -> tuple[str, str]:
    """(name, commit) of the other side of a running `git merge`, from the GITHEAD_<sha> variable git sets."""
    for key, value in os.environ.items():
        if key.startswith("GITHEAD_"):
            return value, repo.commit_of(key[len("GITHEAD_"):])
    merge_head = repo.git("rev-parse", "-q", "--verify", "MERGE_HEAD", check=False).decode().strip()
    if not merge_head:
        raise BlockmergeError("cannot tell which commit is being merged (no GITHEAD_* variable, no MERGE_HEAD)")
    return merge_head[:12], merge_head


NOTES = "blockmerge/notes"  # NOTES/<ours>-<theirs>/<sha1 of the path>: one merged checkpoint's trailers


def merge_in_progress(repo: Repo, path: str, ancestor: bytes, current: bytes, other: bytes, method: str,
                      hyperparameters: dict[str, str]) -> bytes:
    """Merge the versions of `path` of the `git merge` under way; the merged metadata file.

    The method, hyperparameters and inputs are left as trailers for the merge commit's message.
    """
    check_checkpoint_type(path)
    ours = repo.commit_of("HEAD")
    other_name, theirs = environment_commit(repo)
    bases = repo.git("merge-base", "--all", ours, theirs).decode().split()
    base = bases[0] if bases else ours
    sides = [Side("ours", current, ours, f"HEAD:{path}"), Side("theirs", other, theirs, f"{other_name}:{path}"),
             Side("base", ancestor, base, f"{base[:12]}:{path}")]
    merged, provenance = merge_sides(repo, path, *sides, method, hyperparameters)
    revisions = [(s.role, s.label.rsplit(":", 1)[0], s.commit) for s in sides][:len(provenance["inputs"])]
    notes = repo.git_dir / NOTES / f"{ours}-{theirs}"
    notes.mkdir(parents=True, exist_ok=True)
    (notes / hashlib.sha1(path.encode()).hexdigest()).write_text(trailers(path, provenance, revisions))
    return merged
