"""Shared fixtures: small model families written as real files."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]


def _missing_realistic_data() -> list[str]:
    path = REPO / "benchmarks" / "realistic" / "prerequisites.py"
    spec = importlib.util.spec_from_file_location("prerequisites", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.missing()


# What `needs(...)` markers may name, and how to list what of it is missing.
PREREQUISITES = {
    "git-lfs": lambda: [] if shutil.which("git-lfs") else ["git-lfs"],
    "realistic-data": _missing_realistic_data,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"needs(*names): prerequisites outside Python ({', '.join(PREREQUISITES)})")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stop with one line, before any test runs, when a collected test needs something not installed."""
    wanted = sorted({name for item in items for marker in item.iter_markers("needs") for name in marker.args})
    missing = [piece for name in wanted for piece in PREREQUISITES[name]()]
    if missing:
        pytest.exit(f"not installed: {', '.join(missing)} (bash scripts/test.sh installs them)", returncode=3)


SHAPES = {"embed.weight": (40, 16), "layer.0.attn.weight": (16, 16), "layer.0.norm": (16,),
          "layer.1.mlp.weight": (32, 16), "head.bias": (), "position_ids": (12,)}


def make_family(num_models: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 0.05,
                shapes: dict[str, tuple[int, ...]] = SHAPES) -> tuple[dict, list[dict]]:
    """A base and fine-tunes (base + Gaussian noise); `position_ids` is an int64 buffer."""
    g = torch.Generator().manual_seed(seed)
    base = {}
    for name, shape in shapes.items():
        base[name] = torch.arange(shape[0]) if name == "position_ids" else torch.randn(shape, generator=g).to(dtype)
    models = []
    for _ in range(num_models):
        models.append({n: (t + std * torch.randn(t.shape, generator=g)).to(dtype) if t.is_floating_point() else t
                       for n, t in base.items()})
    return base, models


def write_family(tmp: Path, base: dict, models: list[dict]) -> tuple[Path, list[Path]]:
    save_file(base, tmp / "base.safetensors")
    paths = []
    for i, m in enumerate(models):
        save_file(m, tmp / f"model{i}.safetensors")
        paths.append(tmp / f"model{i}.safetensors")
    return tmp / "base.safetensors", paths


@pytest.fixture
def family(tmp_path: Path):
    base, models = make_family()
    base_path, model_paths = write_family(tmp_path, base, models)
    return base, models, base_path, model_paths


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, Path]:
    """A base Llama (2 layers) saved by transformers and two fine-tunes of it (noise), as Hugging Face directories."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llamas")
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    base = load_file(root / "base" / "model.safetensors")
    dirs = {"base": root / "base"}
    for name, seed in (("a", 1), ("b", 2)):
        g = torch.Generator().manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(root / name)
        save_file({n: t + 0.02 * torch.randn(t.shape, generator=g) for n, t in base.items()},
                  root / name / "model.safetensors", metadata={"format": "pt"})
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def cluster():
    """A two-process Dask LocalCluster (one single-threaded worker each) and a client of it."""
    import logging

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.CRITICAL) as c, Client(c, set_as_default=False) as client:
        yield c, client
