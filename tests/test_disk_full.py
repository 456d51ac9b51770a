"""A full disk (a file-size limit on the merging process) is a clear error that leaves nothing behind."""

from __future__ import annotations

import hashlib
import resource
import subprocess
import sys

import pytest
import torch
from conftest import write_family
from safetensors.torch import save_file


def limited(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("out_name", ["out.safetensors", "out.store", "out-hf"])
def test_disk_full_is_a_clear_error_and_cleans_up(tmp_path, out_name):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(512, 256, generator=g), "b": torch.randn(256, generator=g)}
    models = [{n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(2)]
    inputs = tmp_path / "in"
    inputs.mkdir()
    base_path, model_paths = write_family(inputs, base, models)
    (inputs / "config.json").write_text("{}")
    save_file(base, inputs / "model.safetensors")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs.iterdir()}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["merge", "-q", "--method", "average", "--model", str(model_paths[0]), "--model", str(model_paths[1]),
            "--out", str(out_dir / out_name), "--block-size", "64KiB"]
    if out_name == "out-hf":
        args += ["--format", "hf", "--base", str(inputs)]
    result = subprocess.run([sys.executable, "-m", "blockmerge", *args], capture_output=True, text=True,
                            preexec_fn=limited(20_000))  # under one store chunk (32 KiB)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left" in lines[0], result.stderr
    assert list(out_dir.iterdir()) == []
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs.iterdir()}
    rerun = subprocess.run([sys.executable, "-m", "blockmerge", *args], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
