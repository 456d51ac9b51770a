"""What a merge method is: a typed hyperparameter dataclass, a kernel over one block, and its needs."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import BlockmergeError


@dataclass
class Block:
    """One row range of one parameter, across every model and statistic, as float tensors on the device.

    A method may put small JSON-able figures in `report`; they reach the summary and the provenance.
    Statistics of elementwise kinds (`fisher`, `trimmed`) are cut to the same rows; Gram matrices
    and blockwise Fishers are whole.
    """

    name: str
    start: int
    stop: int
    shape: tuple[int, ...]
    models: list[torch.Tensor]
    base: torch.Tensor | None = None
    stats: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    base_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def offset(self) -> int:
        """Index of the block's first element in the flattened parameter."""
        return self.start * math.prod(self.shape[1:])

    def stacked(self) -> torch.Tensor:
        """The models' blocks stacked along a new first axis."""
        return torch.stack(self.models)


@dataclass(frozen=True)
class Pass:
    """A reduction over every block, run before the merge.

    `map` turns a block into a small partial result; `fold(accumulated, partial, block)` combines
    them in plan order (the first call gets None); `finish` turns the total into entries of the
    state that later passes and the merge read. `map` may run in another process (the Dask executor):
    its partial must be small and picklable, and `fold` may read only the block's name, rows and shape.
    """

    map: Callable[[Block, Any, dict], Any]
    fold: Callable[[Any, Any, Block], Any]
    finish: Callable[[Any, Any, dict], dict]


@dataclass(frozen=True)
class Needs:
    """The base and statistics a merge needs under given hyperparameters.

    `statistics`: every model supplies each kind. `optional_statistics`: each kind is read where every
    model supplies it. `one_of_statistics`: every model supplies at least one of the kinds; each is read
    where every model supplies it. The kinds that apply to one tensor's shape are read together.
    """

    base: bool = False
    statistics: tuple[str, ...] = ()
    optional_statistics: tuple[str, ...] = ()
    one_of_statistics: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    """A merge method as the engine sees it.

    When what it needs depends on the hyperparameters, `needs_for` gives it; `needs_base`, `statistics`
    and `optional_statistics` then describe the defaults, and `needs_base` must be true for the base to be
    read where any setting needs it.

    On the CPU, the slices of a block of a method without Gram statistics are merged (and mapped by
    its passes) on several threads at once: there `merge` and `Pass.map` read `state`, never write it.

    A method that reports (`Block.report`) declares in `report_bytes` the most characters one report takes as
    JSON: a single-file output keeps that much room in its header (more costs a copy of the file).
    """

    name: str
    description: str
    hyperparameters: type
    merge: Callable[[Block, Any, dict], torch.Tensor]
    needs_base: bool = False
    statistics: tuple[str, ...] = ()
    optional_statistics: tuple[str, ...] = ()
    base_statistics: tuple[str, ...] = ()
    passes: Callable[[Any, frozenset[str]], list[Pass]] = lambda hp, kinds: []
    row_blocks: bool = True
    check: Callable[[Any, int], None] | None = None  # (hyperparameters, number of models); raises ValueError
    needs_for: Callable[[Any], Needs] | None = None
    report_bytes: int = 0

    def needs(self, hyperparameters: Any) -> Needs:
        """What a merge with these hyperparameters needs."""
        if self.needs_for is not None:
            return self.needs_for(hyperparameters)
        return Needs(self.needs_base, self.statistics, self.optional_statistics)


MissingStatistic = Literal["average", "error"]


@dataclass(frozen=True)
class Common:
    """Options every method takes (docs/methods.md §16)."""

    exclude: tuple[str, ...] = ()
    missing_statistic: MissingStatistic = "average"


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[-1] if errors else f"bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], name) for v in items)
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


def _build(cls: type, values: dict[str, Any], method: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            try:
                kwargs[f.name] = _coerce(values[f.name], hints[f.name], f.name)
            except ValueError as err:
                raise BlockmergeError(f"{method}: hyperparameter {f.name}: {err}") from None
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise BlockmergeError(f"{method}: {err}") from None


def parse_hyperparameters(method: Method, values: dict[str, Any]) -> tuple[Any, Common]:
    """Typed hyperparameters of `method` and the common options, from names and values (strings allowed)."""
    own = {f.name for f in dataclasses.fields(method.hyperparameters)}
    common = {f.name for f in dataclasses.fields(Common)}
    unknown = sorted(set(values) - own - common)
    if unknown:
        valid = ", ".join(sorted(own | common))
        raise BlockmergeError(f"{method.name}: unknown hyperparameter {unknown[0]!r} (valid: {valid})")
    return (_build(method.hyperparameters, {k: v for k, v in values.items() if k in own}, method.name),
            _build(Common, {k: v for k, v in values.items() if k in common}, method.name))


def describe(method: Method, hyperparameters: Any = None) -> dict[str, Any]:
    """Name, description, hyperparameters with types and defaults, and what a merge with `hyperparameters` (default:
    the defaults) needs, as `Method.needs` computes it."""
    hints = typing.get_type_hints(method.hyperparameters)
    needs = method.needs(method.hyperparameters() if hyperparameters is None else hyperparameters)
    return {
        "name": method.name,
        "description": method.description,
        "hyperparameters": {f.name: {"type": _type_name(hints[f.name]), "default": f.default}
                            for f in dataclasses.fields(method.hyperparameters)},
        "needs_base": needs.base,
        "statistics": list(needs.statistics),
        "optional_statistics": list(needs.optional_statistics),
        "one_of_statistics": list(needs.one_of_statistics),
        "base_statistics": list(method.base_statistics),
    }


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def summed(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ of same-shaped tensors, in a new tensor."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total += t
    return total


@contextlib.contextmanager
def thread_count_independent() -> Iterator[None]:
    """Torch runs this thread's operations on one thread inside: reductions (sums, dot products) and LAPACK
    factorizations split their work by the thread count, so their multi-threaded bits depend on the machine."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def docstring_summary(module_doc: str | None) -> str:
    """The first paragraph of a docstring, as one line."""
    return " ".join((module_doc or "").strip().split("\n\n")[0].split())
