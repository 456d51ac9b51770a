"""PEFT LoRA adapters read as the models they make: the base's tensors with W + s·B·A, row block by row block.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`. For a LoRA update of module M
(keys `base_model.model.M.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]) the model's `M.weight` is
W + s B A, with s = lora_alpha / r (lora_alpha / √r under `use_rslora`; `alpha_pattern` may give a module its
own alpha); it is (B A)ᵀ for `fan_in_fan_out` layers (GPT-2's Conv1D) and for embeddings (`lora_embedding_A`
[r, rows], `lora_embedding_B` [dim, r]). `lora_B.bias` adds s times itself to `M.bias`. Any other tensor of the
adapter (`modules_to_save`, trained biases) replaces the base's tensor of the same name.

Rows start:stop of an updated matrix need rows start:stop of B (or columns of A) and the whole of the other
factor, so reading a block never holds more than the block and one factor. The update is formed in float64
and the sum rounded once, to float32 where the base is narrower: a LoRA update is far smaller than the weight
it changes, and bfloat16 would round most of it away.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BlockmergeError
from .sources import Checkpoint, SafetensorsCheckpoint, open_checkpoint

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

FACTORS = {  # key suffix -> (factor, is an embedding's)
    ".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True),
}


@dataclass(frozen=True)
class LowRankUpdate:
    """ΔW = scale · B A (transposed: scale · (B A)ᵀ) with A and B tensors of the adapter file."""

    a: str
    b: str
    scale: float
    transposed: bool


@dataclass(frozen=True)
class AdapterLayout:
    """What an adapter does to the base's tensors, by base tensor name."""

    updates: dict[str, LowRankUpdate]
    bias_updates: dict[str, tuple[str, float]]  # M.bias -> (M.lora_B.bias, scale)
    replaced: dict[str, str]  # base tensor -> the adapter's tensor
    config: dict


def is_adapter(path: object) -> bool:
    """Whether `path` is a PEFT adapter directory (False for a name the OS cannot look up: its opener says why)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    try:
        return (Path(path) / CONFIG_FILE).is_file()
    except OSError:
        return False


def adapter_base(directory: Path) -> str | None:
    """The adapter's base model where its config names a local directory, else None."""
    name = _config(directory).get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        return None
    try:
        return name if Path(name).is_dir() else None
    except OSError:
        return None


def _config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BlockmergeError(f"cannot read the adapter config ({err})", path=path) from None
    if not isinstance(config, dict):
        raise BlockmergeError("the adapter config is not a JSON object", path=path)
    return config


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rule: the first pattern matching the end of the module's name (at a dot) gives its value."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_layout(directory: Path, weights: Checkpoint) -> AdapterLayout:
    """The updates an adapter makes, from its config and the names and shapes of its tensors."""
    config = _config(directory)
    where = directory / CONFIG_FILE
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise BlockmergeError(f"peft_type {peft_type} is not supported (LoRA adapters are)", path=where)
    if config.get("use_dora"):
        raise BlockmergeError("DoRA adapters (use_dora) are not supported", path=where)
    try:
        alpha = float(config.get("lora_alpha", 8))
        alpha_pattern = dict(config.get("alpha_pattern") or {})
        rslora = bool(config.get("use_rslora", False))
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    except (TypeError, ValueError) as err:
        raise BlockmergeError(f"bad LoRA setting ({err})", path=where) from None
    factors: dict[str, dict[str, str]] = {}
    embedding: dict[str, bool] = {}
    bias_keys, replaced = {}, {}
    for key in weights.specs:
        if not key.startswith(PREFIX):
            raise BlockmergeError(f"not a PEFT adapter tensor (its name does not start with {PREFIX!r})",
                                  path=weights.label, param=key)
        name = key[len(PREFIX):]
        suffix = next((s for s in FACTORS if name.endswith(s)), None)
        if suffix is not None:
            module = name[:-len(suffix)]
            factor, is_embedding = FACTORS[suffix]
            factors.setdefault(module, {})[factor] = key
            embedding[module] = is_embedding
        elif name.endswith(".lora_B.bias"):
            bias_keys[name[:-len(".lora_B.bias")]] = key
        elif ".lora_" in name:
            raise BlockmergeError("unknown LoRA tensor", path=weights.label, param=key)
        else:  # a layer LoRA wraps is saved under `base_layer` (an embedding PEFT saves whole)
            replaced[name.replace(".base_layer.", ".")] = key
    updates = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise BlockmergeError(f"module {module!r} has lora_{next(iter(pair))} without its other factor",
                                  path=weights.label)
        a, b = weights.specs[pair["A"]], weights.specs[pair["B"]]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise BlockmergeError(f"LoRA factors of shapes {list(a.shape)} and {list(b.shape)} are not a rank-r "
                                  "pair of matrices (LoRA on convolutions is not supported)",
                                  path=weights.label, param=pair["A"])
        rank = a.shape[0]
        module_alpha = float(_pattern_value(alpha_pattern, module, alpha))
        scale = module_alpha / (math.sqrt(rank) if rslora else rank)
        updates[f"{module}.weight"] = LowRankUpdate(pair["A"], pair["B"], scale,
                                                     embedding[module] or fan_in_fan_out)
    bias_updates = {}
    for module, key in bias_keys.items():
        if f"{module}.weight" not in updates:
            raise BlockmergeError("lora_B.bias without the module's LoRA factors", path=weights.label, param=key)
        bias_updates[f"{module}.bias"] = (key, updates[f"{module}.weight"].scale)
    return AdapterLayout(updates, bias_updates, replaced, config)


def update_shape(update: LowRankUpdate, weights: Checkpoint) -> tuple[int, int]:
    """The shape of the matrix an update changes."""
    a, b = weights.specs[update.a].shape, weights.specs[update.b].shape
    return (a[1], b[0]) if update.transposed else (b[0], a[1])


class AdapterCheckpoint(Checkpoint):
    """The model an adapter makes of `base`: its tensors, with the adapter's updates and replacements."""

    assembled = True

    def __init__(self, base: Checkpoint, weights: Checkpoint, layout: AdapterLayout, label: str, directory: Path):
        self.label, self.base, self.weights, self.layout, self.directory = label, base, weights, layout, directory
        self.specs = dict(base.specs)
        self.files = list(base.files)
        self._factors: tuple[tuple[str, tuple[str, ...]] | None, tuple[torch.Tensor, ...]] = (None, ())
        changed = {**layout.updates, **layout.bias_updates, **layout.replaced}
        for name in changed:
            if name not in base.specs:
                raise BlockmergeError(f"the adapter changes a tensor the base ({base.label}) does not have",
                                      path=directory, param=name)
        for name, update in layout.updates.items():
            shape = update_shape(update, weights)
            if tuple(base.specs[name].shape) != shape:
                raise BlockmergeError(f"the LoRA update is {list(shape)}, the base's tensor "
                                      f"{list(base.specs[name].shape)}", path=directory, param=name)
        for name, (key, _) in layout.bias_updates.items():
            if tuple(weights.specs[key].shape) != tuple(base.specs[name].shape):
                raise BlockmergeError(f"lora_B.bias is {list(weights.specs[key].shape)}, the base's bias "
                                      f"{list(base.specs[name].shape)}", path=directory, param=name)
        for name, key in layout.replaced.items():
            spec = weights.specs[key]
            if tuple(spec.shape) != tuple(base.specs[name].shape):
                raise BlockmergeError(f"the adapter's tensor is {list(spec.shape)}, the base's "
                                      f"{list(base.specs[name].shape)}", path=directory, param=name)

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        layout = self.layout
        if name in layout.replaced:
            rows = self.weights.read(layout.replaced[name], start, stop)
        else:
            rows = self.base.read(name, start, stop)
        if name in layout.updates:
            return _widened(rows.to(torch.float64).add_(self.delta(name, start, stop)), rows.dtype)
        if name in layout.bias_updates:
            key, scale = layout.bias_updates[name]
            bias = self.weights.read(key, start, stop).to(torch.float64)
            return _widened(rows.to(torch.float64).add_(bias, alpha=scale), rows.dtype)
        return rows

    def delta(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the update of tensor `name`, float64."""
        update = self.layout.updates[name]
        if update.transposed:  # rows of (B A)ᵀ = (columns of A)ᵀ Bᵀ
            a, b = self._whole_factors(name, update.a, update.b)
            return (a[:, start:stop].T @ b.T).mul_(update.scale)
        (a,) = self._whole_factors(name, update.a)
        b = self.weights.read(update.b, start, stop).to(torch.float64)
        return (b @ a).mul_(update.scale)

    def _whole_factors(self, name: str, *keys: str) -> tuple[torch.Tensor, ...]:
        """The factors `keys` whole in float64, kept for the next row blocks of tensor `name` (one tensor's at a
        time, replaced in one assignment, so a thread reading meanwhile sees the old pair or the new one)."""
        kept, factors = self._factors
        if kept != (name, keys):
            factors = tuple(self.weights.read(k, 0, self.weights.specs[k].shape[0]).to(torch.float64) for k in keys)
            self._factors = ((name, keys), factors)
        return factors

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_factors": (None, ())}  # a copy sent elsewhere reads its own

    def prefetch(self, name: str, start: int, stop: int) -> None:
        if name in self.layout.replaced:
            self.weights.prefetch(self.layout.replaced[name], start, stop)
        else:
            self.base.prefetch(name, start, stop)

    def checksum(self, name: str) -> tuple[str, str] | None:
        changed = name in self.layout.updates or name in self.layout.bias_updates or name in self.layout.replaced
        return None if changed else self.base.checksum(name)

    def paths(self) -> list[Path]:
        return sorted({*self.base.paths(), *self.weights.paths(), self.directory / CONFIG_FILE})

    def inputs(self) -> list[Checkpoint]:
        return [self.base, self.weights]

    def over(self, inputs: list[Checkpoint]) -> Checkpoint:
        return AdapterCheckpoint(inputs[0], inputs[1], self.layout, self.label, self.directory)


def _widened(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return values.to(dtype if torch.finfo(dtype).bits >= 32 else torch.float32)


def open_adapter(directory: Path, base: Checkpoint, label: str) -> AdapterCheckpoint:
    """The model the PEFT adapter in `directory` makes of `base`."""
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        problem = ("adapter_model.bin is pickled; convert it to adapter_model.safetensors"
                   if (directory / "adapter_model.bin").is_file() else f"no {WEIGHTS_FILE}")
        raise BlockmergeError(problem, path=directory)
    weights = SafetensorsCheckpoint(weights_path)
    return AdapterCheckpoint(base, weights, read_layout(directory, weights), label, directory)


def open_model(source: object, label: str, base: Checkpoint | None, repo: str | Path | None = None) -> Checkpoint:
    """`open_checkpoint`, except that a PEFT adapter directory opens as the model it makes of `base` (without
    one, of the local directory its config names as its base)."""
    if not is_adapter(source):
        return open_checkpoint(source, label, repo=repo)
    directory = Path(source)
    if base is None:
        local = adapter_base(directory)
        if local is None:
            raise BlockmergeError("a LoRA adapter is merged over its base model: give the base (--base), or a "
                                  "base_model_name_or_path in adapter_config.json that is a local directory",
                                  path=directory)
        base = open_checkpoint(local, "base")
    if isinstance(base, AdapterCheckpoint):
        raise BlockmergeError("the base is itself an adapter: give the model it adapts", path=base.label)
    return open_adapter(directory, base, str(directory))
