"""Typed hyperparameters: values from strings, lists and YAML; per-model values; per-tensor schedules.

A method's hyperparameters are a frozen dataclass. Besides plain `float`, `int`, `bool`, `str`,
`Literal[...]` and `tuple[...]` fields, two kinds of field are understood by the framework:

- `PerModel[T]`: a tuple of one value per model, in the models' order, or one T for every model (a plain value,
  or a tuple of one; `each_model` gives the list); the framework checks the count.
- `InputCheckpoint`: a checkpoint the merge reads beside the models (a path, `REV:PATH`, a store, or in the
  Python API a mapping of tensors), block by block; the method lists the fields it reads in `Needs.checkpoints`
  and finds each block's rows in `Block.inputs[field]`.
- `Scheduled[float]`: a number, or a schedule giving each tensor its own number, as mergekit's
  configurations write them: a list of numbers is a gradient over the layers (interpolated
  linearly between equally spaced points from the first layer, at 0, to the last, at 1; a tensor
  in no numbered layer, such as an embedding, sits at 0), and a list of `{filter: TEXT, value:
  NUMBER or LIST}` rules gives tensors whose name contains TEXT that value (the first matching
  rule wins; a rule without a filter, or with `*`, matches every tensor). The kernel sees a plain
  float: `resolve` replaces every schedule with its value at one tensor before the method is called.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import yaml

from ..errors import BlockmergeError


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


PER_MODEL = _Marker("PerModel")
SCHEDULED = _Marker("Scheduled")
CHECKPOINT = _Marker("InputCheckpoint")
IN_MEMORY = "(in memory)"  # what a checkpoint field holds for a mapping given to the Python API

InputCheckpoint = Annotated[str, CHECKPOINT]


class PerModel:
    """`PerModel[T]`: a tuple of one T per model, or one T for every model (None where the field allows it: the
    method's default)."""

    def __class_getitem__(cls, item: Any) -> Any:
        return Annotated[tuple[item, ...], PER_MODEL]


class Scheduled:
    """`Scheduled[float]`: a number, or a `Schedule` that gives each tensor its own number."""

    def __class_getitem__(cls, item: Any) -> Any:
        return Annotated[item | Schedule, SCHEDULED]


@dataclass(frozen=True)
class TensorPlace:
    """Where a tensor sits in its model: its name, and its layer's index among `layers` (None: in no layer)."""

    name: str
    layer: int | None
    layers: int


LAYER_INDEX = re.compile(r"\.(\d+)\.")


def places(names: list[str]) -> dict[str, TensorPlace]:
    """Each tensor's place: the layer index is the first `.N.` of its name; the layers are counted over `names`."""
    found = {n: LAYER_INDEX.search(n) for n in names}
    layers = 1 + max((int(m.group(1)) for m in found.values() if m), default=-1)
    return {n: TensorPlace(n, int(m.group(1)) if m else None, layers) for n, m in found.items()}


@dataclass(frozen=True)
class Rule:
    """Tensors whose name contains `filter` (None or `*`: every tensor) take `values`: one number, or a gradient
    over the layers."""

    filter: str | None
    values: tuple[float, ...]

    def matches(self, name: str) -> bool:
        return self.filter in (None, "*") or self.filter in name

    def at(self, place: TensorPlace) -> float:
        if len(self.values) == 1:
            return self.values[0]
        if place.layer is None:
            fraction = 0.0
        else:
            fraction = place.layer / (place.layers - 1) if place.layers > 1 else 1.0
        return float(np.interp(fraction, np.linspace(0.0, 1.0, len(self.values)), self.values))


@dataclass(frozen=True)
class Schedule:
    """Per-tensor values: the first rule whose filter matches a tensor's name gives its value."""

    rules: tuple[Rule, ...]

    def at(self, place: TensorPlace) -> float:
        for rule in self.rules:
            if rule.matches(place.name):
                return rule.at(place)
        raise ValueError(f"no rule of the schedule matches {place.name} (add a rule without a filter)")

    def values(self) -> tuple[float, ...]:
        """Every number written in the schedule (values between them are interpolations)."""
        return tuple(v for rule in self.rules for v in rule.values)


def values_of(value: Any) -> tuple[float, ...]:
    """Every number a (possibly scheduled, possibly per-model) value can give: for range checks."""
    if isinstance(value, Schedule):
        return value.values()
    if isinstance(value, tuple):
        return tuple(v for item in value for v in values_of(item))
    return () if value is None else (value,)


def resolve(hyperparameters: Any, place: TensorPlace) -> Any:
    """The hyperparameters with every schedule replaced by its value at the tensor `place` (the same object if none
    is scheduled). Raises ValueError if a schedule has no value there."""
    changes = {}
    for f in dataclasses.fields(hyperparameters):
        value = getattr(hyperparameters, f.name)
        resolved = _resolved(value, place)
        if resolved is not value:
            changes[f.name] = resolved
    return dataclasses.replace(hyperparameters, **changes) if changes else hyperparameters


def _resolved(value: Any, place: TensorPlace) -> Any:
    if isinstance(value, Schedule):
        return value.at(place)
    if isinstance(value, tuple) and any(isinstance(v, Schedule) for v in value):
        return tuple(_resolved(v, place) for v in value)
    return value


def is_scheduled(hyperparameters: Any) -> bool:
    """Whether any value (or per-model value) is a schedule."""
    return any(isinstance(v, Schedule) for f in dataclasses.fields(hyperparameters)
               for v in _flat(getattr(hyperparameters, f.name)))


def _flat(value: Any) -> Iterator[Any]:
    if isinstance(value, tuple):
        for v in value:
            yield from _flat(v)
    else:
        yield value


def checkpoint_fields(cls: type) -> set[str]:
    """The fields of a hyperparameter dataclass that may name a checkpoint."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name for f in dataclasses.fields(cls) if CHECKPOINT in marks(hints[f.name])}


def check_model_count(hyperparameters: Any, num_models: int) -> None:
    """Raises ValueError where a per-model value has neither one entry per model nor one for all."""
    hints = typing.get_type_hints(type(hyperparameters), include_extras=True)
    for f in dataclasses.fields(hyperparameters):
        value = getattr(hyperparameters, f.name)
        if isinstance(value, tuple) and PER_MODEL in marks(hints[f.name]) and len(value) not in (1, num_models):
            raise ValueError(f"{f.name} has {len(value)} entries for {num_models} models")


def each_model(value: Any, count: int, default: Any = None) -> list[Any]:
    """A per-model value as one entry for each of `count` models (one entry, or a plain value, serves them all;
    None: `default`)."""
    if value is None:
        return [default] * count
    if not isinstance(value, (tuple, list)):
        return [value] * count
    return list(value) * count if len(value) == 1 else list(value)


def marks(tp: Any) -> tuple[Any, ...]:
    """The markers of an Annotated type, also inside `X | None`."""
    if typing.get_origin(tp) is Annotated:
        return tp.__metadata__
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(m for arg in typing.get_args(tp) for m in marks(arg))
    return ()


def coerce(value: Any, tp: Any) -> Any:
    """`value` (as typed, or a string from the command line) as type `tp`; raises ValueError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        if SCHEDULED in tp.__metadata__:
            return _scheduled(value)
        if CHECKPOINT in tp.__metadata__ and not (isinstance(value, str) and value.strip()):
            raise ValueError(f"expected a checkpoint (a path, REV:PATH or store), got {value!r}")
        if PER_MODEL in tp.__metadata__ and _one_for_all(value):
            return coerce(value, typing.get_args(args[0])[0])
        return coerce(value, args[0])
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[-1] if errors else f"bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            items = _yaml(value) if value.lstrip().startswith("[") else [v for v in value.split(",") if v.strip()]
        else:
            items = value if isinstance(value, (list, tuple)) else [value]  # one value: a list of one
        return tuple(coerce(v, args[0]) for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ValueError(f"expected a finite number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported hyperparameter type {tp}")


def _one_for_all(value: Any) -> bool:
    """Whether a per-model value is one value for every model: not a list (nor a text of several values), or a
    list of schedule rules (one schedule)."""
    if isinstance(value, str):
        return not (value.lstrip().startswith("[") or "," in value)
    if isinstance(value, (list, tuple)):
        return bool(value) and all(isinstance(v, dict) for v in value)
    return True


def _yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"cannot read {text!r} ({str(err).splitlines()[0]})") from None


def _scheduled(value: Any) -> float | Schedule:
    """A number, or a schedule from a list of numbers (a gradient), a rule or a list of rules; strings are read as
    YAML or as comma-separated numbers."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, str):
        text = value.strip()
        value = _yaml(text) if text.startswith(("[", "{")) else [v for v in text.split(",") if v.strip()]
        if len(value) == 1:
            return coerce(value[0], float)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return coerce(value, float)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"expected a number, a list of numbers (a gradient) or a list of {{filter, value}} rules, "
                         f"got {value!r}")
    if all(not isinstance(v, dict) for v in value):
        return Schedule((Rule(None, tuple(coerce(v, float) for v in value)),))
    return Schedule(tuple(_rule(v) for v in value))


def _rule(entry: Any) -> Rule:
    if not isinstance(entry, dict) or "value" not in entry or set(entry) - {"filter", "value"}:
        raise ValueError(f"a schedule rule is {{filter: TEXT, value: NUMBER or LIST}}, got {entry!r}")
    pattern = entry.get("filter")
    if pattern is not None and not isinstance(pattern, str):
        raise ValueError(f"a rule's filter is a text that tensor names contain, got {pattern!r}")
    values = entry["value"] if isinstance(entry["value"], (list, tuple)) else [entry["value"]]
    if not values:
        raise ValueError(f"a rule's value is a number or a non-empty list, got {entry['value']!r}")
    return Rule(pattern, tuple(coerce(v, float) for v in values))


def build(cls: type, values: dict[str, Any], method: str) -> Any:
    """An instance of the hyperparameter dataclass `cls` from names and values; one-line errors name `method`."""
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            try:
                kwargs[f.name] = coerce(values[f.name], hints[f.name])
            except ValueError as err:
                raise BlockmergeError(f"{method}: hyperparameter {f.name}: {err}") from None
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise BlockmergeError(f"{method}: {err}") from None


def type_name(tp: Any) -> str:
    """A type as the method reference writes it (`float`, `PerModel[float]`, `a|b`)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner = typing.get_args(tp)[0]
        if CHECKPOINT in tp.__metadata__:
            return "checkpoint"
        if SCHEDULED in tp.__metadata__:
            return f"Scheduled[{type_name(typing.get_args(inner)[0])}]"
        return f"PerModel[{type_name(typing.get_args(inner)[0])}]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    if isinstance(tp, type):
        return "None" if tp is type(None) else tp.__name__
    return str(tp).replace("typing.", "")


def plain(value: Any) -> Any:
    """A value as JSON writes it (schedules as their rules)."""
    if isinstance(value, Schedule):
        return [{"filter": r.filter, "value": list(r.values)} for r in value.rules]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
