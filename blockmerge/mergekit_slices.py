"""mergekit's `slices`: output layers taken from layer ranges of the input models (a frankenmerge when each
slice has one source), and every setting evaluated per output tensor as mergekit evaluates it.

Slice s with sources of L_s layers gives output layers offset_s … offset_s + L_s − 1, in order. The sources
at position k of every slice form one input model (a `RenamedCheckpoint` under the output's names);
tensors outside the layers come from the first slice's sources (embeddings) or the last slice's (the
final norm, the head). A setting is looked up in the source's `parameters`, then the slice's, then the
top level; a list of numbers is a gradient over the slice's layers (t = i / (L_s − 1), 1 where L_s = 1;
0 outside the layers) and filters match the tensor's input name (for per-model settings) or output name.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine.sources import Checkpoint, RenamedCheckpoint, copy_model_files, open_checkpoint
from .errors import BlockmergeError

LAYER = re.compile(r"\.(\d+)\.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class Source:
    path: str
    start: int
    stop: int
    parameters: dict[str, Any]


@dataclass
class OutputSlice:
    sources: list[Source]
    parameters: dict[str, Any]
    base: str | None


@dataclass
class Place:
    """Where an output tensor comes from in one input model: its slice, its input name, and t."""

    slice: int
    name: str
    t: float


def evaluate(setting: Any, name: str, t: float) -> Any:
    """A mergekit setting's value for the tensor `name` at gradient position t (None: no rule matches)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(v, dict) for v in setting):
        for rule in setting:
            pattern = rule.get("filter")
            if pattern is None or pattern == "*" or pattern in name:
                return evaluate(rule.get("value"), name, t)
        return None
    if isinstance(setting, list) and setting:
        if len(setting) == 1:
            return float(setting[0])
        position = t * (len(setting) - 1)
        low = int(position)
        high = min(len(setting) - 1, low + 1)
        fraction = position - low
        return (1 - fraction) * float(setting[low]) + fraction * float(setting[high])
    return setting


def _layers(ckpt: Checkpoint) -> tuple[str, dict[int, list[str]], list[str]]:
    """The checkpoint's layer prefix, its layers' name suffixes by index, and its other tensors' names."""
    prefix, layers, others = None, {}, []
    for name in ckpt.specs:
        match = LAYER.search(name)
        if match is None or (prefix is not None and name[:match.start() + 1] != prefix):
            others.append(name)
            continue
        prefix = name[:match.start() + 1]
        layers.setdefault(int(match.group(1)), []).append(name[match.end():])
    if prefix is None:
        raise BlockmergeError("mergekit config: slices need numbered layers (names like model.layers.0.…)",
                              path=ckpt.label)
    return prefix, layers, others


@dataclass
class SlicedModels:
    """The input models assembled from the slices, and where each of their output tensors comes from."""

    models: list[RenamedCheckpoint]
    base: RenamedCheckpoint | None
    places: list[dict[str, Place]]
    slices: list[OutputSlice]
    top: dict[str, Any]
    layers: int
    workdir: tempfile.TemporaryDirectory = field(repr=False)

    def per_model(self, name: str, default: Any = None) -> list[Any]:
        """Each model's per-model setting, as one value or per-tensor rules."""
        out = []
        for k, places in enumerate(self.places):
            values = {}
            for out_name, place in places.items():
                piece = self.slices[place.slice]
                for level in (piece.sources[k].parameters, piece.parameters, self.top):
                    value = evaluate(level.get(name), place.name, place.t)
                    if value is not None:
                        values[out_name] = value
                        break
            out.append(_as_setting(values, len(places), default))
        return out

    def setting(self, name: str, default: Any = None) -> Any:
        """A global setting, as one value or per-tensor rules (evaluated with the output names)."""
        values = {}
        for out_name, place in self.places[0].items():
            for level in (self.slices[place.slice].parameters, self.top):
                value = evaluate(level.get(name), out_name, place.t)
                if value is not None:
                    values[out_name] = value
                    break
        return _as_setting(values, len(self.places[0]), default)


def _as_setting(values: dict[str, Any], names: int, default: Any) -> Any:
    """One value where every one of the `names` tensors has the same, `default` where none has one, else a rule per
    tensor (then `default` for the rest)."""
    if not values:
        return default
    if len(values) == names and len({json.dumps(v) for v in values.values()}) == 1:
        return next(iter(values.values()))
    rules = [{"filter": name, "value": value} for name, value in values.items()]
    return rules + ([{"value": default}] if default is not None else [])


def assemble(slices: list[OutputSlice], top: dict[str, Any], base: str | None) -> SlicedModels:
    """The input models of the slices (sources by position), the base among them, and their files (the base's or
    first source's, with the output's layer count)."""
    counts = {len(s.sources) for s in slices}
    if len(counts) != 1:
        raise BlockmergeError("mergekit config: slices with different numbers of sources are not supported yet")
    opened: dict[str, Checkpoint] = {}
    structure: dict[str, tuple[str, dict[int, list[str]], list[str]]] = {}
    for piece in slices:
        lengths = {s.stop - s.start for s in piece.sources}
        if len(lengths) != 1:
            raise BlockmergeError("mergekit config: all sources of a slice must have the same number of layers")
        for s in piece.sources:
            if s.path not in opened:
                opened[s.path] = open_checkpoint(s.path, s.path)
                structure[s.path] = _layers(opened[s.path])
            if s.start < 0 or s.stop > max(structure[s.path][1], default=-1) + 1 or s.start >= s.stop:
                raise BlockmergeError(f"mergekit config: layer_range [{s.start}, {s.stop}] is outside the model's "
                                      "layers", path=s.path)
    count = counts.pop()
    parts: list[dict[str, tuple[Checkpoint, str]]] = [{} for _ in range(count)]
    places: list[dict[str, Place]] = [{} for _ in range(count)]
    offset = 0
    for index, piece in enumerate(slices):
        length = piece.sources[0].stop - piece.sources[0].start
        for i in range(length):
            t = i / (length - 1) if length > 1 else 1.0
            for k, s in enumerate(piece.sources):
                prefix, layers, _ = structure[s.path]
                for suffix in layers[s.start + i]:
                    out_name, in_name = f"{prefix}{offset + i}.{suffix}", f"{prefix}{s.start + i}.{suffix}"
                    parts[k][out_name] = (opened[s.path], in_name)
                    places[k][out_name] = Place(index, in_name, t)
        offset += length
    for k in range(count):
        first, last = slices[0].sources[k], slices[-1].sources[k]
        for name in structure[first.path][2]:
            source = first if "embed" in name else last
            if name in opened[source.path].specs:
                parts[k][name] = (opened[source.path], name)
                places[k][name] = Place(0 if source is first else len(slices) - 1, name, 0.0)
    workdir = tempfile.TemporaryDirectory(prefix="blockmerge-slices-")
    files = _files(slices, base, offset, Path(workdir.name))
    models = [RenamedCheckpoint(p, f"slices source {k}", files) for k, p in enumerate(parts)]
    base_position = _base_position(slices, base)
    return SlicedModels(models, models[base_position] if base_position is not None else None, places, slices, top,
                        offset, workdir)


def _base_position(slices: list[OutputSlice], base: str | None) -> int | None:
    positions = set()
    for piece in slices:
        wanted = piece.base or base
        if wanted is None:
            return None
        found = [k for k, s in enumerate(piece.sources) if s.path == wanted]
        if not found:
            raise BlockmergeError("mergekit config: a slice's sources do not include its base_model", path=wanted)
        positions.add(found[0])
    if len(positions) != 1:
        raise BlockmergeError("mergekit config: base_model must be the source at the same position in every slice")
    return positions.pop()


def _files(slices: list[OutputSlice], base: str | None, layers: int, where: Path) -> list[Path]:
    """The other files of the base's (or first source's) directory, its config giving `layers` layers."""
    directory = Path(base or slices[0].sources[0].path)
    if not directory.is_dir():
        return []

    def layer_count(config: dict) -> None:
        config.update({key: layers for key in LAYER_COUNT_KEYS if key in config})

    return copy_model_files(directory, where, layer_count)
