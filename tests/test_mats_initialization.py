"""MaTS from a starting checkpoint: a file, a store or a mapping, read block by block; SciPy CG from that start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import blake3
import numpy as np
import pytest
import torch
from conftest import write_family
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_mats import FLOATS, LINEARS, VECTOR, family, np_, scipy_cg, statistics, system

import blockmerge
from blockmerge.api import convert
from blockmerge.errors import BlockmergeError
from blockmerge.stats.store import write_statistics


def start_point(models: list[dict], seed: int) -> dict:
    """A start that no built-in initialization gives: the mean plus noise."""
    g = torch.Generator().manual_seed(seed)
    return {n: sum(m[n] for m in models) / len(models) + 0.1 * torch.randn(models[0][n].shape, generator=g)
            for n in FLOATS}


def from_start(objective: str, name: str, models: list[dict], stats: list[dict], start: dict,
               num_iterations: int) -> np.ndarray:
    a, b, to_vector, from_vector = system(objective, name, models, stats, 1.0)
    x0 = to_vector(np_(start[name]))
    x = scipy_cg(a, b, x0, num_iterations)[0]
    if objective == "diagonal_fisher":
        x = np.where(np.diag(a) == 0, x0, x)
    return from_vector(x).reshape(start[name].shape)


@pytest.mark.parametrize("objective", ["diagonal_fisher", "blockwise_fisher"])
def test_a_start_checkpoint_gives_scipy_cg_from_that_start(objective, tmp_path):
    base, models = family(seed=40)
    stats = statistics(models, seed=41)
    start = start_point(models, seed=42)
    save_file({n: t.contiguous() for n, t in start.items()}, tmp_path / "start.safetensors")
    kinds = ("fisher",) if objective == "diagonal_fisher" else ("gram_in", "gram_out", "blockwise_fisher")
    options = dict(stats=[{k: s[k] for k in kinds} for s in stats], objective=objective, num_iterations=4,
                   solve_dtype="float64", compute_dtype="float64", dtype="float64")
    merged = blockmerge.merge("mats", models, initialization=str(tmp_path / "start.safetensors"), **options)
    names = FLOATS if objective == "diagonal_fisher" else [*LINEARS, VECTOR]
    for n in names:
        np.testing.assert_allclose(np_(merged[n]), from_start(objective, n, models, stats, start, 4),
                                   rtol=1e-9, atol=1e-12, err_msg=n)
    from_mapping = blockmerge.merge("mats", models, initialization=start, **options)
    convert(tmp_path / "start.safetensors", tmp_path / "start-store")
    from_store = blockmerge.merge("mats", models, initialization=str(tmp_path / "start-store"), **options)
    for n in merged:
        assert torch.equal(from_mapping[n], merged[n]) and torch.equal(from_store[n], merged[n]), n
    from_base = blockmerge.merge("mats", models, base=base, initialization="base", **options)
    base_file = blockmerge.merge("mats", models, base=base, initialization=base, **options)
    assert all(torch.equal(from_base[n], base_file[n]) for n in from_base)  # the base as a checkpoint = `base`


def test_the_command_line_reads_the_start_and_records_it_in_the_provenance(tmp_path):
    base, models = family(seed=50)
    stats = statistics(models, seed=51)
    start = start_point(models, seed=52)
    save_file({n: t.contiguous() for n, t in start.items()}, tmp_path / "start.safetensors")
    base_path, model_paths = write_family(tmp_path, base, models)
    args = [sys.executable, "-m", "blockmerge", "merge", "-q", "--method", "mats", "--set", "objective=diagonal_fisher",
            "--set", "num_iterations=3", "--set", f"initialization={tmp_path / 'start.safetensors'}"]
    for i, (path, s) in enumerate(zip(model_paths, stats)):
        store = write_statistics({"fisher": s["fisher"]}, tmp_path / f"s{i}", {})
        args += ["--model", str(path), "--stats", f"{i}={store}"]
    out = tmp_path / "merged.safetensors"
    run = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode == 0, run.stderr
    expected = blockmerge.merge("mats", model_paths, stats=[{"fisher": s["fisher"]} for s in stats],
                                objective="diagonal_fisher", num_iterations=3,
                                initialization=str(tmp_path / "start.safetensors"))
    got = load_file(out)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    with safe_open(out, "pt") as f:
        provenance = json.loads(f.metadata()["blockmerge"])
    entry = next(e for e in provenance["inputs"] if e["role"] == "initialization")
    assert entry["path"] == str(tmp_path / "start.safetensors")
    tensors = load_file(tmp_path / "start.safetensors")
    read = [f"{n}:{blake3.blake3(tensors[n].numpy().tobytes()).hexdigest()}" for n in sorted(FLOATS)]
    assert entry["blake3_of_tensors_read"] == blake3.blake3("\n".join(read).encode()).hexdigest()
    assert provenance["hyperparameters"]["initialization"] == str(tmp_path / "start.safetensors")


def test_a_bad_start_is_one_error_naming_it_before_any_merge(tmp_path):
    base, models = family(seed=60)
    stats = [{"fisher": s["fisher"]} for s in statistics(models, seed=61)]
    options = dict(stats=stats, objective="diagonal_fisher", out=tmp_path / "out.safetensors")
    with pytest.raises(BlockmergeError, match="mats: hyperparameter initialization: .*missing.safetensors"):
        blockmerge.merge("mats", models, initialization=str(tmp_path / "missing.safetensors"), **options)
    short = start_point(models, seed=62)
    del short["layer.0.norm"]
    with pytest.raises(BlockmergeError, match="parameter 'layer.0.norm'.*the initialization checkpoint of mats"):
        blockmerge.merge("mats", models, initialization=short, **options)
    wrong = {**start_point(models, seed=63), "layer.0.norm": torch.zeros(7)}
    with pytest.raises(BlockmergeError, match="does not match"):
        blockmerge.merge("mats", models, initialization=wrong, **options)
    assert not (tmp_path / "out.safetensors").exists()


def test_the_dask_executor_reads_the_start_as_the_local_one_does(cluster, tmp_path):
    base, models = family(seed=70)
    stats = statistics(models, seed=71)
    save_file({n: t.contiguous() for n, t in start_point(models, seed=72).items()}, tmp_path / "start.safetensors")
    base_path, model_paths = write_family(tmp_path, base, models)
    stat_paths = []
    for i, s in enumerate(stats):
        save_file(s["fisher"], tmp_path / f"fisher{i}.safetensors")
        stat_paths.append({"fisher": str(tmp_path / f"fisher{i}.safetensors")})
    options = dict(stats=stat_paths, objective="diagonal_fisher", num_iterations=3,
                   initialization=str(tmp_path / "start.safetensors"))
    blockmerge.merge("mats", model_paths, out=tmp_path / "local.safetensors", **options)
    blockmerge.merge("mats", model_paths, out=tmp_path / "dask.safetensors", executor="dask",
                     scheduler=cluster[0].scheduler_address, **options)
    local, remote = load_file(tmp_path / "local.safetensors"), load_file(tmp_path / "dask.safetensors")
    assert all(torch.equal(local[n], remote[n]) for n in local)
