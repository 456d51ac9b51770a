"""The engine: resume after a kill, atomic outputs, locking, plugins from entry points, config files."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_family, write_family
from safetensors.torch import load_file

import blockmerge
from blockmerge import BlockmergeError, plugins
from blockmerge.cli import main


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockmerge", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def merge_args(base: Path, models: list[Path], out: Path, method: str = "ties") -> list[str]:
    return ["merge", "-q", "--method", method, "--base", str(base), *sum((["--model", str(m)] for m in models), []),
            "--out", str(out), "--block-size", "512"]


def digest_tree(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("suffix", [".safetensors", ".store"])
def test_killed_merge_resumes_to_identical_bytes(family, tmp_path, suffix):
    base, models, base_path, model_paths = family
    reference = tmp_path / f"reference{suffix}"
    assert cli(*merge_args(base_path, model_paths, reference)).returncode == 0
    out = tmp_path / f"out{suffix}"
    killed = cli(*merge_args(base_path, model_paths, out), env={"BLOCKMERGE_FAULT": "block:3"})
    assert killed.returncode == -9
    assert not out.exists()
    partial = tmp_path / f".{out.name}.blockmerge-partial"
    assert sum('"name"' in line for line in (partial / "journal.jsonl").read_text().splitlines()) == 3
    summary = blockmerge.merge("ties", model_paths, base=base_path, out=out, block_size=512, resume=True)
    assert summary.blocks_resumed == 3
    assert not partial.exists()
    assert digest_tree(out).values() == digest_tree(reference).values() or \
        list(digest_tree(out).values()) == list(digest_tree(reference).values())


def test_rerun_without_resume_restarts_cleanly(family, tmp_path):
    base, models, base_path, model_paths = family
    out = tmp_path / "out.safetensors"
    assert cli(*merge_args(base_path, model_paths, out), env={"BLOCKMERGE_FAULT": "block:2"}).returncode == -9
    summary = blockmerge.merge("ties", model_paths, base=base_path, out=out, block_size=512)
    assert summary.blocks_resumed == 0
    expected = blockmerge.merge("ties", model_paths, base=base_path)
    got = load_file(out)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_resume_redoes_a_block_whose_bytes_do_not_match_the_journal(family, tmp_path):
    base, models, base_path, model_paths = family
    out = tmp_path / "out.safetensors"
    assert cli(*merge_args(base_path, model_paths, out, "average"),
               env={"BLOCKMERGE_FAULT": "block:3"}).returncode == -9
    partial = tmp_path / f".{out.name}.blockmerge-partial"
    journal = partial / "journal.jsonl"
    lines = journal.read_text().splitlines()
    first = json.loads(lines[0])
    first["crc32"] = (first["crc32"] + 1) % 2**32
    journal.write_text("\n".join([json.dumps(first), *lines[1:], '{"torn'] ) + "\n")
    summary = blockmerge.merge("average", model_paths, base=base_path, out=out, block_size=512, resume=True)
    assert summary.blocks_resumed == 2
    expected = blockmerge.merge("average", model_paths)
    got = load_file(out)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_resume_of_a_different_merge_starts_over(family, tmp_path):
    base, models, base_path, model_paths = family
    out = tmp_path / "out.safetensors"
    assert cli(*merge_args(base_path, model_paths, out), env={"BLOCKMERGE_FAULT": "block:2"}).returncode == -9
    summary = blockmerge.merge("ties", model_paths, base=base_path, out=out, block_size=512, resume=True, density=0.5)
    assert summary.blocks_resumed == 0
    got, expected = load_file(out), blockmerge.merge("ties", model_paths, base=base_path, density=0.5)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_a_second_writer_of_the_same_output_fails_clearly(family, tmp_path):
    base, models, base_path, model_paths = family
    out = tmp_path / "out.safetensors"
    lock = tmp_path / f".{out.name}.blockmerge-lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result = cli(*merge_args(base_path, model_paths, out))
        assert result.returncode == 2
        assert "another blockmerge run is writing this output" in result.stderr
        assert not out.exists()
    finally:
        os.close(fd)
    assert cli(*merge_args(base_path, model_paths, out)).returncode == 0


def test_overwrite_replaces_only_when_complete(family, tmp_path):
    base, models, base_path, model_paths = family
    out = tmp_path / "out.safetensors"
    blockmerge.merge("average", model_paths, out=out)
    previous = out.read_bytes()
    assert cli(*merge_args(base_path, model_paths, out)).returncode == 2
    killed = cli(*merge_args(base_path, model_paths, out), "--overwrite", env={"BLOCKMERGE_FAULT": "block:1"})
    assert killed.returncode == -9 and out.read_bytes() == previous
    assert cli(*merge_args(base_path, model_paths, out), "--overwrite").returncode == 0
    assert set(load_file(out)) == set(base)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


THIRD_PARTY = '''
"""Negated mean, a method from another package."""
from dataclasses import dataclass
from blockmerge.plugins import Method

@dataclass(frozen=True)
class Negated:
    factor: float = 1.0

def merge(block, hp, state):
    return -hp.factor * sum(block.models) / len(block.models)

METHOD = Method(name="negated_mean", description="negated mean", hyperparameters=Negated, merge=merge)
'''


def test_a_third_party_method_registers_through_entry_points(tmp_path, monkeypatch):
    (tmp_path / "negated_method.py").write_text(THIRD_PARTY)
    info = tmp_path / "negated_method-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: negated-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[blockmerge.methods]\nnegated_mean = negated_method:METHOD\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.registry.cache_clear()
    try:
        assert "negated_mean" in [m["name"] for m in blockmerge.methods()]
        base, models = make_family(2)
        out = blockmerge.merge("negated_mean", models, factor=2.0)
        torch.testing.assert_close(out["layer.0.norm"], -(models[0]["layer.0.norm"] + models[1]["layer.0.norm"]))
        with pytest.raises(BlockmergeError, match="unknown hyperparameter 'scale'"):
            blockmerge.merge("negated_mean", models, scale=2.0)
    finally:
        plugins.registry.cache_clear()


def test_yaml_config_gives_the_same_merge_as_flags(family, tmp_path):
    base, models, base_path, model_paths = family
    config = {"method": "ties", "base": base_path.name, "models": [p.name for p in model_paths],
              "set": {"density": 0.4, "scaling_factor": 0.7}, "out": "from_yaml.safetensors", "block_size": "1KiB"}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["merge", "-q", "-c", str(tmp_path / "merge.yaml")])
    assert result.exit_code == 0, result.output
    flags = CliRunner().invoke(main, [*merge_args(base_path, model_paths, tmp_path / "flags.safetensors"),
                                      "--set", "density=0.4", "--set", "scaling_factor=0.7"])
    assert flags.exit_code == 0, flags.output
    a, b = load_file(tmp_path / "from_yaml.safetensors"), load_file(tmp_path / "flags.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_exclude_keeps_matching_parameters_from_the_base():
    base, models = make_family(3)
    out = blockmerge.merge("task_arithmetic", models, base=base, exclude=[r"^embed\.", r"norm$"])
    assert torch.equal(out["embed.weight"], base["embed.weight"])
    assert torch.equal(out["layer.0.norm"], base["layer.0.norm"])
    assert not torch.equal(out["layer.0.attn.weight"], base["layer.0.attn.weight"])
    first = blockmerge.merge("average", models, exclude=["embed"])
    assert torch.equal(first["embed.weight"], models[0]["embed.weight"])


def test_missing_statistic_is_averaged_and_counted_or_an_error(tmp_path):
    base, models = make_family(2)
    trimmed = [{"layer.0.attn.weight": m["layer.0.attn.weight"] - base["layer.0.attn.weight"]} for m in models]
    summary = blockmerge.merge("ties", models, base=base, stats=[{"trimmed": t} for t in trimmed],
                               out=tmp_path / "o.safetensors")
    assert summary.tensors_merged == 1
    assert summary.tensors_averaged_missing_statistic == 4
    got = load_file(tmp_path / "o.safetensors")
    torch.testing.assert_close(got["embed.weight"], (models[0]["embed.weight"] + models[1]["embed.weight"]) / 2)
    with pytest.raises(BlockmergeError, match="missing_statistic=error"):
        blockmerge.merge("ties", models, base=base, stats=[{"trimmed": t} for t in trimmed], missing_statistic="error")
    with pytest.raises(BlockmergeError, match="while other models have one"):
        blockmerge.merge("ties", models, base=base, stats=[{"trimmed": trimmed[0]}, {"trimmed": {}}])


def test_statistic_of_the_wrong_shape_is_refused():
    base, models = make_family(2)
    bad = [{"trimmed": {"layer.0.norm": torch.zeros(3)}} for _ in models]
    with pytest.raises(BlockmergeError, match="'layer.0.norm'.*shape \\[3\\], expected \\[16\\]"):
        blockmerge.merge("ties", models, base=base, stats=bad)


def test_summary_reports_what_the_merge_did(family, tmp_path):
    base, models, base_path, model_paths = family
    summary = blockmerge.merge("ties", model_paths, base=base_path, out=tmp_path / "o", block_size=512)
    assert summary.passes == 4  # two trim passes, the majority sign, the merge
    assert len(summary.pass_seconds) == 3 and all(t > 0 for t in summary.pass_seconds)
    assert sum(summary.pass_seconds) < summary.seconds
    assert blockmerge.merge("average", model_paths, out=tmp_path / "a").pass_seconds == []
    assert summary.tensors_merged == 5 and summary.tensors_copied == 1
    total = sum(t.numel() * t.element_size() for t in base.values())
    assert summary.bytes_written == total
    assert summary.bytes_read >= 4 * total
    assert summary.peak_rss_bytes > 0 and summary.seconds > 0


def test_bf16_family_merges_through_every_format(tmp_path):
    base, models = make_family(3, dtype=torch.bfloat16)
    base_path, model_paths = write_family(tmp_path, base, models)
    expected = blockmerge.merge("dare", models, base=base, drop_rate=0.5)
    blockmerge.merge("dare", model_paths, base=base_path, out=tmp_path / "s", drop_rate=0.5)
    from_store = blockmerge.merge("average", [tmp_path / "s"])
    assert all(torch.equal(from_store[n], expected[n]) for n in expected)


def test_a_merge_that_overflows_the_output_dtype_is_an_error(tmp_path):
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.full((4,), 60000.0)} for _ in range(2)]
    with pytest.raises(BlockmergeError, match="parameter 'w'.*NaN or Inf in float16"):
        blockmerge.merge("task_arithmetic", models, base=base, dtype="float16", out=tmp_path / "o.safetensors")
    assert list(tmp_path.iterdir()) == []
    assert blockmerge.merge("task_arithmetic", models, base=base, scaling_factor=0.5, dtype="float16")["w"][0] == 60000


def test_a_run_killed_between_the_renames_of_an_overwrite_loses_nothing(family, tmp_path):
    """A directory output is replaced by two renames (a file by one: it has no such point)."""
    base, models, base_path, model_paths = family
    out = tmp_path / "out.store"
    blockmerge.merge("average", model_paths, out=out)
    previous = digest_tree(out)
    killed = cli(*merge_args(base_path, model_paths, out), "--overwrite", env={"BLOCKMERGE_FAULT": "swap:1"})
    assert killed.returncode == -9 and not out.exists()
    refused = cli(*merge_args(base_path, model_paths, out))
    assert refused.returncode == 2 and "already exists" in refused.stderr
    assert digest_tree(out) == previous
    assert cli(*merge_args(base_path, model_paths, out), "--overwrite", "--resume").returncode == 0
    got, expected = blockmerge.merge("average", [out]), blockmerge.merge("ties", model_paths, base=base_path)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_peak_rss_is_this_process_high_water_mark():
    """VmHWM from /proc, not ru_maxrss (which after fork and exec also counts the parent's pages)."""
    from blockmerge.engine import memory

    with open("/proc/self/status") as f:
        before = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    peak = memory.peak_rss_bytes()
    with open("/proc/self/status") as f:
        after = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    assert before <= peak <= after


def test_buffer_pool_reuses_a_given_back_buffer_and_keeps_at_most_keep():
    from blockmerge.engine.buffers import BufferPool
    from blockmerge.engine.tensors import TensorSpec

    pool = BufferPool(keep=2)
    spec = TensorSpec((8, 4), "bfloat16")
    first, rows = pool.take(spec, 8)
    assert rows.shape == (8, 4) and rows.dtype == torch.bfloat16 and first.numel() == 64
    pool.give([first])
    again, smaller = pool.take(spec, 2)  # a smaller request is served by the buffer given back
    assert again.data_ptr() == first.data_ptr() and smaller.shape == (2, 4)
    bigger, _ = pool.take(TensorSpec((100,), "float32"), 100)  # nothing waiting fits: a new buffer
    assert bigger.data_ptr() != first.data_ptr() and bigger.numel() == 400
    pool.give([again, bigger, torch.empty(10, dtype=torch.uint8)])
    assert sorted(b.numel() for b in pool._free) == [64, 400]  # the smallest beyond `keep` is dropped
    scalar_buffer, scalar = pool.take(TensorSpec((), "float32"), 1)
    assert scalar.shape == () and scalar_buffer.numel() == 64
    pool.take(TensorSpec((1000,), "float32"), 1000)  # no fit: the largest waiting buffer is dropped
    assert [b.numel() for b in pool._free] == []


@pytest.mark.parametrize("method", ["average", "ties", "dare", "task_arithmetic"])
def test_slices_merged_on_several_threads_give_the_bytes_of_one(method):
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(700, 512, generator=g), "b": torch.randn(512, generator=g)}  # w: 3 slices
    models = [{n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(3)]
    extra = {"base": base} if method != "average" else {}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = blockmerge.merge(method, models, **extra)
        torch.set_num_threads(4)
        several = blockmerge.merge(method, models, **extra)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(one[n], several[n]) for n in base)


def test_io_hints_are_active_on_linux_and_leave_the_bytes_alone(tmp_path):
    from safetensors.torch import save_file

    from blockmerge.engine import safetensors_io

    if sys.platform.startswith("linux"):
        assert safetensors_io._sync_file_range is not None
    t = torch.randn(64, 32)
    save_file({"w": t}, tmp_path / "a.safetensors")
    source = safetensors_io.SafetensorsFile(tmp_path / "a.safetensors")
    source.prefetch("w", 8, 40)
    assert torch.equal(source.read("w", 8, 40), t[8:40])
    fd = os.open(tmp_path / "b", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"x" * 4096)
    safetensors_io.start_writeback(fd, 0, 4096)
    os.close(fd)
    assert (tmp_path / "b").read_bytes() == b"x" * 4096
