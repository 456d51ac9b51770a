"""What a merge method is: a typed hyperparameter dataclass, a kernel over one block, its needs and granularity."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import BlockmergeError
from .hyperparameters import build, check_model_count, plain, type_name


@dataclass
class Block:
    """One row range of one parameter, across every model and statistic, as float tensors on the device.

    A method may put small JSON-able figures in `report`; they reach the summary and the provenance.
    `prepared` is what the method's `prepare` returned for this tensor; `inputs` the rows of the checkpoints its
    hyperparameters name (`Needs.checkpoints`).
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
    prepared: Any = None
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)

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
    `wants(tensor name, state)` says whether a pass after the first reads that tensor (default: every tensor).
    `local`: what `finish` gives for a tensor depends on that tensor's blocks alone, and a tensor's merge reads only
    its own entries of the state; a merge whose passes are all local may run them tensor by tensor, each tensor's
    passes right before its merge. `combine(accumulated, later)` merges into `accumulated` the fold of a later run
    of blocks (plan order); where a pass has one, a Dask worker folds its own blocks' partials and sends one
    accumulation instead of every partial.
    """

    map: Callable[[Block, Any, dict], Any]
    fold: Callable[[Any, Any, Block], Any]
    finish: Callable[[Any, Any, dict], dict]
    wants: Callable[[str, Mapping[str, Any]], bool] | None = None
    local: bool = False
    combine: Callable[[Any, Any], Any] | None = None


@dataclass(frozen=True)
class Needs:
    """The base and statistics a merge needs under given hyperparameters.

    `statistics`: every model supplies each kind. `optional_statistics`: each kind is read where every
    model supplies it. `one_of_statistics`: every model supplies at least one of the kinds; each is read
    where every model supplies it. The kinds that apply to one tensor's shape are read together.
    `base_statistics`: kinds the base supplies (read with the base). `checkpoints`: hyperparameters whose values
    are checkpoints read beside the models (`Block.inputs`).
    """

    base: bool = False
    statistics: tuple[str, ...] = ()
    optional_statistics: tuple[str, ...] = ()
    one_of_statistics: tuple[str, ...] = ()
    base_statistics: tuple[str, ...] = ()
    checkpoints: tuple[str, ...] = ()


Granularity = Literal["elementwise", "rows", "tensor"]


def _nothing(hyperparameters: Any) -> Needs:
    return Needs()


def _no_passes(hyperparameters: Any, kinds: frozenset[str]) -> list[Pass]:
    return []


@dataclass(frozen=True)
class Method:
    """A merge method as the engine sees it.

    `merge(block, hyperparameters, state)` returns the merged block: `state` (read-only) holds what the
    reduction passes (`passes(hyperparameters, statistic kinds read)`) found, `block.prepared` what
    `prepare(block, hyperparameters, state)` returned for the block's tensor. The hyperparameters a
    kernel sees are plain: schedules are resolved to the tensor's value (`hyperparameters.resolve`).
    `needs(hyperparameters)` says which base and statistics a merge reads; `model_count` how many models
    it merges (least, most; None: no most); `check(hyperparameters, number of models)` may refuse a
    combination (ValueError) before anything is read.

    `granularity` says what one output element depends on:
    - `elementwise`: the same element of every input (and the state): blocks are cut anywhere, and on the
      CPU slices of a block are merged on several threads at once;
    - `rows`: the same row of every input and whole statistics (Gram matrices): row blocks, one thread; a
      tensor of at most one dimension is one row, merged in one block;
    - `tensor`: the whole tensor: one block per tensor, refused before any read where a tensor's inputs
      exceed the block budget. A tensor-wide quantity (a norm, a dot product, a threshold) of an
      otherwise elementwise formula belongs in a reduction pass (`tensor_pass`): the method stays
      elementwise and within the budget.

    `prepare` runs once per tensor, on one of its slices, before any of them merges; it may read
    only what every slice of the tensor has whole (its name and shape, whole statistics, the state).

    `linear`: the merge is c_0 θ_0 + Σ_i c_i θ_i with coefficients fixed by the (resolved) hyperparameters, the same
    for every element of a tensor; LoRA adapters merged by it are again an adapter.

    A method that reports (`Block.report`) declares in `report_bytes` the most characters one report takes as
    JSON: a single-file output keeps that much room in its header (more costs a copy of the file).
    """

    name: str
    description: str
    hyperparameters: type
    merge: Callable[[Block, Any, Mapping[str, Any]], torch.Tensor]
    needs: Callable[[Any], Needs] = _nothing
    granularity: Granularity = "elementwise"
    passes: Callable[[Any, frozenset[str]], list[Pass]] = _no_passes
    prepare: Callable[[Block, Any, Mapping[str, Any]], Any] | None = None
    model_count: tuple[int, int | None] = (1, None)
    check: Callable[[Any, int], None] | None = None
    report_bytes: int = 0
    linear: bool = False

    def validate(self, hyperparameters: Any, num_models: int) -> None:
        """Raises ValueError where the method does not merge `num_models` models, or the hyperparameters do not fit
        that many."""
        least, most = self.model_count
        if num_models < least or (most is not None and num_models > most):
            count = (f"exactly {least}" if least == most else f"at least {least}" if most is None
                     else f"{least} to {most}")
            raise ValueError(f"merges {count} model{'' if count.endswith(' 1') else 's'}, got {num_models}")
        check_model_count(hyperparameters, num_models)
        if self.check is not None:
            self.check(hyperparameters, num_models)


def tensor_pass(key: str, row_values: Callable[[Block, Any, Mapping[str, Any]], torch.Tensor],
                finish: Callable[[list[float], Any, str], Any] | None = None) -> Pass:
    """A reduction within each tensor: `row_values(block, hp, state)` gives float64 [rows of the block, k] per-row
    sums (see `ops.row_sums`); each column is added over the tensor's rows exactly (math.fsum), so the totals do
    not depend on the blocks. `state[key][name]` is then the k totals, or `finish(totals, hp, name)` of them."""

    def fold(acc, partial: torch.Tensor, block: Block) -> dict[str, list[torch.Tensor]]:
        acc = acc if acc is not None else {}
        acc.setdefault(block.name, []).append(partial)
        return acc

    def done(acc, hp: Any, state: Mapping[str, Any]) -> dict:
        totals = {}
        for name, parts in acc.items():
            columns = torch.cat(parts).T.tolist()
            sums = [math.fsum(c) for c in columns]
            totals[name] = finish(sums, hp, name) if finish is not None else sums
        return {key: totals}

    return Pass(row_values, fold, done, local=True)


MissingStatistic = Literal["average", "error"]


@dataclass(frozen=True)
class Common:
    """Options every method takes (docs/methods.md §16)."""

    exclude: tuple[str, ...] = ()
    missing_statistic: MissingStatistic = "average"


def parse_hyperparameters(method: Method, values: dict[str, Any]) -> tuple[Any, Common]:
    """Typed hyperparameters of `method` and the common options, from names and values (strings allowed)."""
    own = {f.name for f in dataclasses.fields(method.hyperparameters)}
    common = {f.name for f in dataclasses.fields(Common)}
    unknown = sorted(set(values) - own - common)
    if unknown:
        valid = ", ".join(sorted(own | common))
        raise BlockmergeError(f"{method.name}: unknown hyperparameter {unknown[0]!r} (valid: {valid})")
    return (build(method.hyperparameters, {k: v for k, v in values.items() if k in own}, method.name),
            build(Common, {k: v for k, v in values.items() if k in common}, method.name))


def describe(method: Method, hyperparameters: Any = None) -> dict[str, Any]:
    """Name, description, granularity, hyperparameters with types and defaults, and what a merge with
    `hyperparameters` (default: the defaults) needs, as `Method.needs` computes it."""
    hints = typing.get_type_hints(method.hyperparameters, include_extras=True)
    needs = method.needs(method.hyperparameters() if hyperparameters is None else hyperparameters)
    return {
        "name": method.name,
        "description": method.description,
        "granularity": method.granularity,
        "model_count": list(method.model_count),
        "hyperparameters": {f.name: {"type": type_name(hints[f.name]), "default": plain(f.default)}
                            for f in dataclasses.fields(method.hyperparameters)},
        "needs_base": needs.base,
        "statistics": list(needs.statistics),
        "optional_statistics": list(needs.optional_statistics),
        "one_of_statistics": list(needs.one_of_statistics),
        "base_statistics": list(needs.base_statistics),
        "checkpoints": list(needs.checkpoints),
        "linear": method.linear,
    }


def docstring_summary(module_doc: str | None) -> str:
    """The first paragraph of a docstring, as one line."""
    return " ".join((module_doc or "").strip().split("\n\n")[0].split())
