"""A merge whose reduction passes are all tensor-local runs tensor by tensor (each tensor's passes, then its merge):
it gives the bytes of passes over the whole model before the merge, and a resume keeps a tensor's merged blocks
only where its passes read the same bytes as before. Real files and processes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_resume import cli, killed_after, merge_args, rewrite_keeping_size_and_time, same_tensors

import blockmerge
from blockmerge.engine import run
from blockmerge.plugins import registry

# Methods with passes, at hyperparameters that make every pass local (a pass per tensor, not over the model).
SETTINGS = {"ties": {"trim": "block", "majority_sign": "block"}}


def local_methods() -> list[str]:
    """Registered methods needing no statistics whose passes, at SETTINGS or the defaults, are all local."""
    found = []
    for name, method in sorted(registry().items()):
        hp = method.hyperparameters(**SETTINGS.get(name, {}))
        needs = method.needs(hp)
        passes = method.passes(hp, frozenset())
        if passes and all(p.local for p in passes) and not (needs.statistics or needs.one_of_statistics):
            found.append(name)
    return found


def models_for(name: str, paths: list) -> list:
    least, most = registry()[name].model_count
    return paths[:most] if most is not None else paths


def test_the_local_methods_include_the_per_tensor_mergekit_ones():
    assert {"slerp", "nuslerp", "model_stock", "karcher", "multislerp", "arcee_fusion", "sce", "ties",
            "breadcrumbs"} <= set(local_methods())


@pytest.mark.parametrize("name", local_methods())
def test_tensor_by_tensor_gives_the_bytes_of_whole_model_passes(name, family, tmp_path, monkeypatch):
    _, _, base_path, model_paths = family
    models = models_for(name, model_paths)
    settings = {**SETTINGS.get(name, {}), "block_size": "512"}
    fused = blockmerge.merge(name, models, base=base_path, out=tmp_path / "fused.safetensors", **settings)
    monkeypatch.setattr(run, "passes_are_local", lambda engine: False)
    whole = blockmerge.merge(name, models, base=base_path, out=tmp_path / "whole.safetensors", **settings)
    assert fused.passes == whole.passes > 1
    assert same_tensors(load_file(tmp_path / "fused.safetensors"), load_file(tmp_path / "whole.safetensors"))


def tensor_passes(out) -> dict[str, dict]:
    path = out.parent / f".{out.name}.blockmerge-partial" / "journal.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return {e["tensor_passes"]: e["passes"] for e in entries if "tensor_passes" in e}


def test_a_resume_merges_again_only_the_tensors_whose_passes_read_other_bytes(family, tmp_path):
    base, models, base_path, model_paths = family
    out = tmp_path / "out.safetensors"
    done = {e["name"] for e in killed_after(3, "model_stock", base_path, model_paths, out)}
    journaled = tensor_passes(out)
    assert done and done <= journaled.keys()
    changed = next(n for n in sorted(done) if base[n].is_floating_point() and base[n].dim())
    rewritten = dict(models[0])
    rewritten[changed] = rewritten[changed] + 1.0
    rewrite_keeping_size_and_time(model_paths[0], rewritten)

    result = cli(*merge_args("model_stock", base_path, model_paths, out), "--resume")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and str(model_paths[0]) in lines[0] and "changed" in lines[0], lines
    fresh = tmp_path / "fresh.safetensors"
    assert cli(*merge_args("model_stock", base_path, model_paths, fresh)).returncode == 0
    assert same_tensors(load_file(out), load_file(fresh))


def test_a_tensor_cut_short_by_an_interruption_resumes_from_its_next_block(tmp_path):
    from conftest import make_family, write_family

    base, models = make_family(shapes={"a.weight": (64, 16), "b.weight": (48, 16)})
    base_path, model_paths = write_family(tmp_path, base, models)
    out = tmp_path / "out.safetensors"
    done = killed_after(2, "slerp", base_path, model_paths[:2], out)
    assert [e["name"] for e in done] == ["a.weight", "a.weight"]  # a.weight is 4+ blocks of 512 bytes × 3 inputs
    result = cli(*merge_args("slerp", base_path, model_paths[:2], out), "--resume")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert same_tensors(load_file(out), blockmerge.merge("slerp", model_paths[:2], base=base_path))
    assert not torch.equal(load_file(out)["a.weight"], base["a.weight"])
