"""Formats: bit-exact round trips between safetensors, shards, HF directories, PyTorch files and stores;
merged outputs in every format; provenance and store checksums.

Every check uses real files under tmp_path and an independent reference: `safetensors.torch`
(save_file / load_file / safe_open), `torch.save`, `zarr`, `blake3` and `hashlib`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import blake3
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import blockmerge
from blockmerge import api
from blockmerge.cli import main

HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------------------------- helpers


def all_dtype_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """One tensor per supported dtype, with a 0-d scalar, 1-D, 2-D, 3-D and an empty (0-row) tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        "f32.matrix": torch.randn(7, 5, generator=g),
        "f32.scalar": torch.randn((), generator=g),
        "f32.empty": torch.zeros(0, 4),
        "f16.vector": torch.randn(9, generator=g).half(),
        "bf16.cube": torch.randn(3, 2, 4, generator=g).bfloat16(),
        "f64.matrix": torch.randn(4, 3, generator=g, dtype=torch.float64),
        "f64.scalar": torch.tensor(-2.75, dtype=torch.float64),
        "i64.matrix": torch.randint(-(2**40), 2**40, (3, 4), generator=g),
        "i64.scalar": torch.tensor(123456789012, dtype=torch.int64),
        "i32.vector": torch.randint(-(2**30), 2**30, (6,), generator=g, dtype=torch.int32),
        "bool.matrix": torch.rand(5, 3, generator=g) > 0.5,
        "bool.empty": torch.zeros(0, dtype=torch.bool),
    }


def raw(t: torch.Tensor) -> bytes:
    """The raw (little-endian) bytes of a tensor."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def blake3_of(t: torch.Tensor) -> str:
    return blake3.blake3(raw(t)).hexdigest()


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same names, and per name the same dtype, shape and bytes."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        assert tuple(got.shape) == tuple(want.shape), name
        assert raw(got) == raw(want), f"{name}: bytes differ"


def load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory of safetensors shards (with or without an index), via safetensors only."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(load_file(path / shard))
        return out
    return load_file(path / "model.safetensors")


def manifest(store: Path) -> dict:
    return json.loads((store / "blockmerge.json").read_text())


def read_store(store: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """A store's tensors, exported to one safetensors file and read back with safetensors."""
    target = tmp / f"read-{store.name}-{len(list(tmp.iterdir()))}.safetensors"
    api.convert(store, target)
    return load_file(target)


def file_bytes(p: Path) -> bytes:
    return p.read_bytes()


def write_family(root: Path, dtype: torch.dtype, seed: int = 1, ints_differ: bool = True,
                 hf_base: bool = True) -> tuple[Path, list[Path], dict[str, torch.Tensor], list[dict]]:
    """A base and 3 fine-tuned models (base + small gaussian noise), as safetensors; the base as an HF dir.

    Integer and bool tensors differ between the models when `ints_differ`.
    """
    g = torch.Generator().manual_seed(seed)
    base = {
        "embed.weight": torch.randn(12, 6, generator=g).to(dtype),
        "layers.0.bias": torch.randn(6, generator=g).to(dtype),
        "layers.1.weight": torch.randn(4, 3, 2, generator=g).to(dtype),
        "norm.scale": torch.randn((), generator=g).to(dtype),
        "position_ids": torch.arange(12, dtype=torch.int64),
        "token_type": torch.arange(5, dtype=torch.int32),
        "mask": torch.tensor([True, False, True, True]),
    }
    models = []
    for t in range(3):
        m = {}
        for name, x in base.items():
            if x.is_floating_point():
                m[name] = (x.float() + 0.05 * torch.randn(x.shape, generator=g)).to(dtype)
            elif ints_differ and x.dtype == torch.bool:
                m[name] = x ^ torch.tensor([t % 2 == 0, True, False, t == 1])
            elif ints_differ:
                m[name] = x + 100 * (t + 1)
            else:
                m[name] = x.clone()
        models.append(m)
    root.mkdir(parents=True, exist_ok=True)
    if hf_base:
        base_path = root / "base"
        base_path.mkdir()
        save_file(base, base_path / "model.safetensors")
        (base_path / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 6}))
        (base_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "vocab": {"a": 0}}))
    else:
        base_path = root / "base.safetensors"
        save_file(base, base_path)
    paths = []
    for t, m in enumerate(models):
        p = root / f"model{t}.safetensors"
        save_file(m, p)
        paths.append(p)
    return base_path, paths, base, models


def invoke(args: list) -> object:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


# ----------------------------------------------------------------------------------------------- 1. round trips


@pytest.mark.parametrize("via", ["api", "cli"])
def test_safetensors_to_store_to_safetensors_is_bit_exact(tmp_path, via):
    tensors = all_dtype_tensors()
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    store, back = tmp_path / "store", tmp_path / "back.safetensors"
    if via == "api":
        api.convert(src, store)
        api.convert(store, back)
    else:
        invoke(["import", src, store])
        invoke(["export", store, back])
    assert (store / "blockmerge.json").is_file()
    entries = {e["name"]: e for e in manifest(store)["tensors"]}
    assert sorted(entries) == sorted(tensors)
    for name, t in tensors.items():
        assert entries[name]["shape"] == list(t.shape)
        assert entries[name]["dtype"] == str(t.dtype).removeprefix("torch.")
    assert_same_tensors(load_file(back), tensors)
    # the exported file is a plain safetensors file: safe_open sees the same names and dtypes
    with safe_open(back, "pt") as f:
        assert sorted(f.keys()) == sorted(tensors)


def test_store_reads_back_as_merge_input_bit_exact(tmp_path):
    """A store used as the single model of an average gives back its tensors (ints copied, floats averaged
    in float64, which holds every input dtype exactly)."""
    tensors = all_dtype_tensors(3)
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    api.convert(src, tmp_path / "store")
    out = blockmerge.merge("average", [tmp_path / "store"], compute_dtype="float64")
    assert_same_tensors(out, tensors)


def test_store_to_sharded_safetensors_directory(tmp_path):
    tensors = all_dtype_tensors(1)
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    store = tmp_path / "store"
    api.convert(src, store)
    shards = tmp_path / "shards"
    invoke(["export", store, shards, "--format", "safetensors", "--max-shard-size", "64B"])
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert sorted(weight_map) == sorted(tensors)
    files = sorted(set(weight_map.values()))
    assert len(files) >= 3, files
    on_disk = sorted(p.name for p in shards.glob("*.safetensors"))
    assert on_disk == files, "every shard is listed and every listed shard exists"
    merged: dict[str, torch.Tensor] = {}
    for shard in files:
        loaded = load_file(shards / shard)
        assert sorted(loaded) == sorted(n for n, s in weight_map.items() if s == shard)
        merged.update(loaded)
    assert_same_tensors(merged, tensors)
    if "total_size" in index.get("metadata", {}):
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # and the index reads back
    assert_same_tensors(blockmerge.merge("average", [shards / "model.safetensors.index.json"],
                                         compute_dtype="float64"), tensors)


@pytest.mark.parametrize("fmt,shard_size", [("safetensors", "64B"), ("hf", "5GB")], ids=["shards", "hf-one-file"])
def test_directories_blockmerge_writes_read_back_as_inputs(tmp_path, fmt, shard_size):
    """A safetensors / hf directory written by blockmerge is itself a valid checkpoint directory."""
    tensors = all_dtype_tensors(11)
    src = tmp_path / "src"
    src.mkdir()
    save_file(tensors, src / "model.safetensors")
    (src / "config.json").write_text("{}")
    out = tmp_path / "out"
    api.convert(src, out, format=fmt, max_shard_size=shard_size)
    api.convert(out, tmp_path / "again.safetensors")
    assert_same_tensors(load_file(tmp_path / "again.safetensors"), tensors)


def test_hf_directory_export_copies_config_and_tokenizer(tmp_path):
    tensors = all_dtype_tensors(2)
    hf = tmp_path / "hf_src"
    hf.mkdir()
    save_file(tensors, hf / "model.safetensors")
    config = json.dumps({"model_type": "toy", "vocab_size": 7}).encode()
    tokenizer = json.dumps({"model": {"vocab": {"x": 0, "y": 1}}}).encode()
    (hf / "config.json").write_bytes(config)
    (hf / "tokenizer.json").write_bytes(tokenizer)

    store = tmp_path / "store"
    invoke(["import", hf, store])
    out = tmp_path / "hf_out"
    invoke(["export", store, out, "--format", "hf", "--max-shard-size", "1KB"])
    assert (out / "config.json").read_bytes() == config
    assert (out / "tokenizer.json").read_bytes() == tokenizer
    assert_same_tensors(load_safetensors_dir(out), tensors)

    # straight from the HF directory too, forced into several shards
    out2 = tmp_path / "hf_out2"
    api.convert(hf, out2, format="hf", max_shard_size=100)
    assert (out2 / "config.json").read_bytes() == config
    assert (out2 / "tokenizer.json").read_bytes() == tokenizer
    assert (out2 / "model.safetensors.index.json").is_file()
    assert_same_tensors(load_safetensors_dir(out2), tensors)


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pytorch_file_to_store(tmp_path, suffix):
    tensors = all_dtype_tensors(4)
    src = tmp_path / f"weights{suffix}"
    torch.save(tensors, src)
    store = tmp_path / "store"
    invoke(["import", src, store])
    assert_same_tensors(read_store(store, tmp_path), tensors)


def test_hf_directory_with_pytorch_model_bin(tmp_path):
    tensors = all_dtype_tensors(5)
    hf = tmp_path / "hf"
    hf.mkdir()
    torch.save(tensors, hf / "pytorch_model.bin")
    (hf / "config.json").write_text('{"model_type": "toy"}')
    out = tmp_path / "out"
    api.convert(hf, out, format="hf")
    assert (out / "config.json").read_text() == '{"model_type": "toy"}'
    assert_same_tensors(load_safetensors_dir(out), tensors)


def test_hf_sharded_index_input(tmp_path):
    tensors = all_dtype_tensors(6)
    names = sorted(tensors)
    hf = tmp_path / "hf"
    hf.mkdir()
    groups = [names[0::3], names[1::3], names[2::3]]
    weight_map = {}
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, hf / shard)
        weight_map.update(dict.fromkeys(group, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    # the index file itself
    store = tmp_path / "store"
    api.convert(hf / "model.safetensors.index.json", store)
    assert_same_tensors(read_store(store, tmp_path), tensors)
    # the directory holding it
    single = tmp_path / "single.safetensors"
    api.convert(hf, single)
    assert_same_tensors(load_file(single), tensors)
    info = api.inspect(hf / "model.safetensors.index.json")
    assert sorted(info["tensors"]) == names
    for name, t in tensors.items():
        assert info["tensors"][name]["shape"] == list(t.shape)
        assert info["tensors"][name]["bytes"] == t.numel() * t.element_size()


@pytest.mark.parametrize("codec", ["zstd", "blosc", "gzip"])
def test_compressed_store_reads_back_equal(tmp_path, codec):
    tensors = all_dtype_tensors(7)
    # compressible data too, so the codec has something to do
    tensors["f32.zeros"] = torch.zeros(64, 16)
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    store = tmp_path / "store"
    invoke(["import", src, store, "--codec", codec])
    # the codec is recorded in the arrays' zarr metadata
    codecs = set()
    for meta in (store / "arrays").glob("*/zarr.json"):
        codecs |= {c["name"] for c in json.loads(meta.read_text()).get("codecs", [])}
    assert codec in codecs
    assert_same_tensors(read_store(store, tmp_path), tensors)
    assert_same_tensors(blockmerge.merge("average", [store], compute_dtype="float64"), tensors)


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_store_array_is_readable_by_zarr(tmp_path, codec):
    tensors = {"w": torch.randn(33, 7, generator=torch.Generator().manual_seed(8)),
               "ids": torch.arange(10, dtype=torch.int64), "b": torch.randn(5).half()}
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    store = tmp_path / "store"
    api.convert(src, store, codec=codec)
    entries = {e["name"]: e for e in manifest(store)["tensors"]}
    for name in ("w", "ids"):
        path = entries[name]["path"]
        assert re.fullmatch(r"arrays/[0-9]{6}", path)
        array = zarr.open_array(store=str(store / path), mode="r")
        assert tuple(array.shape) == tuple(tensors[name].shape)
        data = np.asarray(array[...])
        assert data.dtype == tensors[name].numpy().dtype
        assert data.tobytes() == tensors[name].numpy().tobytes()


def test_empty_tensor_with_a_zero_inner_dimension(tmp_path):
    """Shapes like [3, 0] or [0, 0] hold no data but are valid safetensors tensors; a store must keep them."""
    tensors = {"rows_no_cols": torch.zeros(3, 0), "none": torch.zeros(0, 0, dtype=torch.int64),
               "ok": torch.ones(2, 2)}
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    api.convert(src, tmp_path / "store")
    api.convert(tmp_path / "store", tmp_path / "back.safetensors")
    assert_same_tensors(load_file(tmp_path / "back.safetensors"), tensors)


@settings(max_examples=12, deadline=None, database=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                           torch.bool]),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_property(tmp_path_factory, dtype, shape, seed):
    tmp = tmp_path_factory.mktemp("prop")
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        t = torch.rand(shape, generator=g) > 0.5
    elif dtype.is_floating_point:
        t = (torch.randn(shape, generator=g, dtype=torch.float64) * 1e3).to(dtype)
    else:
        t = torch.randint(-(2**31), 2**31 - 1, shape, generator=g).to(dtype)
    tensors = {"t": t, "other": torch.arange(3, dtype=torch.int32)}
    save_file(tensors, tmp / "src.safetensors")
    api.convert(tmp / "src.safetensors", tmp / "store")
    api.convert(tmp / "store", tmp / "back.safetensors")
    assert_same_tensors(load_file(tmp / "back.safetensors"), tensors)


def test_inspect_reports_names_shapes_dtypes(tmp_path):
    tensors = all_dtype_tensors(9)
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    api.convert(src, tmp_path / "store")
    for path in (src, tmp_path / "store"):
        result = invoke(["inspect", path, "--json"])
        info = json.loads(result.stdout)
        assert sorted(info["tensors"]) == sorted(tensors)
        for name, t in tensors.items():
            assert info["tensors"][name]["shape"] == list(t.shape)
            assert info["tensors"][name]["dtype"] == str(t.dtype).removeprefix("torch.")
        assert info["total_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())


# ----------------------------------------------------------------------------------------------- 2. merged outputs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("method,hp", [("average", {}), ("ties", {"density": 0.5})])
def test_merged_output_formats_match_in_memory(tmp_path, method, hp, dtype):
    base_path, model_paths, base, models = write_family(tmp_path / "in", dtype)
    kwargs = dict(base=base_path, block_size="1KiB", **hp)
    expected = blockmerge.merge(method, model_paths, **kwargs)

    # the merge did something: floats differ from the base and from every model, dtypes are kept
    for name, b in base.items():
        assert expected[name].dtype == b.dtype
        assert tuple(expected[name].shape) == tuple(b.shape)
    assert not torch.equal(expected["embed.weight"], base["embed.weight"])
    assert all(not torch.equal(expected["embed.weight"], m["embed.weight"]) for m in models)
    if method == "average":
        for name, b in base.items():
            if b.is_floating_point():
                mean = torch.stack([m[name].float() for m in models]).mean(0)
                torch.testing.assert_close(expected[name].float(), mean.to(dtype).float(), rtol=0.02, atol=1e-2)

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    store = out_dir / "merged-store"
    blockmerge.merge(method, model_paths, out=store, **kwargs)
    assert_same_tensors(read_store(store, tmp_path), expected)

    single = out_dir / "merged.safetensors"
    blockmerge.merge(method, model_paths, out=single, **kwargs)
    assert_same_tensors(load_file(single), expected)

    hf = out_dir / "merged-hf"
    blockmerge.merge(method, model_paths, out=hf, format="hf", max_shard_size="512B", **kwargs)
    assert_same_tensors(load_safetensors_dir(hf), expected)
    assert (hf / "config.json").read_bytes() == (base_path / "config.json").read_bytes()
    assert (hf / "tokenizer.json").read_bytes() == (base_path / "tokenizer.json").read_bytes()

    written = ["merged-store", "merged.safetensors", "merged-hf"]
    if method == "average":
        shards = out_dir / "merged-shards"
        blockmerge.merge(method, model_paths, out=shards, format="safetensors", max_shard_size="512B", **kwargs)
        assert_same_tensors(load_safetensors_dir(shards), expected)
        assert not (shards / "config.json").exists(), "format safetensors copies no config files"
        written.append("merged-shards")

    # nothing else was left next to the outputs
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(written)


def test_merged_output_via_cli_matches_in_memory(tmp_path):
    base_path, model_paths, _, _ = write_family(tmp_path / "in", torch.float32, seed=11)
    expected = blockmerge.merge("ties", model_paths, base=base_path, density=0.3, scaling_factor=0.8)
    out = tmp_path / "cli.safetensors"
    args = ["merge", "--method", "ties", "--base", base_path, "--set", "density=0.3", "--set",
            "scaling_factor=0.8", "--out", out, "--block-size", "4KiB", "-q"]
    for p in model_paths:
        args += ["--model", p]
    invoke(args)
    assert_same_tensors(load_file(out), expected)


def test_merge_accepts_mixed_input_formats(tmp_path):
    """The same family given as safetensors, store, .bin and HF directory merges to the same result."""
    base_path, model_paths, _, models = write_family(tmp_path / "in", torch.float32, seed=12)
    expected = blockmerge.merge("average", model_paths, base=base_path)
    store = tmp_path / "m0-store"
    api.convert(model_paths[0], store, codec="zstd")
    torch.save(models[1], tmp_path / "m1.bin")
    mixed = [store, tmp_path / "m1.bin", dict(models[2])]
    assert_same_tensors(blockmerge.merge("average", mixed, base=base_path), expected)


# ----------------------------------------------------------------------------------------------- 3. ints copied


def test_integer_and_bool_tensors_come_from_the_base(tmp_path):
    base_path, model_paths, base, models = write_family(tmp_path / "in", torch.float32, seed=2)
    for m in models:
        assert not torch.equal(m["position_ids"], base["position_ids"])
        assert not torch.equal(m["mask"], base["mask"])
    for method in ("average", "ties"):
        out = tmp_path / f"{method}.safetensors"
        blockmerge.merge(method, model_paths, base=base_path, out=out)
        merged = load_file(out)
        for name in ("position_ids", "token_type", "mask"):
            assert merged[name].dtype == base[name].dtype
            assert torch.equal(merged[name], base[name]), (method, name)


def test_integer_and_bool_tensors_come_from_the_first_model_without_base(tmp_path):
    _, model_paths, _, models = write_family(tmp_path / "in", torch.bfloat16, seed=3)
    assert not torch.equal(models[0]["position_ids"], models[1]["position_ids"])
    for order in ([0, 1, 2], [2, 0, 1]):
        paths = [model_paths[i] for i in order]
        first = models[order[0]]
        merged = blockmerge.merge("average", paths)
        store = tmp_path / f"store-{order[0]}"
        blockmerge.merge("average", paths, out=store)
        from_store = read_store(store, tmp_path)
        for name in ("position_ids", "token_type", "mask"):
            assert torch.equal(merged[name], first[name]), (order, name)
            assert torch.equal(from_store[name], first[name]), (order, name)


# ----------------------------------------------------------------------------------------------- 4. dtype


def test_dtype_sets_output_dtype_of_merged_floats(tmp_path):
    base_path, model_paths, base, _ = write_family(tmp_path / "in", torch.float32, seed=4)
    full = blockmerge.merge("average", model_paths, base=base_path)
    half = blockmerge.merge("average", model_paths, base=base_path, dtype="float16")
    for name, b in base.items():
        if b.is_floating_point():
            assert half[name].dtype == torch.float16, name
            # computed in float32, rounded once to float16
            assert raw(half[name]) == raw(full[name].to(torch.float16)), name
        else:
            assert half[name].dtype == b.dtype
            assert torch.equal(half[name], b)

    out = tmp_path / "half.safetensors"
    args = ["merge", "--method", "average", "--base", base_path, "--dtype", "float16", "--out", out, "-q"]
    for p in model_paths:
        args += ["--model", p]
    invoke(args)
    assert_same_tensors(load_file(out), half)


def test_dtype_float32_from_bf16_models(tmp_path):
    base_path, model_paths, base, _ = write_family(tmp_path / "in", torch.bfloat16, seed=5)
    default = blockmerge.merge("average", model_paths, base=base_path)
    wide = blockmerge.merge("average", model_paths, base=base_path, dtype="float32", out=tmp_path / "wide")
    assert wide.output
    wide_tensors = read_store(tmp_path / "wide", tmp_path)
    for name, b in base.items():
        if b.is_floating_point():
            assert default[name].dtype == torch.bfloat16
            assert wide_tensors[name].dtype == torch.float32
            assert raw(wide_tensors[name].to(torch.bfloat16)) == raw(default[name]), name
    entries = {e["name"]: e for e in manifest(tmp_path / "wide")["tensors"]}
    assert entries["embed.weight"]["dtype"] == "float32"
    assert entries["position_ids"]["dtype"] == "int64"


# ----------------------------------------------------------------------------------------------- 5. provenance


def _check_provenance(prov: dict, method: str, hp: dict, input_paths: list[Path]) -> None:
    assert prov["method"] == method
    for key, value in hp.items():
        assert prov["hyperparameters"][key] == value, key
    inputs = prov["inputs"]
    assert isinstance(inputs, list) and len(inputs) == len(input_paths)
    labels = [str(i["path"]) for i in inputs]
    for p in input_paths:
        assert any(label == str(p) or Path(label).name == p.name for label in labels), (p, labels)
    for item in inputs:
        sha_fields = {k: v for k, v in item.items() if "blake3" in k}
        assert sha_fields, item
        assert all(isinstance(v, str) and HEX64.match(v) for v in sha_fields.values()), item
    # different inputs, different digests
    digests = [next(v for k, v in sorted(i.items()) if "blake3" in k) for i in inputs]
    assert len(set(digests)) == len(digests)


def test_provenance_in_safetensors_header_and_store_manifest(tmp_path):
    base_path, model_paths, _, _ = write_family(tmp_path / "in", torch.float32, seed=6, hf_base=False)
    hp = {"density": 0.4, "scaling_factor": 0.7}
    single = tmp_path / "merged.safetensors"
    blockmerge.merge("ties", model_paths, base=base_path, out=single, **hp)
    with safe_open(single, "pt") as f:
        meta = f.metadata()
    prov_st = json.loads(meta["blockmerge"])
    _check_provenance(prov_st, "ties", hp, [*model_paths, base_path])
    roles = [i.get("role") for i in prov_st["inputs"]]
    assert roles.count("base") == 1

    store = tmp_path / "merged-store"
    blockmerge.merge("ties", model_paths, base=base_path, out=store, **hp)
    prov_store = manifest(store)["metadata"]
    _check_provenance(prov_store, "ties", hp, [*model_paths, base_path])
    # the same inputs read, the same digests, whatever the output format
    assert prov_store["inputs"] == prov_st["inputs"]
    assert prov_store["output_blake3"] == prov_st["output_blake3"]



def test_provenance_of_a_directory_output(tmp_path):
    base_path, model_paths, _, _ = write_family(tmp_path / "in", torch.float32, seed=7)
    out = tmp_path / "hf"
    blockmerge.merge("average", model_paths, base=base_path, out=out, format="hf", weights=[1, 2, 3])
    # the provenance JSON sits beside the shards (whatever its file name), never in the copied files
    candidates = [json.loads(p.read_text()) for p in out.glob("*.json")
                  if p.name not in {"config.json", "tokenizer.json", "model.safetensors.index.json"}]
    provs = [c for c in candidates if isinstance(c, dict) and "inputs" in c]
    assert len(provs) == 1, [p.name for p in out.iterdir()]
    prov = provs[0]
    assert prov["method"] == "average"
    assert [float(w) for w in prov["hyperparameters"]["weights"]] == [1.0, 2.0, 3.0]
    assert len(prov["inputs"]) >= len(model_paths)


# ----------------------------------------------------------------------------------------------- 6. checksums


def test_store_manifest_checksums_are_blake3_of_the_tensor_bytes(tmp_path):
    tensors = all_dtype_tensors(10)
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    store = tmp_path / "store"
    api.convert(src, store, codec="gzip")
    entries = manifest(store)["tensors"]
    assert sorted(e["name"] for e in entries) == sorted(tensors)
    for e in entries:
        assert e["blake3"] == blake3_of(tensors[e["name"]]), e["name"]


@pytest.mark.parametrize("corrupt", [False, True])
def test_a_store_with_sha256_checksums_is_checked_by_sha256(tmp_path, corrupt):
    """Stores written before BLAKE3 record sha256 checksums: they still read, and a wrong one is refused."""
    tensors = all_dtype_tensors(11)
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    store = tmp_path / "store"
    api.convert(src, store)
    doc = manifest(store)
    for e in doc["tensors"]:
        del e["blake3"]
        e["sha256"] = hashlib.sha256(raw(tensors[e["name"]])).hexdigest()
    victim = next(e for e in doc["tensors"] if e["name"] == "f32.matrix")
    if corrupt:
        victim["sha256"] = hashlib.sha256(b"other bytes").hexdigest()
    (store / "blockmerge.json").write_text(json.dumps(doc))
    out = tmp_path / "back.safetensors"
    if corrupt:
        with pytest.raises(blockmerge.BlockmergeError, match="checksum mismatch") as err:
            api.convert(store, out)
        assert "f32.matrix" in str(err.value)
        assert not out.exists()
    else:
        api.convert(store, out)
        assert_same_tensors(load_file(out), tensors)


def test_merged_store_checksums_match_its_tensors(tmp_path):
    base_path, model_paths, _, _ = write_family(tmp_path / "in", torch.bfloat16, seed=8)
    store = tmp_path / "store"
    blockmerge.merge("ties", model_paths, base=base_path, density=0.6, out=store)
    expected = read_store(store, tmp_path)  # exported, then read with safetensors
    entries = manifest(store)["tensors"]
    assert sorted(e["name"] for e in entries) == sorted(expected)
    for e in entries:
        assert e["blake3"] == blake3_of(expected[e["name"]]), e["name"]
