"""The `trimmed` statistic: global top-K task vectors, stored, and read back by TIES."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_family
from safetensors.torch import save_file
from test_methods import FLOATS, quantised_family

import blockmerge
from blockmerge import BlockmergeError
from blockmerge.engine.sources import StoreCheckpoint
from blockmerge.stats.trimmed import trimmed


def test_trimmed_keeps_int_d_k_plus_one_and_ties_over_the_whole_model(tmp_path):
    base, models = quantised_family(2, seed=4)
    base_path, model_paths = write_family(tmp_path, base, models)
    trimmed(model_paths[0], base_path, tmp_path / "t0", density=0.3, block_size=256)
    ckpt = StoreCheckpoint(tmp_path / "t0", "trimmed")
    assert set(ckpt.specs) == set(FLOATS)
    flat = np.concatenate([(models[0][n] - base[n]).numpy().ravel() for n in FLOATS])
    d = flat.size
    thr = np.sort(np.abs(flat))[d - int(d * 0.3) - 1]
    for n in FLOATS:
        tau = (models[0][n] - base[n]).numpy()
        got = ckpt.read(n, 0, ckpt.specs[n].rows).numpy()
        assert ckpt.specs[n].dtype == "float32"
        np.testing.assert_array_equal(got, np.where(np.abs(tau) >= thr, tau, 0.0).astype(np.float32))
    kept = sum(int(np.count_nonzero(ckpt.read(n, 0, ckpt.specs[n].rows).numpy())) for n in FLOATS)
    assert kept >= int(d * 0.3) + 1 - int(np.count_nonzero(flat == 0))
    manifest = json.loads((tmp_path / "t0" / "blockmerge.json").read_text())
    assert manifest["metadata"]["statistics"]["density"] == 0.3
    assert {t["kind"] for t in manifest["tensors"]} == {"trimmed"}


def test_stored_trimmed_statistics_reproduce_global_ties(tmp_path):
    base, models = quantised_family(3, seed=6)
    base_path, model_paths = write_family(tmp_path, base, models)
    stats = []
    for i, p in enumerate(model_paths):
        trimmed(p, base_path, tmp_path / f"t{i}", density=0.25)
        stats.append(tmp_path / f"t{i}")
    from_stats = blockmerge.merge("ties", model_paths, base=base_path, stats=stats, scaling_factor=0.7)
    direct = blockmerge.merge("ties", model_paths, base=base_path, density=0.25, scaling_factor=0.7)
    for n in direct:
        assert torch.equal(from_stats[n], direct[n]), n


def test_trimmed_refuses_a_mismatched_base_and_a_bad_density(tmp_path):
    base, models = quantised_family(1, seed=1)
    base_path, model_paths = write_family(tmp_path, base, models)
    other = {n: t[:1] if t.dim() else t for n, t in base.items()}
    save_file(other, tmp_path / "other.safetensors")
    with pytest.raises(BlockmergeError, match="do not match"):
        trimmed(model_paths[0], tmp_path / "other.safetensors", tmp_path / "t")
    with pytest.raises(BlockmergeError, match="density"):
        trimmed(model_paths[0], base_path, tmp_path / "t", density=0.0)
    assert not (tmp_path / "t").exists()


def test_stats_trimmed_command_feeds_ties(tmp_path):
    from click.testing import CliRunner

    from blockmerge.cli import main

    base, models = quantised_family(2, seed=8)
    base_path, model_paths = write_family(tmp_path, base, models)
    for i, p in enumerate(model_paths):
        result = CliRunner().invoke(main, ["stats", "trimmed", "--model", str(p), "--base", str(base_path),
                                           "--density", "0.4", "--out", str(tmp_path / f"t{i}")])
        assert result.exit_code == 0, result.output
    merged = CliRunner().invoke(main, ["merge", "-q", "--method", "ties", "--base", str(base_path),
                                       *sum((["--model", str(p)] for p in model_paths), []),
                                       "--stats", f"0={tmp_path / 't0'}", "--stats", f"1={tmp_path / 't1'}",
                                       "--out", str(tmp_path / "m.safetensors")])
    assert merged.exit_code == 0, merged.output
    from safetensors.torch import load_file
    got, direct = load_file(tmp_path / "m.safetensors"), blockmerge.merge("ties", models, base=base, density=0.4)
    assert all(torch.equal(got[n], direct[n]) for n in direct)
