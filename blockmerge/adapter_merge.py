"""LoRA adapters of one base merged into one adapter, by a method whose merge is linear in the models.

For such a method (task arithmetic, linear, average) the merge at a tensor is θ* = c_0 θ_0 + Σ_i c_i θ_i with
coefficients fixed by the hyperparameters there; with θ_i = θ_0 + s_i B_i A_i and c_0 + Σ_i c_i = 1 it is
θ_0 + Σ_i c_i s_i B_i A_i = θ_0 + [c_1 s_1 B_1 | … | c_N s_N B_N] [A_1; …; A_N]: an adapter of rank Σ r_i, exactly.
Truncated to rank k, the concatenated factors are reduced by the SVD of their product (through QR of each
factor, never forming the matrix), and the relative Frobenius error ‖ΔW − ΔW_k‖ / ‖ΔW‖ of each matrix is
reported. Tensors an adapter stores whole (`modules_to_save`, an embedding it saves) merge by the same
coefficients, the base standing in for adapters that do not store them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .engine.adapters import CONFIG_FILE, PREFIX, WEIGHTS_FILE, open_adapter
from .engine.durable import fsync_tree
from .engine.output import check_output
from .engine.sources import open_checkpoint
from .engine.tensors import torch_dtype
from .errors import BlockmergeError
from .plugins import get, parse_hyperparameters, registry
from .plugins.base import Block, Method
from .plugins.hyperparameters import places, resolve

REPORT_FILE = "blockmerge_adapter.json"
COEFFICIENT_SUM_TOLERANCE = 1e-9


def coefficients(method: Method, hyperparameters: Any, count: int) -> list[float]:
    """c_0 (the base's) and c_1 … c_count of a linear method's merge under resolved hyperparameters."""
    unit = torch.eye(count + 1, dtype=torch.float64)
    block = Block("coefficients", 0, count + 1, (count + 1,), [unit[i + 1] for i in range(count)], unit[0])
    return method.merge(block, hyperparameters, {}).tolist()


def merge_adapters(method: str, adapters: Sequence[str | os.PathLike], base: str | os.PathLike, out: str | os.PathLike,
                   *, rank: int | None = None, overwrite: bool = False, **hyperparameters: Any) -> dict[str, Any]:
    """Merge PEFT LoRA adapters of `base` into one adapter directory at `out` (exact, rank Σ r, or truncated to
    `rank`); the report written beside it (ranks, truncation errors)."""
    spec = get(method)
    if not spec.linear:
        linear = ", ".join(sorted(n for n, m in registry().items() if m.linear))
        raise BlockmergeError(f"{method}: its merge of adapters is no adapter (a low-rank update) in general; merge "
                              f"into a full model instead, or use one of: {linear}")
    if rank is not None and rank < 1:
        raise BlockmergeError(f"adapter rank must be at least 1, got {rank}")
    hp, _ = parse_hyperparameters(spec, hyperparameters)
    try:
        spec.validate(hp, len(adapters))
    except ValueError as err:
        raise BlockmergeError(f"{method}: {err}") from None
    target = _target(Path(out), [*adapters, base], overwrite)
    base_ckpt = open_checkpoint(base, "base")
    opened = [open_adapter(Path(a), base_ckpt, str(a)) for a in adapters]
    for adapter in opened:
        if adapter.layout.bias_updates:
            raise BlockmergeError("adapters with lora_B.bias (lora_bias) merge into a full model only",
                                  path=adapter.directory)
    tensors, report = {}, {"method": method, "rank": rank, "modules": {}}
    updated = sorted({n for a in opened for n in a.layout.updates})
    replaced = sorted({n for a in opened for n in a.layout.replaced})
    at = places(sorted({*updated, *replaced}))
    for name in updated:
        c = _coefficients(spec, hp, at[name], len(opened), name)
        b, a, transposed = _concatenated(opened, name, c[1:])
        if rank is not None and rank < b.shape[1]:
            b, a, error = truncated(b, a, rank)
        else:
            error = 0.0
        module = name.removesuffix(".weight")
        keys = ("lora_embedding_B", "lora_embedding_A") if _is_embedding(opened, name) else ("lora_B.weight",
                                                                                              "lora_A.weight")
        tensors[f"{PREFIX}{module}.{keys[0]}"] = b.to(torch.float32).contiguous()
        tensors[f"{PREFIX}{module}.{keys[1]}"] = a.to(torch.float32).contiguous()
        report["modules"][module] = {"rank": a.shape[0], "transposed": transposed, "relative_error": error}
    for name in replaced:
        c = _coefficients(spec, hp, at[name], len(opened), name)
        rows = base_ckpt.specs[name].shape[0] if base_ckpt.specs[name].shape else 1
        merged = base_ckpt.read(name, 0, rows).to(torch.float64) * c[0]
        for weight, adapter in zip(c[1:], opened):
            source = adapter.weights.read(adapter.layout.replaced[name], 0, rows) if name in adapter.layout.replaced \
                else base_ckpt.read(name, 0, rows)
            merged += source.to(torch.float64) * weight
        owner = next(a for a in opened if name in a.layout.replaced)
        key = owner.layout.replaced[name]
        tensors[key] = merged.to(torch_dtype(owner.weights.specs[key].dtype)).contiguous()
    report["relative_error"] = max((m["relative_error"] for m in report["modules"].values()), default=0.0)
    _write(target, tensors, _config(opened, report["modules"]), report, overwrite)
    return report


def _coefficients(spec: Method, hp: Any, place: Any, count: int, name: str) -> list[float]:
    c = coefficients(spec, resolve(hp, place), count)
    if abs(sum(c) - 1.0) > COEFFICIENT_SUM_TOLERANCE:
        raise BlockmergeError(f"{spec.name}: the merge's coefficients sum to {sum(c):.6g}, not 1, so it is not the "
                              "base plus a low-rank update (set normalize, or weights summing to 1)", param=name)
    return c


def _is_embedding(adapters: list, name: str) -> bool:
    return any(a.layout.updates[name].a.endswith("lora_embedding_A") for a in adapters if name in a.layout.updates)


def _concatenated(adapters: list, name: str, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """[c_1 s_1 B_1 | …] and [A_1; …] (float64) of every adapter that updates `name`, and whether ΔW = (B A)ᵀ."""
    bs, as_, kinds = [], [], set()
    for weight, adapter in zip(weights, adapters):
        update = adapter.layout.updates.get(name)
        if update is None:
            continue
        kinds.add(update.transposed)
        a_spec, b_spec = adapter.weights.specs[update.a], adapter.weights.specs[update.b]
        as_.append(adapter.weights.read(update.a, 0, a_spec.shape[0]).to(torch.float64))
        bs.append(adapter.weights.read(update.b, 0, b_spec.shape[0]).to(torch.float64) * (weight * update.scale))
    if len(kinds) > 1:
        raise BlockmergeError("the adapters disagree on whether the update is transposed (fan_in_fan_out)",
                              param=name)
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0), kinds.pop()


def truncated(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factors of the best rank-`rank` approximation of B A (float64), and its relative Frobenius error."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    total = float(s.square().sum())
    error = math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0
    return q_b @ (u[:, :rank] * s[:rank]), vh[:rank] @ q_a.T, error


def _config(adapters: list, modules: dict[str, dict]) -> dict:
    """The merged adapter's config: each module's own rank and alpha = rank (scale 1, the factors carry it)."""
    first = adapters[0].layout.config
    ranks = [m["rank"] for m in modules.values()]
    common = max(set(ranks), key=ranks.count) if ranks else 8
    exact = {re.escape(module): m["rank"] for module, m in modules.items() if m["rank"] != common}
    saved = sorted({m for a in adapters for m in (a.layout.config.get("modules_to_save") or [])})
    keep = {k: first[k] for k in ("base_model_name_or_path", "task_type", "revision") if k in first}
    return {**keep, "peft_type": "LORA", "r": common, "lora_alpha": common, "rank_pattern": exact,
            "alpha_pattern": dict(exact), "use_rslora": False, "use_dora": False, "bias": "none",
            "fan_in_fan_out": any(a.layout.config.get("fan_in_fan_out") for a in adapters),
            "target_modules": sorted(modules), "modules_to_save": saved or None, "lora_dropout": 0.0,
            "inference_mode": True, "init_lora_weights": True}


def _target(out: Path, inputs: list, overwrite: bool) -> Path:
    """OUT, checked: no input, and nothing there unless `overwrite` and it is an adapter this module wrote."""
    if not out.exists():
        return check_output(out, format="hf", inputs=inputs)
    if not overwrite:
        raise BlockmergeError("output already exists (pass --overwrite to replace it)", path=out)
    if any(os.path.realpath(out) == os.path.realpath(i) for i in inputs):
        raise BlockmergeError("the output is one of the inputs", path=out)
    if not (out / REPORT_FILE).is_file():
        raise BlockmergeError(f"exists and is not a merged adapter (no {REPORT_FILE}); --overwrite replaces only "
                              "those", path=out)
    return out


def _write(target: Path, tensors: dict[str, torch.Tensor], config: dict, report: dict, overwrite: bool) -> None:
    """The adapter directory, complete or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        save_file(tensors, str(work / WEIGHTS_FILE), metadata={"format": "pt"})
        (work / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (work / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        fsync_tree(work)
        if target.exists() and overwrite:
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.rename(target, old)
            os.rename(work, target)
            shutil.rmtree(old)
        else:
            os.rename(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise

