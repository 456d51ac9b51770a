"""Statistics stores: written atomically, read back bit-exactly by kind, checked when merged."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_family

import blockmerge
from blockmerge import BlockmergeError
from blockmerge.engine.sources import open_statistics
from blockmerge.stats.store import StatisticsWriter, model_sha256, write_statistics


def test_statistics_round_trip_by_kind(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"fisher": {"a.weight": torch.rand(4, 3, generator=g), "a.bias": torch.rand(4, generator=g)},
               "gram_in": {"a.weight": torch.rand(3, 3, generator=g)}}
    out = write_statistics(tensors, tmp_path / "s", {"examples": 5, "labels": "empirical"})
    opened = open_statistics(out, "s")
    assert set(opened) == {"fisher", "gram_in"}
    for kind, by_name in tensors.items():
        for name, t in by_name.items():
            assert torch.equal(opened[kind].read(name, 0, opened[kind].specs[name].rows), t)
    meta = json.loads((out / "blockmerge.json").read_text())["metadata"]["statistics"]
    assert meta["examples"] == 5 and meta["blockmerge"] == blockmerge.__version__


def test_a_failed_statistics_run_leaves_nothing(tmp_path):
    with pytest.raises(BlockmergeError, match="parameter 'b'.*NaN or Inf"):
        with StatisticsWriter(tmp_path / "s") as writer:
            writer.add("fisher", "a", torch.ones(3))
            writer.add("fisher", "b", torch.tensor([1.0, float("nan")]))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BlockmergeError, match="unknown statistic kind 'hessian'"):
        write_statistics({"hessian": {"a": torch.ones(1)}}, tmp_path / "s", {})
    assert list(tmp_path.iterdir()) == []


def test_model_hash_changes_with_any_parameter():
    model = torch.nn.Linear(3, 2)
    before = model_sha256(model)
    with torch.no_grad():
        model.bias[0] += 1e-3
    assert model_sha256(model) != before


def test_statistics_of_the_wrong_shape_are_refused_at_merge(tmp_path):
    base, models = make_family(2)
    stores = [write_statistics({"trimmed": {"layer.0.norm": torch.zeros(5)}}, tmp_path / f"s{i}", {})
              for i in range(2)]
    with pytest.raises(BlockmergeError, match="s0.*'layer.0.norm'.*shape \\[5\\], expected \\[16\\]"):
        blockmerge.merge("ties", models, base=base, stats=stores)
