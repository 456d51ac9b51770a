"""Store outputs: chunks no taller than the blocks written, so each chunk is written once, and the stored rows
equal the merge's."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

import blockmerge
from blockmerge.engine.store import StoreReader, StoreWriter, chunk_rows
from blockmerge.engine.tensors import TensorSpec

CHECKSUM = "0" * 64


def test_each_chunk_is_written_once(tmp_path):
    """Blocks of a third of a default chunk: every chunk file is created once (its inode never changes), where
    chunks of the default height would be rewritten by each block sharing them."""
    spec = TensorSpec((4 * 1024, 1024), "float32")
    step = chunk_rows(spec) // 3
    writer = StoreWriter(tmp_path, {("param", "x"): spec}, write_rows={("param", "x"): step})
    full = torch.randn(spec.shape)
    chunks = tmp_path / writer.entries[("param", "x")].path / "c"
    seen: dict[str, int] = {}
    for start in range(0, spec.rows, step):
        writer.write("param", "x", start, full[start:start + step])
        for f in chunks.rglob("*"):
            if f.is_file():
                chunk = str(f.relative_to(chunks))
                assert seen.setdefault(chunk, os.stat(f).st_ino) == os.stat(f).st_ino, f"chunk {chunk} rewritten"
    writer.close()
    assert len(seen) == -(-spec.rows // step)
    writer.seal({("param", "x"): CHECKSUM}, {})
    assert torch.equal(StoreReader(tmp_path).read("x", 0, spec.rows), full)


def test_a_merged_store_is_chunked_by_its_blocks(tmp_path):
    """A 64 KiB block budget over two float32 models of 4 KiB rows: 8 rows per block, and so per chunk."""
    models = []
    for i in range(2):
        path = tmp_path / f"m{i}.safetensors"
        save_file({"w": torch.randn(256, 1024), "b": torch.randn(1024)}, path)
        models.append(path)
    out = tmp_path / "merged"
    blockmerge.merge("average", models, out=out, format="store", block_size=64 * 1024)
    manifest = json.loads((out / "blockmerge.json").read_text())
    entry = next(e for e in manifest["tensors"] if e["name"] == "w")
    grid = json.loads((out / entry["path"] / "zarr.json").read_text())["chunk_grid"]["configuration"]
    assert grid["chunk_shape"] == [8, 1024]
    expected = blockmerge.merge("average", models, block_size=64 * 1024)
    assert torch.equal(StoreReader(out).read("w", 0, 256), expected["w"])
