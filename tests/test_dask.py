"""The Dask executor against the local one on a real two-process LocalCluster: same bytes for every method and
format, a worker killed mid-merge, resuming, failing tasks, and schedulers that cannot be reached."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import dask
import pytest
import torch
from click.testing import CliRunner
from conftest import make_family, write_family
from distributed import LocalCluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blockmerge
from blockmerge.cli import main
from blockmerge.engine import faults
from blockmerge.engine.cluster import SCHEDULER_ENV
from blockmerge.errors import BlockmergeError
from blockmerge.stats.store import write_statistics

BLOCK = 1024  # bytes of inputs per block: about 25 blocks per merge


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    base, models = make_family(3, seed=3)
    base_path, model_paths = write_family(root, base, models)
    g = torch.Generator().manual_seed(4)
    stats = []
    for i, m in enumerate(models):
        fisher = {n: torch.rand(t.shape, generator=g) for n, t in m.items() if t.is_floating_point()}
        grams = {}
        for n in ("layer.0.attn.weight", "layer.1.mlp.weight"):
            x = torch.randn(40, m[n].shape[1], generator=g)
            grams[n] = x.T @ x / 40
        stats.append(write_statistics({"fisher": fisher, "gram_in": grams}, root / f"stats{i}", {}))
    return {"base": base_path, "models": model_paths, "stats": stats, "tensors": models}


def tree(path: Path) -> dict[str, str]:
    """sha256 of every file of an output (a file, or a directory's files by relative path)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path)) if f != path else "": hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def both(tmp_path: Path, cluster, method: str, name: str, **kwargs) -> tuple:
    """The same merge run locally and on the cluster, into outputs of the same name in two directories."""
    (tmp_path / "local").mkdir()
    (tmp_path / "dask").mkdir()
    local = blockmerge.merge(method, out=tmp_path / "local" / name, block_size=BLOCK, **kwargs)
    remote = blockmerge.merge(method, out=tmp_path / "dask" / name, block_size=BLOCK, executor="dask",
                              scheduler=cluster[0].scheduler_address, **kwargs)
    return local, remote, tree(tmp_path / "local" / name), tree(tmp_path / "dask" / name)


def same_summary(local, remote) -> None:
    for field in ("blocks", "passes", "bytes_read", "bytes_written", "tensors_merged", "tensors_copied",
                  "tensors_averaged_missing_statistic", "blocks_resumed", "reports"):
        assert getattr(local, field) == getattr(remote, field), field


@pytest.mark.parametrize("method,name,options", [
    ("average", "o", {"format": "store"}),
    ("task_arithmetic", "o.safetensors", {"scaling_factor": 0.7}),
    ("dare", "o", {"format": "hf", "drop_rate": 0.5, "seed": 3, "max_shard_size": 2000}),
    ("ties", "o", {"density": 0.3}),
    ("ties", "o.safetensors", {"density": 0.3, "trim": "block", "majority_sign": "block"}),
    ("arcee_fusion", "o", {}),  # one model: its per-tensor passes folded on the workers (`combine`)
])
def test_outputs_are_byte_identical_to_the_local_executor(tmp_path, cluster, inputs, method, name, options):
    models = inputs["models"][:1] if method == "arcee_fusion" else inputs["models"]
    local, remote, a, b = both(tmp_path, cluster, method, name, models=models, base=inputs["base"], **options)
    assert len(a) >= (1 if name.endswith(".safetensors") else 3)
    assert a == b
    same_summary(local, remote)
    assert remote.blocks > (10 if method == "arcee_fusion" else 15)  # one model's inputs: fewer, larger blocks


@pytest.mark.parametrize("method,models,options", [("ties", 3, {"density": 0.3}), ("arcee_fusion", 1, {})])
def test_the_state_goes_to_the_workers_once_and_combined_passes_send_one_result_per_tensor(
        tmp_path, cluster, inputs, monkeypatch, method, models, options):
    """Tasks take the passes' state as a future scattered once per pass (not pickled into each tensor's task: at
    7B TIES's state is ~45 MB), and a pass with `combine` (arcee_fusion's) returns one fold per tensor's task."""
    from distributed import Client, Future

    from blockmerge.engine import cluster as dask_executor

    scattered, submitted, pass_results = [], [], []
    scatter, submit, result = Client.scatter, Client.submit, dask_executor.task_result

    def recording_scatter(self, data, **kwargs):
        scattered.append(data)
        return scatter(self, data, **kwargs)

    def recording_submit(self, fn, *args, **kwargs):
        submitted.append((fn.__name__, args))
        return submit(self, fn, *args, **kwargs)

    def recording_result(future, *args):
        value = result(future, *args)
        if isinstance(value, tuple):  # a pass task's (partials, bytes read, checksums)
            pass_results.append(value[0])
        return value

    monkeypatch.setattr(Client, "scatter", recording_scatter)
    monkeypatch.setattr(Client, "submit", recording_submit)
    monkeypatch.setattr(dask_executor, "task_result", recording_result)
    summary = blockmerge.merge(method, models=inputs["models"][:models], base=inputs["base"], out=tmp_path / "o",
                               block_size=BLOCK, executor="dask", scheduler=cluster[0].scheduler_address, **options)
    tasks = [(name, args) for name, args in submitted if name in ("_pass_task", "_merge_task")]
    states = [args[3] if name == "_pass_task" else args[2] for name, args in tasks]
    assert len(tasks) > 2 * len(scattered) > 0 and summary.blocks > 10
    assert all(isinstance(state, Future) for state in states)
    assert len({state.key for state in states}) == len(scattered)
    if method == "arcee_fusion":
        assert pass_results and all(len(partials) == 1 for partials in pass_results)
    else:  # TIES's passes have no combine: a partial per block of the tensor
        assert max(len(partials) for partials in pass_results) > 1


@pytest.mark.parametrize("method,options", [("fisher", {"normalize_fishers": True}), ("regmean", {"alpha": 0.8})])
def test_methods_with_statistics_are_byte_identical(tmp_path, cluster, inputs, method, options):
    local, remote, a, b = both(tmp_path, cluster, method, "o", models=inputs["models"], stats=inputs["stats"],
                               **options)
    assert a == b
    same_summary(local, remote)
    assert remote.tensors_merged >= 2


def test_the_command_line_joins_the_scheduler_named_in_the_environment(tmp_path, cluster, inputs):
    args = ["merge", "--method", "ties", "--base", str(inputs["base"]), "--set", "density=0.4", "--block-size",
            str(BLOCK), "-q", *(f"--model={m}" for m in inputs["models"])]
    runner = CliRunner()
    local = runner.invoke(main, [*args, "--out", str(tmp_path / "local.safetensors")])
    assert local.exit_code == 0, local.output
    remote = runner.invoke(main, [*args, "--out", str(tmp_path / "dask.safetensors"), "--executor", "dask"],
                           env={SCHEDULER_ENV: cluster[0].scheduler_address})
    assert remote.exit_code == 0, remote.output
    assert tree(tmp_path / "local.safetensors") == tree(tmp_path / "dask.safetensors")


def _arm(spec: str) -> int:
    os.environ[faults.ENV] = spec
    return os.getpid()


def test_a_worker_killed_mid_merge_is_replaced_and_the_merge_completes(tmp_path, cluster, inputs):
    c, client = cluster
    reference = blockmerge.merge("dare", inputs["models"], base=inputs["base"], out=tmp_path / "ref", drop_rate=0.3,
                                 block_size=BLOCK)
    client.wait_for_workers(2)
    victim = sorted(client.scheduler_info()["workers"])[0]
    killed = client.run(_arm, "write:2", workers=[victim])[victim]  # SIGKILL at its second block written
    try:
        summary = blockmerge.merge("dare", inputs["models"], base=inputs["base"], out=tmp_path / "o", drop_rate=0.3,
                                   block_size=BLOCK, executor="dask", scheduler=c.scheduler_address)
    finally:
        client.run(os.environ.pop, faults.ENV, None)
    client.wait_for_workers(2, timeout=60)
    assert killed not in client.run(os.getpid).values()  # the victim died and the nanny started a fresh one
    assert tree(tmp_path / "ref") == tree(tmp_path / "o")
    assert summary.blocks == reference.blocks and summary.bytes_written == reference.bytes_written
    assert not list(tmp_path.glob(".o.blockmerge-*"))


def test_resume_after_a_killed_local_run_keeps_the_journaled_blocks(tmp_path, cluster, inputs):
    args = ["merge", "--method", "dare", "--base", str(inputs["base"]), "--set", "drop_rate=0.3", "--block-size",
            str(BLOCK), "-q", *(f"--model={m}" for m in inputs["models"]), "--out"]
    ref = blockmerge.merge("dare", inputs["models"], base=inputs["base"], out=tmp_path / "ref", drop_rate=0.3,
                           block_size=BLOCK)
    killed = subprocess.run([sys.executable, "-m", "blockmerge", *args, str(tmp_path / "o")], capture_output=True,
                            env={**os.environ, faults.ENV: "block:8"})
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "o").exists()
    summary = blockmerge.merge("dare", inputs["models"], base=inputs["base"], out=tmp_path / "o", drop_rate=0.3,
                               block_size=BLOCK, resume=True, executor="dask", scheduler=cluster[0].scheduler_address)
    assert summary.blocks_resumed == 8
    assert summary.bytes_written < ref.bytes_written
    assert tree(tmp_path / "ref") == tree(tmp_path / "o")


def test_a_failing_task_stops_the_merge_and_leaves_nothing(tmp_path, cluster, inputs):
    bad = dict(inputs["tensors"][1])
    bad["layer.1.mlp.weight"] = bad["layer.1.mlp.weight"].clone()
    bad["layer.1.mlp.weight"][30, 2] = float("nan")
    from safetensors.torch import save_file

    save_file(bad, tmp_path / "bad.safetensors")
    models = [inputs["models"][0], tmp_path / "bad.safetensors"]
    with pytest.raises(BlockmergeError, match=r"bad.safetensors: parameter 'layer.1.mlp.weight': contains NaN"):
        blockmerge.merge("average", models, out=tmp_path / "o", block_size=BLOCK, executor="dask",
                         scheduler=cluster[0].scheduler_address)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_inputs_and_outputs_the_workers_cannot_see_are_refused_before_any_cluster(tmp_path, inputs):
    with pytest.raises(BlockmergeError, match=r"models\[1\]: not a file: the dask executor reads inputs from files"):
        blockmerge.merge("average", [inputs["models"][0], inputs["tensors"][1]], out=tmp_path / "o",
                         executor="dask", scheduler="tcp://127.0.0.1:1")
    with pytest.raises(BlockmergeError, match="writes to a path every worker sees"):
        blockmerge.merge("average", inputs["models"], executor="dask", scheduler="tcp://127.0.0.1:1")
    with pytest.raises(BlockmergeError, match="unknown executor 'ray'"):
        blockmerge.merge("average", inputs["models"], out=tmp_path / "o", executor="ray")
    with pytest.raises(BlockmergeError, match="executor is local"):
        blockmerge.merge("average", inputs["models"], out=tmp_path / "o", scheduler="tcp://127.0.0.1:1")
    assert list(tmp_path.iterdir()) == []


def test_a_scheduler_that_cannot_be_reached_is_one_line(tmp_path, inputs):
    args = ["merge", "--method", "average", *(f"--model={m}" for m in inputs["models"]), "--out", str(tmp_path / "o"),
            "--executor", "dask", "--scheduler", "tcp://127.0.0.1:9"]
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockmerge: error: cannot reach the Dask scheduler at "
                                                   "tcp://127.0.0.1:9 ("), result.output
    assert list(tmp_path.iterdir()) == []


def test_a_scheduler_without_workers_is_one_line(tmp_path, inputs):
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0", silence_logs=logging.CRITICAL) as empty, \
            dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(BlockmergeError, match=f"the Dask scheduler at {empty.scheduler_address} has no workers"):
            blockmerge.merge("average", inputs["models"], out=tmp_path / "o", executor="dask",
                             scheduler=empty.scheduler_address)
    assert list(tmp_path.iterdir()) == []


# Tensors over one slice of SLICE_ELEMENTS (several per block), small ones, and a vector.
LARGE_SHAPES = {"embed.weight": (1100, 256), "layer.0.q.weight": (256, 256), "layer.0.norm.weight": (256,),
                "head.weight": (48, 256)}
METHOD_OPTIONS = {"dare": {"drop_rate": 0.5, "seed": 7}, "ties": {"density": 0.2},
                  "fisher": {"normalize_fishers": True}, "regmean": {"alpha": 0.8},
                  "mats": {"objective": "regmean", "num_iterations": 10}, "ubgm": {"delta0": 1e-3}}


def hard_family(root: Path, seed: int, step: float, cancelled: float) -> dict:
    """Base and 3 fine-tunes whose task vectors are multiples of `step` (ties at every magnitude threshold), the
    second model's the negation of the first's on a `cancelled` fraction of entries (sign votes that cancel), with
    Fishers and input Grams of every model and the base."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in LARGE_SHAPES.items()}
    taus = [{n: (0.02 * torch.randn(s, generator=g) / step).round() * step for n, s in LARGE_SHAPES.items()}
            for _ in range(3)]
    for n, t in taus[1].items():
        flip = torch.rand(t.shape, generator=g) < cancelled
        t[flip] = -taus[0][n][flip]
    models = [{n: base[n] + t[n] for n in base} for t in taus]
    base_path, model_paths = write_family(root, base, models)

    def stats(path: Path) -> Path:
        fisher = {n: torch.rand(s, generator=g) for n, s in LARGE_SHAPES.items()}
        grams = {}
        for n, s in LARGE_SHAPES.items():
            if len(s) == 2:
                x = torch.randn(2 * s[1], s[1], generator=g)
                grams[n] = x.T @ x / len(x)
        return write_statistics({"fisher": fisher, "gram_in": grams}, path, {})

    return {"base": base_path, "models": model_paths, "stats": [stats(root / f"stats{i}") for i in range(3)],
            "base_stats": stats(root / "base-stats")}


@settings(max_examples=3, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), step=st.sampled_from([2.0**-8, 2.0**-6]), cancelled=st.sampled_from([0.1, 0.5]))
def test_dask_equals_local_for_every_method_on_families_with_ties_and_cancellations(tmp_path_factory, cluster, seed,
                                                                                     step, cancelled):
    root = tmp_path_factory.mktemp("hard")
    family = hard_family(root, seed, step, cancelled)
    for described in blockmerge.methods():
        method, most = described["name"], described["model_count"][1]
        options = {"models": family["models"][:most], "base": family["base"], "stats": family["stats"][:most],
                   "base_stats": family["base_stats"], **METHOD_OPTIONS.get(method, {})}
        out = root / method
        out.mkdir()
        local = blockmerge.merge(method, out=out / "local.safetensors", **options)
        remote = blockmerge.merge(method, out=out / "dask.safetensors", executor="dask",
                                  scheduler=cluster[0].scheduler_address, **options)
        assert tree(out / "local.safetensors") == tree(out / "dask.safetensors"), method
        same_summary(local, remote)
