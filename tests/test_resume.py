"""--resume reuses only what it can verify: a block of the partial output is kept when its bytes match the
journal's CRC-32 and the inputs it was merged from are byte-identical to what is read now. An input rewritten
with the same size and time is named in one line and its blocks are merged again; a damaged partial output
(payload truncated or deleted, a store chunk cut short) costs only its damaged blocks. Real files and processes."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_family, write_family
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import blockmerge
from blockmerge import api

BLOCK = "512"


def cli(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BLOCKMERGE_FAULT"}
    if fault:
        env["BLOCKMERGE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "blockmerge", *args], capture_output=True, text=True, env=env)


def merge_args(method: str, base: Path, models: list[Path], out: Path) -> list[str]:
    return ["merge", "-q", "--method", method, "--base", str(base), *sum((["--model", str(m)] for m in models), []),
            "--out", str(out), "--block-size", BLOCK]


def journal(out: Path) -> list[dict]:
    path = out.parent / f".{out.name}.blockmerge-partial" / "journal.jsonl"
    return [entry for entry in map(json.loads, path.read_text().splitlines()) if "name" in entry]


def killed_after(blocks: int, method: str, base: Path, models: list[Path], out: Path) -> list[dict]:
    """Run the merge until `blocks` blocks are journaled, SIGKILL it; the journal's block entries."""
    result = cli(*merge_args(method, base, models, out), fault=f"block:{blocks}")
    assert result.returncode == -9, result.stderr
    return journal(out)


def rewrite_keeping_size_and_time(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Rewrite a safetensors file with other values of the same shapes and give it back its times (`cp -p`)."""
    before = path.stat()
    save_file(tensors, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def provenance(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["blockmerge"])


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ------------------------------------------------------------------------------------------ changed inputs


@pytest.mark.parametrize("method", ["average", "ties"])
def test_an_input_rewritten_with_the_same_size_and_time_is_named_and_its_blocks_merged_again(family, tmp_path,
                                                                                             method):
    """average: the changed tensor is among the journaled blocks; ties (reduction passes before the merge): it
    is not, but every merged block depends on it through the passes."""
    base, models, base_path, model_paths = family
    out = tmp_path / "out.safetensors"
    done = {e["name"] for e in killed_after(3, method, base_path, model_paths, out)}
    floats = [n for n, t in base.items() if t.is_floating_point() and t.dim()]
    changed = next(n for n in floats if (n in done) == (method == "average"))
    rewritten = dict(models[0])
    rewritten[changed] = rewritten[changed] + 1.0
    rewrite_keeping_size_and_time(model_paths[0], rewritten)

    result = cli(*merge_args(method, base_path, model_paths, out), "--resume")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and str(model_paths[0]) in lines[0] and "changed" in lines[0], lines
    fresh = tmp_path / "fresh.safetensors"
    assert cli(*merge_args(method, base_path, model_paths, fresh)).returncode == 0
    assert same_tensors(load_file(out), load_file(fresh))
    assert provenance(out) == provenance(fresh)


def test_an_unchanged_input_resumes_silently(family, tmp_path):
    base, models, base_path, model_paths = family
    out = tmp_path / "out.safetensors"
    killed_after(3, "ties", base_path, model_paths, out)
    result = cli(*merge_args("ties", base_path, model_paths, out), "--resume")
    assert result.returncode == 0 and result.stderr == ""
    assert same_tensors(load_file(out), blockmerge.merge("ties", model_paths, base=base_path))


# ------------------------------------------------------------------------------------- damaged partial output


@pytest.fixture
def wide(tmp_path):
    """A family whose merge takes a dozen blocks."""
    shapes = {f"layer.{i}.weight": (16, 16) for i in range(4)}
    return write_family(tmp_path, *make_family(shapes=shapes))


def data_end(path: Path, entry: dict) -> int:
    """Byte offset in a safetensors file where a journaled block ends."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    info = header[entry["name"]]
    row_bytes = (info["data_offsets"][1] - info["data_offsets"][0]) // info["shape"][0]
    return 8 + header_len + info["data_offsets"][0] + entry["stop"] * row_bytes


def test_a_truncated_payload_costs_only_the_blocks_cut_off(wide, tmp_path):
    base_path, model_paths = wide
    out = tmp_path / "out.safetensors"
    done = killed_after(8, "ties", base_path, model_paths, out)
    payload = tmp_path / f".{out.name}.blockmerge-partial" / out.name
    cut = sorted(data_end(payload, e) for e in done)[len(done) // 2]
    os.truncate(payload, cut)
    kept = sum(data_end(payload, e) <= cut for e in done)
    summary = blockmerge.merge("ties", model_paths, base=base_path, out=out, block_size=int(BLOCK), resume=True)
    assert 0 < summary.blocks_resumed == kept < len(done)
    assert same_tensors(load_file(out), blockmerge.merge("ties", model_paths, base=base_path))


@pytest.mark.parametrize("suffix", [".safetensors", ".store"])
def test_a_deleted_payload_starts_over_without_an_error(wide, tmp_path, suffix):
    base_path, model_paths = wide
    out = tmp_path / f"out{suffix}"
    killed_after(4, "ties", base_path, model_paths, out)
    payload = tmp_path / f".{out.name}.blockmerge-partial" / out.name
    subprocess.run(["rm", "-r", str(payload)], check=True)
    result = cli(*merge_args("ties", base_path, model_paths, out), "--resume")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert api.inspect(out)["tensors"].keys() == load_file(base_path).keys()
    fresh = blockmerge.merge("ties", model_paths, base=base_path)
    assert same_tensors({n: api.open_checkpoint(out, "o").read(n, 0, t.shape[0] if t.dim() else 1)
                         for n, t in fresh.items()}, fresh)


def test_a_truncated_store_chunk_costs_only_its_blocks(wide, tmp_path):
    base_path, model_paths = wide
    out = tmp_path / "out.store"
    done = killed_after(8, "ties", base_path, model_paths, out)
    arrays = tmp_path / f".{out.name}.blockmerge-partial" / out.name / "arrays"
    damaged_array = sorted(p for p in arrays.iterdir())[0]
    chunk = next(p for p in sorted(damaged_array.rglob("*")) if p.is_file() and p.name != "zarr.json")
    os.truncate(chunk, chunk.stat().st_size // 2)
    rows = json.loads((damaged_array / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"][0]
    first = int(chunk.relative_to(damaged_array / "c").parts[0]) * rows
    damaged = sum(e["name"] == "layer.0.weight" and e["start"] < first + rows and e["stop"] > first for e in done)
    assert damaged  # arrays are numbered in name order
    summary = blockmerge.merge("ties", model_paths, base=base_path, out=out, block_size=int(BLOCK), resume=True)
    assert summary.blocks_resumed == len(done) - damaged
    fresh = blockmerge.merge("ties", model_paths, base=base_path)
    got = api.open_checkpoint(out, "o")
    assert all(torch.equal(got.read(n, 0, t.shape[0]), t) for n, t in fresh.items())


def test_a_damaged_request_starts_over_without_an_error(wide, tmp_path):
    base_path, model_paths = wide
    out = tmp_path / "out.safetensors"
    killed_after(4, "ties", base_path, model_paths, out)
    (tmp_path / f".{out.name}.blockmerge-partial" / "request.json").write_text('{"torn')
    result = cli(*merge_args("ties", base_path, model_paths, out), "--resume")
    assert result.returncode == 0, result.stderr
    assert same_tensors(load_file(out), blockmerge.merge("ties", model_paths, base=base_path))


# ------------------------------------------------------------------------------------------------- reports

MATS_SCRIPT = """
import sys, blockmerge
base, out, *models = sys.argv[1:]
stats = [{"fisher": m.replace("model", "fisher")} for m in models]
blockmerge.merge("mats", models, base=base, stats=stats, objective="diagonal_fisher", out=out, block_size=17920,
                 resume=True)
"""


def test_a_resumed_merge_keeps_the_reports_of_the_blocks_it_kept(family, tmp_path):
    base, models, base_path, model_paths = family
    g = torch.Generator().manual_seed(7)
    for i, m in enumerate(models):
        save_file({n: torch.rand(t.shape, generator=g) + 0.1 for n, t in m.items() if t.is_floating_point()},
                  tmp_path / f"fisher{i}.safetensors")

    def run(out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "BLOCKMERGE_FAULT"}
        env.update({"BLOCKMERGE_FAULT": fault} if fault else {})
        return subprocess.run([sys.executable, "-c", MATS_SCRIPT, str(base_path), str(out), *map(str, model_paths)],
                              capture_output=True, text=True, env=env)

    out, fresh = tmp_path / "out.safetensors", tmp_path / "fresh.safetensors"
    assert run(out, "block:3").returncode == -9
    assert any(e["reports"] for e in journal(out))
    assert run(out).returncode == 0 and run(fresh).returncode == 0
    assert provenance(out)["reports"] and provenance(out) == provenance(fresh)


def test_a_resume_of_other_inputs_says_it_starts_over(family, tmp_path):
    base, models, base_path, model_paths = family
    out = tmp_path / "out.safetensors"
    killed_after(3, "ties", base_path, model_paths, out)
    rewrite_keeping_size_and_time(model_paths[1], {n: t + 1 if t.is_floating_point() else t
                                                   for n, t in models[1].items()})
    os.utime(model_paths[1])  # a new time: the request differs
    result = cli(*merge_args("ties", base_path, model_paths, out), "--resume")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"blockmerge: {out}: the partial output was started with other inputs or "
                                          "options (or is missing): merging from the start"]
