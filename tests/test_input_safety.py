"""Inputs read safely: PyTorch files whose tensors do not fit their bytes, safetensors files safetensors
itself refuses, zero-byte tensors of astronomical length, non-regular files, sizes beyond reason, store
paths through `..`, and Hugging Face hub-cache snapshots whose files are links into the cache's blobs.

Every file is real: `.bin` files are written by `torch.save` and then edited as zip archives; the hub
cache is laid out as `huggingface_hub` lays it out (blobs named by hash, snapshot links, refs/main).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_bad_input import Env, assert_one_error_line, good_tensors, no_leftovers, safetensors_parts, write_raw

import blockmerge
from blockmerge import BlockmergeError, api
from blockmerge.engine.plan import plan, row_blocks
from blockmerge.engine.safetensors_io import SafetensorsFile
from blockmerge.engine.sinks import parse_size
from blockmerge.engine.tensors import TensorSpec


def run_cli(*args: object, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m blockmerge ARGS` in its own process (a hang fails the test instead of hanging it)."""
    return subprocess.run([sys.executable, "-m", "blockmerge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


# ----------------------------------------------------------------------------------------------- PyTorch files


def rewrite_zip(src: Path, dst: Path, records: dict[str, bytes], compress: frozenset[str] = frozenset()) -> Path:
    """A copy of the `torch.save` archive `src` with some records (`data/0`, ...) replaced or compressed."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            record = info.filename.split("/", 1)[1]
            method = zipfile.ZIP_DEFLATED if record in compress else zipfile.ZIP_STORED
            zout.writestr(info.filename, records.get(record, zin.read(info)), compress_type=method)
    return dst


def storage_key(path: Path, name: str) -> str:
    """The record (`data/K`) holding the storage of tensor `name` in a `torch.save` file, from its bytes."""
    tensors = torch.load(path, weights_only=True, mmap=True)
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            record = info.filename.split("/", 1)[1]
            if record.startswith("data/") and z.read(info) == bytes(tensors[name].untyped_storage()):
                return record
    raise AssertionError(f"no record holds {name}")


@pytest.mark.parametrize("change", ["shorter", "longer", "compressed"])
def test_bin_record_that_does_not_hold_its_storage_is_refused(env, change):
    """A record of another size than its storage declares (or compressed, so its bytes are not the values) would
    be read past its end, into the archive's next headers; torch.load without mmap refuses it too."""
    good = env.inp / "good.bin"
    torch.save(good_tensors(2), good)
    record = storage_key(good, "w")
    bad = env.inp / f"{change}.bin"
    if change == "compressed":
        rewrite_zip(good, bad, {}, compress=frozenset({record}))
    else:
        rewrite_zip(good, bad, {record: bytes(16) if change == "shorter" else bytes(256)})
    if change != "compressed":
        with pytest.raises(RuntimeError, match="record size"):
            torch.load(bad, weights_only=True)
    line = env.refused_merge(bad, bad.name, "'w'")
    assert record in line
    env.refused(["inspect", bad], bad.name, "'w'")


def test_bin_with_shared_empty_and_permuted_storages_is_read(env):
    """What the record check and the layout rule still accept: views sharing a storage (tied weights), an
    empty tensor, a transposed (dense, permuted) tensor, a scalar; merged to the values torch.load gives."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(10, 4, generator=g)
    tensors = {"w": base, "tied": base[2:6], "empty": torch.zeros(0, 3), "t": torch.randn(4, 8, generator=g).T,
               "s": torch.tensor(2.5)}
    path = env.inp / "views.bin"
    torch.save(tensors, path)
    merged = blockmerge.merge("average", [path, path])
    assert sorted(merged) == sorted(tensors)
    for name, t in tensors.items():
        assert torch.equal(merged[name], t), name


@pytest.mark.parametrize("layout", ["expanded", "overlapping"])
def test_bin_tensor_whose_elements_share_bytes_is_refused(env, layout):
    """A tensor must own numel × itemsize bytes of its storage: an expanded tensor (stride 0) of a few bytes
    declaring 65536 × 65536 elements would make a 16 GiB output out of a 1.5 KB file."""
    tensors = good_tensors(3)
    if layout == "expanded":
        tensors["w"] = torch.zeros(1).expand(65536, 65536)
    else:
        tensors["w"] = torch.arange(16.0).as_strided((8, 4), (1, 1))
    bad = env.inp / f"{layout}.bin"
    torch.save(tensors, bad)
    assert bad.stat().st_size < 4096
    assert tuple(torch.load(bad, weights_only=True)["w"].shape) == tuple(tensors["w"].shape)
    env.refused_merge(bad, bad.name, "'w'")
    env.refused(["inspect", bad], bad.name, "'w'")


# ----------------------------------------------------------------------------------------------- safetensors parity


def safetensors_refuses(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                f.get_tensor(name)
    except Exception:  # noqa: BLE001 - safetensors raises its own and builtin errors
        return True
    return False


def blockmerge_refuses(path: Path) -> bool:
    try:
        SafetensorsFile(path).close()
    except BlockmergeError as err:
        assert "\n" not in str(err) and path.name in str(err)
        return True
    return False


@pytest.mark.parametrize("layout", ["gap-between", "gap-before-first", "trailing-garbage", "trailing-zero-byte"])
def test_safetensors_layout_that_safetensors_refuses(env, layout):
    header, data = safetensors_parts(good_tensors(4))  # b [0,16], ids [16,48], w [48,176]
    if layout == "gap-between":
        header["w"]["data_offsets"] = [56, 184]
        data = data[:48] + b"\0" * 8 + data[48:]
    elif layout == "gap-before-first":
        for info in header.values():
            info["data_offsets"] = [o + 8 for o in info["data_offsets"]]
        data = b"\0" * 8 + data
    else:
        data += b"\0" if layout == "trailing-zero-byte" else b"garbage!"
    bad = write_raw(env.inp / "layout.safetensors", header, data)
    assert safetensors_refuses(bad)
    env.refused_merge(bad, bad.name)
    env.refused(["inspect", bad], bad.name)


SPANS = st.lists(st.tuples(st.sampled_from(["F32", "F16", "I64"]), st.lists(st.integers(0, 3), max_size=2),
                           st.integers(-2, 2)), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spans=SPANS, shift=st.integers(-2, 2), tail=st.integers(-2, 3))
def test_blockmerge_refuses_exactly_what_safetensors_refuses(tmp_path, spans, shift, tail):
    """Headers of supported dtypes whose offsets are moved a little (gaps, overlaps, a shifted start, bytes too
    few or too many at the end): blockmerge opens the file exactly when safetensors does."""
    sizes = {"F32": 4, "F16": 2, "I64": 8}
    header, cursor = {}, max(0, shift)
    for i, (dtype, shape, slack) in enumerate(spans):
        nbytes = sizes[dtype] * (1 if not shape else int(torch.tensor(shape).prod()))
        begin = max(0, cursor + slack) if i else cursor
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + nbytes]}
        cursor = max(cursor, begin + nbytes)
    data = bytes(range(256))[: max(0, cursor + tail)]
    path = write_raw(tmp_path / "parity.safetensors", header, data)
    assert blockmerge_refuses(path) == safetensors_refuses(path), (header, len(data))


# ----------------------------------------------------------------------------------------------- zero-byte tensors


@pytest.mark.parametrize("rows", [2**40, 2**61])
def test_plan_of_a_zero_byte_tensor_is_one_block(rows):
    """However many rows and however small the budget (a budget of rows // 1024 bytes keeps a wrong plan
    at 1024 blocks, where 64 bytes would be billions)."""
    spec = TensorSpec((rows, 0), "float32")
    budget = rows // 1024
    assert row_blocks(spec, 0, budget, 1) == [(0, rows)]
    assert row_blocks(spec, 0, budget, 8 * 1024 * 1024) == [(0, rows)]
    assert len(plan({"e": spec}, {"e": "merge"}, {"e": 0}, budget, {"e": 1}, set())) == 1


@pytest.mark.parametrize("fmt", ["safetensors", "store"])
def test_zero_byte_tensor_of_astronomical_length_is_merged_at_once(env, fmt):
    """A 221-byte file holding an empty tensor of shape [2^61, 0] (safetensors reads it at once) is merged in
    seconds, the tensor kept with its shape, whatever the output format."""
    tensors = {"w": torch.randn(4, 2), "empty": torch.zeros(2**61, 0)}
    a, b = env.inp / "a.safetensors", env.inp / "b.safetensors"
    save_file(tensors, a)
    save_file({**tensors, "w": torch.ones(4, 2)}, b)
    assert load_file(a)["empty"].shape == (2**61, 0)
    out = env.outdir / ("merged.safetensors" if fmt == "safetensors" else "merged-store")
    result = run_cli("merge", "-q", "--method", "ties", "--base", a, "--model", a, "--model", b, "--out", out,
                     "--block-size", "64B", timeout=120)
    assert result.returncode == 0, result.stderr
    if fmt == "store":
        api.convert(out, env.outdir / "check.safetensors")
        out = env.outdir / "check.safetensors"
    merged = load_file(out)
    assert merged["empty"].shape == (2**61, 0)
    assert merged["w"].shape == (4, 2)


# ----------------------------------------------------------------------------------------------- non-regular files


@pytest.mark.parametrize("name", ["x.safetensors", "x.bin", "model.safetensors.index.json"])
def test_fifo_given_as_an_input_is_refused_without_blocking(env, name):
    fifo = env.inp / name
    os.mkfifo(fifo)
    out = env.outdir / "merged.safetensors"
    result = run_cli("merge", "-q", "--method", "average", "--model", env.a, "--model", fifo, "--out", out,
                     timeout=60)
    line = assert_one_error_line(result.returncode, result.stderr, (name, "not a regular file"), result.stderr)
    assert line
    assert not out.exists()
    no_leftovers(out)
    result = run_cli("inspect", fifo, timeout=60)
    assert_one_error_line(result.returncode, result.stderr, (name, "not a regular file"), result.stderr)


def test_fifo_as_a_shard_is_refused_without_blocking(env):
    t = good_tensors(6)
    root = env.inp / "sharded"
    root.mkdir()
    save_file({"w": t["w"]}, root / "model-00001-of-00002.safetensors")
    os.mkfifo(root / "model-00002-of-00002.safetensors")
    weight_map = {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                  "ids": "model-00002-of-00002.safetensors"}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    result = run_cli("inspect", root, timeout=60)
    assert_one_error_line(result.returncode, result.stderr, ("model-00002-of-00002.safetensors",), result.stderr)


@pytest.mark.parametrize("where", ["zarr.json", "chunk"])
def test_fifo_inside_a_store_is_refused_without_blocking(env, where):
    store = env.inp / "a.store"
    api.convert(env.a, store)
    manifest = json.loads((store / "blockmerge.json").read_text())
    array = store / next(e["path"] for e in manifest["tensors"] if e["name"] == "w")
    victim = array / "zarr.json" if where == "zarr.json" else sorted(p for p in (array / "c").rglob("*")
                                                                     if p.is_file())[0]
    victim.unlink()
    os.mkfifo(victim)
    for args in (["inspect", store], ["export", store, env.outdir / "x.safetensors"]):
        result = run_cli(*args, timeout=60)
        assert_one_error_line(result.returncode, result.stderr, (victim.name, "'w'", "not a regular file"),
                              result.stderr)
    assert not (env.outdir / "x.safetensors").exists()


# ----------------------------------------------------------------------------------------------- sizes


SIZES = ["1e400", "inf", "nan", "-1", "0", "1e-400", "0.5", "1e300", "2EiB"]


@pytest.mark.parametrize("value", SIZES)
def test_parse_size_refuses_what_is_no_size(value):
    with pytest.raises(BlockmergeError) as err:
        parse_size(value)
    assert value in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("value", [0, -5, 2**70, True, 1.5])
def test_parse_size_refuses_numbers_that_are_no_size(value):
    with pytest.raises(BlockmergeError):
        parse_size(value)


def test_parse_size_reads_sizes():
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("1e9") == 10**9
    assert parse_size(64) == 64
    assert parse_size("1EiB") == 2**60


@pytest.mark.parametrize("option", ["--block-size", "--max-shard-size"])
@pytest.mark.parametrize("value", ["1e400", "nan", "1e300"])
def test_size_options_of_merge(env, option, value):
    env.refused(env.merge_args(env.a, env.b, extra=(option, value)), value, option[2:].replace("-", "_"))


def test_size_options_of_export_and_stats(env):
    store = env.outdir / "store"
    exported = env.outdir / "x.safetensors"
    env.refused(["export", env.a, exported, "--max-shard-size", "1e400"], "1e400", "max_shard_size", out=exported)
    env.refused(["stats", "trimmed", "--model", env.a, "--base", env.b, "--out", store, "--block-size", "1e400"],
                "1e400", "block_size", out=store)
    env.refused(["stats", "gram", "--model", env.inp, "--data", env.a, "--out", store, "--max-memory", "1e400"],
                "1e400", "max_memory", out=store)


def test_api_size_arguments(env):
    for kwargs in ({"block_size": -64}, {"block_size": 0}, {"max_shard_size": float("inf")}):
        with pytest.raises(BlockmergeError):
            api.merge("average", [env.a, env.b], out=env.out, **kwargs)
    assert not env.out.exists()


# ----------------------------------------------------------------------------------------------- stores through ..


def test_store_paths_through_dotdot(env):
    """Stores named through `..` (relative or absolute) are read like any other."""
    api.convert(env.a, env.inp / "a.store")
    api.convert(env.b, env.inp / "b.store")
    sub = env.inp / "sub"
    sub.mkdir()
    expected = blockmerge.merge("average", [env.a, env.b])

    out = env.outdir / "m.safetensors"
    result = run_cli("merge", "-q", "--method", "average", "--model", "../a.store", "--model",
                     f"{sub}/../b.store", "--out", out, cwd=sub)
    assert result.returncode == 0, result.stderr
    got = load_file(out)
    assert all(torch.equal(got[n], expected[n]) for n in expected)

    exported = env.outdir / "e.safetensors"
    result = run_cli("export", "../a.store", exported, cwd=sub)
    assert result.returncode == 0, result.stderr
    assert all(torch.equal(load_file(exported)[n], load_file(env.a)[n]) for n in expected)

    result = run_cli("import", "../a.store", env.outdir / "copy.store", cwd=sub)
    assert result.returncode == 0, result.stderr
    result = run_cli("inspect", "../a.store", cwd=sub)
    assert result.returncode == 0, result.stderr

    got = blockmerge.merge("average", [env.inp / "sub" / ".." / "a.store", env.b])
    assert all(torch.equal(got[n], expected[n]) for n in expected)


# ----------------------------------------------------------------------------------------------- hub cache


def hub_cache(root: Path, repo: str, files: dict[str, bytes], revision: str = "0" * 40) -> Path:
    """`root/models--ORG--NAME` laid out as huggingface_hub lays it: blobs named by their sha256, the
    snapshot's files links into ../../blobs, refs/main naming the snapshot. Returns the snapshot."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo_dir / "blobs" / digest).write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snapshot


def model_files(tmp: Path, tensors: dict[str, torch.Tensor], sharded: bool) -> dict[str, bytes]:
    """The files of a Hugging Face model directory (config.json, one file or two shards and an index)."""
    files = {"config.json": json.dumps({"model_type": "toy"}).encode()}
    if not sharded:
        save_file(tensors, tmp / "one.safetensors")
        files["model.safetensors"] = (tmp / "one.safetensors").read_bytes()
        return files
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:1], "model-00002-of-00002.safetensors": names[1:]}
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, tmp / "shard.safetensors")
        files[shard] = (tmp / "shard.safetensors").read_bytes()
        weight_map.update(dict.fromkeys(members, shard))
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return files


@pytest.mark.parametrize("sharded", [True, False])
def test_hub_cache_snapshots_merge_in_place(tmp_path, sharded):
    cache, flat = tmp_path / "hub", tmp_path / "flat"
    flat.mkdir()
    snapshots, copies = [], []
    for i in range(3):
        files = model_files(tmp_path, good_tensors(30 + i), sharded)
        snapshots.append(hub_cache(cache, f"org/model{i}", files, revision=f"{i}" * 40))
        copies.append(flat / f"model{i}")
        copies[-1].mkdir()
        for name, data in files.items():
            (copies[-1] / name).write_bytes(data)
    assert all((s / "config.json").is_symlink() for s in snapshots)

    outs = {}
    for kind, dirs in (("cache", snapshots), ("flat", copies)):
        outs[kind] = tmp_path / f"out-{kind}"
        result = run_cli("merge", "-q", "--method", "ties", "--base", dirs[0], "--model", dirs[1], "--model",
                         dirs[2], "--out", outs[kind], "--format", "hf")
        assert result.returncode == 0, result.stderr
    got, want = load_file(outs["cache"] / "model.safetensors"), load_file(outs["flat"] / "model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert (outs["cache"] / "config.json").read_bytes() == (outs["flat"] / "config.json").read_bytes()
    assert not (outs["cache"] / "config.json").is_symlink()


def test_hub_cache_link_escaping_the_repo_is_refused(env):
    files = model_files(env.tmp, good_tensors(40), sharded=True)
    snapshot = hub_cache(env.inp / "hub", "org/model", files)
    outside = env.inp / "outside.safetensors"
    shard = snapshot / "model-00002-of-00002.safetensors"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(Path("..") / ".." / ".." / ".." / outside.name)
    assert shard.resolve() == outside
    env.refused_merge(snapshot, "model-00002-of-00002.safetensors")
    other = hub_cache(env.inp / "hub", "org/other", files)
    shard.unlink()
    shard.symlink_to(Path("..") / ".." / ".." / other.parent.parent.name / "snapshots" / other.name / shard.name)
    assert shard.resolve().is_file()
    env.refused_merge(snapshot, "model-00002-of-00002.safetensors")


def test_index_linking_a_shard_outside_a_plain_directory_is_refused(env):
    t = good_tensors(41)
    root = env.inp / "plain"
    root.mkdir()
    save_file(t, env.inp / "elsewhere.safetensors")
    (root / "model.safetensors").symlink_to(env.inp / "elsewhere.safetensors")
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(t,
                                                                                              "model.safetensors")}))
    env.refused_merge(root, "model.safetensors")
