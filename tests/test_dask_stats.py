"""`blockmerge stats --executor dask` against the local computation on a real two-process LocalCluster: Fisher
(empirical and sampled labels), blockwise Fisher and Gram matrices of a tiny classifier and a tiny seq2seq model,
a worker killed mid-shard, a failing shard, and schedulers that cannot be reached.

Shard sums are added in another order than the local run's: tensors agree to 1e-6 of their largest magnitude,
counts (examples, tokens) exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dask
import pytest
import torch
from click.testing import CliRunner
from distributed import get_task_stream
from hypothesis import given
from hypothesis import strategies as st
from test_stats_data import make_rows, tiny_model, tiny_tokenizer, write_jsonl

from blockmerge.cli import main
from blockmerge.engine import faults
from blockmerge.engine.cluster import SCHEDULER_ENV
from blockmerge.engine.sources import open_statistics
from blockmerge.errors import BlockmergeError
from blockmerge.stats.cluster import _bounds
from blockmerge.stats.compute import compute
from blockmerge.stats.data import TaskSpec

TIMINGS = {"seconds", "peak_rss_bytes"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    out = {}
    for kind in ("classification", "seq2seq"):
        model, tokenizer = tiny_model(kind, seed=1), tiny_tokenizer(kind)
        model.save_pretrained(root / kind)
        tokenizer.save_pretrained(root / kind)
        rows = make_rows(11, seed=2)
        out[kind] = (root / kind, TaskSpec(data=str(write_jsonl(root / f"{kind}.jsonl", rows)),
                                           target_column=None if kind == "classification" else "target"))
    return out


def read(store: Path) -> tuple[dict, dict]:
    """({kind: {name: tensor}}, metadata) of a statistics store."""
    tensors = {k: {n: c.read(n, 0, c.specs[n].rows) for n in c.specs} for k, c in open_statistics(store, "s").items()}
    return tensors, json.loads((store / "blockmerge.json").read_text())["metadata"]["statistics"]


def assert_same(local: Path, remote: Path) -> None:
    want, want_meta = read(local)
    got, got_meta = read(remote)
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}
    for kind, by_name in want.items():
        for name, t in by_name.items():
            scale = float(t.abs().max())
            torch.testing.assert_close(got[kind][name], t, rtol=1e-6, atol=1e-6 * scale, msg=f"{kind} {name}")
    assert {k: v for k, v in got_meta.items() if k not in TIMINGS} == {k: v for k, v in want_meta.items()
                                                                       if k not in TIMINGS}


def shard_tasks(stream) -> int:
    return sum("_shard_task" in t["key"] for t in stream.data)


@pytest.mark.parametrize("kind,statistic,options", [
    ("classification", "fisher", {"labels": "empirical"}),
    ("classification", "fisher", {"labels": "sampled"}),
    ("seq2seq", "fisher", {"labels": "sampled", "num_examples": 4}),
    ("classification", "blockwise_fisher", {"parameters": r".*LayerNorm\.(weight|bias)"}),
    ("classification", "gram", {"outputs": True}),
    ("seq2seq", "gram", {"outputs": True, "max_memory": 4096}),
])
def test_two_shards_equal_the_local_computation(tmp_path, cluster, saved, kind, statistic, options):
    model, task = saved[kind]
    compute(statistic, model, task, tmp_path / "local", batch_size=3, **options)
    with get_task_stream(client=cluster[1]) as stream:
        summary = compute(statistic, model, task, tmp_path / "dask", batch_size=3, executor="dask",
                          scheduler=cluster[0].scheduler_address, shards=2, **options)
    assert shard_tasks(stream) == 2
    assert summary["examples"] == options.get("num_examples", 11) and summary["tokens"] > summary["examples"]
    assert_same(tmp_path / "local", tmp_path / "dask")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dask", "local"]


def test_the_command_line_joins_the_scheduler_named_in_the_environment(tmp_path, cluster, saved):
    model, task = saved["seq2seq"]
    args = ["stats", "gram", "--model", str(model), "--data", task.data, "--target-column", "target",
            "--outputs", "--batch-size", "2", "--num-examples", "9"]
    runner = CliRunner()
    local = runner.invoke(main, [*args, "--out", str(tmp_path / "local.safetensors"), "--no-inputs"])
    assert local.exit_code == 0, local.output
    with get_task_stream(client=cluster[1]) as stream:
        remote = runner.invoke(main, [*args, "--out", str(tmp_path / "dask.safetensors"), "--no-inputs",
                                      "--executor", "dask", "--shards", "3"],
                               env={SCHEDULER_ENV: cluster[0].scheduler_address})
    assert remote.exit_code == 0, remote.output
    assert "9 examples" in remote.output and shard_tasks(stream) == 3
    want = open_statistics(tmp_path / "local.safetensors", "l")["gram_out"]
    got = open_statistics(tmp_path / "dask.safetensors", "d")["gram_out"]
    assert sorted(got.specs) == sorted(want.specs)
    for name, spec in want.specs.items():
        t = want.read(name, 0, spec.rows)
        torch.testing.assert_close(got.read(name, 0, spec.rows), t, rtol=1e-6, atol=1e-6 * float(t.abs().max()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dask.safetensors", "local.safetensors"]


def _arm(spec: str) -> int:
    os.environ[faults.ENV] = spec
    return os.getpid()


def test_a_worker_killed_mid_shard_is_replaced_and_the_result_is_the_same(tmp_path, cluster, saved):
    c, client = cluster
    model, task = saved["classification"]
    compute("fisher", model, task, tmp_path / "local", batch_size=2)
    client.wait_for_workers(2)
    victim = sorted(client.scheduler_info()["workers"])[0]
    killed = client.run(_arm, "block:3", workers=[victim])[victim]  # SIGKILL at its third partial tensor written
    try:
        compute("fisher", model, task, tmp_path / "dask", batch_size=2, executor="dask",
                scheduler=c.scheduler_address, shards=4)
    finally:
        client.run(os.environ.pop, faults.ENV, None)
    client.wait_for_workers(2, timeout=60)
    assert killed not in client.run(os.getpid).values()  # the victim died and the nanny started a fresh one
    assert_same(tmp_path / "local", tmp_path / "dask")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dask", "local"]


def test_a_failing_shard_stops_the_computation_and_leaves_nothing(tmp_path, cluster, saved):
    model, _ = saved["classification"]
    rows = make_rows(12, seed=3)
    rows[9]["label"] = 7  # the model has 3 classes
    task = TaskSpec(data=str(write_jsonl(tmp_path / "bad.jsonl", rows)))
    with pytest.raises(BlockmergeError, match="example 9 has label 7") as local:
        compute("fisher", model, task, tmp_path / "o", batch_size=2)
    with pytest.raises(BlockmergeError) as remote:
        compute("fisher", model, task, tmp_path / "o", batch_size=2, executor="dask",
                scheduler=cluster[0].scheduler_address, shards=3)
    assert str(remote.value) == str(local.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_bad_requests_are_refused_before_any_cluster(tmp_path, saved):
    model, task = saved["classification"]
    unreachable = {"executor": "dask", "scheduler": "tcp://127.0.0.1:1"}
    with pytest.raises(BlockmergeError, match="shards must be a positive integer, got 0"):
        compute("fisher", model, task, tmp_path / "o", shards=0, **unreachable)
    with pytest.raises(BlockmergeError, match="num_examples must be a positive integer, got 0"):
        compute("fisher", model, task, tmp_path / "o", num_examples=0, **unreachable)
    with pytest.raises(BlockmergeError, match="nowhere: not a model directory"):
        compute("fisher", tmp_path / "nowhere", task, tmp_path / "o", **unreachable)
    with pytest.raises(BlockmergeError, match="executor is local"):
        compute("fisher", model, task, tmp_path / "o", shards=2)
    with pytest.raises(BlockmergeError, match="unknown executor 'ray'"):
        compute("fisher", model, task, tmp_path / "o", executor="ray")
    assert list(tmp_path.iterdir()) == []


def test_a_scheduler_that_cannot_be_reached_is_one_line(tmp_path, saved):
    model, task = saved["classification"]
    args = ["stats", "fisher", "--model", str(model), "--data", task.data, "--out", str(tmp_path / "o"),
            "--executor", "dask", "--scheduler", "tcp://127.0.0.1:9"]
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockmerge: error: cannot reach the Dask scheduler at "
                                                   "tcp://127.0.0.1:9 ("), result.output
    assert list(tmp_path.iterdir()) == []


@given(total=st.integers(1, 500), batch_size=st.integers(1, 40), shards=st.integers(1, 50))
def test_shards_are_contiguous_runs_of_whole_batches(total, batch_size, shards):
    bounds = _bounds(total, batch_size, shards)
    batches = -(-total // batch_size)
    assert bounds[0] == 0 and bounds[-1] == total and len(bounds) - 1 == min(shards, batches)
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert all(b % batch_size == 0 for b in bounds[:-1])
