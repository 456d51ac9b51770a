"""The contract every registered merge method holds, as checks a test suite runs over the method registry.

    from blockmerge.plugins import registry
    from blockmerge.testing import CONTRACTS

    @pytest.mark.parametrize("name", sorted(registry()))
    @pytest.mark.parametrize("contract", CONTRACTS)
    def test_contract(name, contract, tmp_path):
        contract(registry()[name], tmp_path)

Each check merges a small generated family (a base, fine-tunes, and the statistics the method's
`needs` asks for at its default hyperparameters) with the public API and raises AssertionError
naming what broke. `dask_equals_local` needs a Dask scheduler address (`scheduler=`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from . import api
from .errors import BlockmergeError
from .plugins import Method, describe, registry
from .plugins.hyperparameters import PER_MODEL, SCHEDULED, build, marks

# Layer-numbered names, a vector, a scalar and a non-float buffer; a matrix wider than one CPU slice
# (2^18 elements), so slices, blocks and tasks all cut it.
SHAPES = {"embed.weight": (96, 24), "layers.0.attn.weight": (24, 24), "layers.0.norm.weight": (24,),
          "layers.1.mlp.weight": (5000, 56), "layers.1.attn.weight": (24, 24), "head.bias": (),
          "position_ids": (12,)}
MODELS = 3


@dataclass
class Family:
    """A generated merge input: tensors by name for the base, each model, each model's statistics and the base's."""

    base: dict[str, torch.Tensor]
    models: list[dict[str, torch.Tensor]]
    stats: list[dict[str, dict[str, torch.Tensor]]]
    base_stats: dict[str, dict[str, torch.Tensor]]

    def inputs(self) -> dict[str, Any]:
        """Keyword arguments of `blockmerge.merge` for this family."""
        kwargs: dict[str, Any] = {"models": self.models, "base": self.base}
        if self.stats and self.stats[0]:
            kwargs["stats"] = self.stats
        if self.base_stats:
            kwargs["base_stats"] = self.base_stats
        return kwargs

    def written(self, folder: Path) -> dict[str, Any]:
        """The same inputs as `.safetensors` files in `folder` (statistics as one-kind files)."""
        def write(tensors: dict[str, torch.Tensor], path: Path) -> str:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({n: t.contiguous() for n, t in tensors.items()}, path)
            return str(path)

        kwargs: dict[str, Any] = {"models": [write(m, folder / f"model{i}.safetensors")
                                             for i, m in enumerate(self.models)],
                                  "base": write(self.base, folder / "base.safetensors")}
        if self.stats and self.stats[0]:
            kwargs["stats"] = [{k: write(s, folder / f"stats{i}" / f"{k}.safetensors") for k, s in kinds.items()}
                               for i, kinds in enumerate(self.stats)]
        if self.base_stats:
            kwargs["base_stats"] = {k: write(s, folder / "base_stats" / f"{k}.safetensors")
                                    for k, s in self.base_stats.items()}
        return kwargs


def _statistic(kind: str, tensor: torch.Tensor, g: torch.Generator) -> torch.Tensor | None:
    """A plausible statistic of `kind` for a parameter (None where the kind does not apply to its shape)."""
    shape = tuple(tensor.shape)
    if kind == "fisher":
        return torch.rand(shape, generator=g) + 0.05
    if kind == "trimmed":
        tau = 0.05 * torch.randn(shape, generator=g)
        return tau * (torch.rand(shape, generator=g) < 0.3)
    side = {"gram_in": 1 if len(shape) == 2 else None, "gram_out": 0 if len(shape) == 2 else None,
            "blockwise_fisher": 0 if len(shape) == 1 else None}[kind]
    if side is None or max(shape) > 512:
        return None
    n = shape[side]
    x = torch.randn(4 * n, n, generator=g)
    return x.T @ x / (4 * n) + 0.1 * torch.eye(n)


def family(method: Method, hyperparameters: Any = None, *, seed: int = 0, identical: bool = False,
           shapes: dict[str, tuple[int, ...]] = SHAPES, models: int = MODELS) -> Family:
    """A base, `models` fine-tunes (all the base's values where `identical`) and the statistics `method` needs under
    `hyperparameters` (default: its defaults): every kind it requires or may read in one of, for each tensor
    it applies to (the largest matrix has no Gram matrices: it is merged as the method's fallback merges it)."""
    hp = method.hyperparameters() if hyperparameters is None else hyperparameters
    needs = method.needs(hp)
    least, most = method.model_count
    models = max(least, models if most is None else min(models, most))
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.arange(s[0]) if n == "position_ids" else torch.randn(s, generator=g) for n, s in shapes.items()}
    fine = [{n: t.clone() if identical or not t.is_floating_point() else t + 0.05 * torch.randn(t.shape, generator=g)
             for n, t in base.items()} for _ in range(models)]
    kinds = [*needs.statistics, *needs.one_of_statistics]

    def stats_of(model: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for kind in kinds:
            values = {n: _statistic(kind, t, g) for n, t in model.items() if t.is_floating_point()}
            out[kind] = {n: v for n, v in values.items() if v is not None}
        return out

    stats = [stats_of(m) for m in fine] if kinds else []
    if identical and stats:
        stats = [stats[0]] * models
    base_stats = {}
    for kind in needs.base_statistics:
        values = {n: _statistic(kind, t, g) for n, t in base.items() if t.is_floating_point()}
        base_stats[kind] = {n: v for n, v in values.items() if v is not None}
    return Family(base, fine, stats, base_stats)


def _merge(method: Method, inputs: dict[str, Any], **options: Any) -> dict[str, torch.Tensor]:
    return api.merge(method.name, **inputs, **options)


def _same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different tensors"
    for name in a:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {name} has another dtype or shape"
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), \
            f"{what}: {name} differs"


def _whole_tensor_budget(fam: Family) -> int:
    """A block budget that holds the inputs of any tensor with a statistic, or of any tensor if none has one (what a
    `tensor` method may merge whole)."""
    kinds = [s for model in fam.stats for s in model.values()] + list(fam.base_stats.values())
    merged = [t.numel() for n, t in fam.base.items()
              if t.is_floating_point() and (not kinds or any(n in s for s in kinds))]
    inputs = 1 + len(fam.models) * (1 + max((len(s) for s in fam.stats), default=0)) + len(fam.base_stats)
    return 8 * max(merged, default=1) * inputs


def block_size_invariance(method: Method, tmp_path: Path) -> None:
    """The same bytes whatever the block budget: one block per tensor, or a few rows (or the least a whole-tensor
    method takes)."""
    fam = family(method)
    whole = _merge(method, fam.inputs(), block_size="1GiB")
    floor = _whole_tensor_budget(fam) if method.granularity == "tensor" else 0
    for budget in (floor + 1, floor + 700, floor + 50_000):
        _same_bytes(whole, _merge(method, fam.inputs(), block_size=budget), f"{method.name}, {budget}-byte blocks")


def thread_count_invariance(method: Method, tmp_path: Path) -> None:
    """The same bytes on one torch thread as on several."""
    fam = family(method)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _merge(method, fam.inputs(), block_size=20_000 + _whole_tensor_budget(fam))
        torch.set_num_threads(max(3, before))
        several = _merge(method, fam.inputs(), block_size=20_000 + _whole_tensor_budget(fam))
    finally:
        torch.set_num_threads(before)
    _same_bytes(one, several, f"{method.name}, 1 thread vs {max(3, before)}")


def identical_models_merge_to_that_model(method: Method, tmp_path: Path) -> None:
    """Copies of one model (which is also the base) merge to that model, to float32 rounding."""
    fam = family(method, identical=True)
    merged = _merge(method, fam.inputs())
    for name, expected in fam.models[0].items():
        torch.testing.assert_close(merged[name], expected, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{method.name}: {name}: {m}")


def describe_round_trip(method: Method, tmp_path: Path) -> None:
    """The defaults `describe` shows, written as JSON and read back, are the defaults; so is every value that
    `describe(method, hp)` echoes."""
    shown = json.loads(json.dumps(describe(method)))
    values = {name: field["default"] for name, field in shown["hyperparameters"].items()}
    assert build(method.hyperparameters, values, method.name) == method.hyperparameters(), \
        f"{method.name}: the defaults do not survive describe"
    assert shown["name"] == method.name and shown["granularity"] == method.granularity
    needs = method.needs(method.hyperparameters())
    assert (shown["needs_base"], shown["statistics"], shown["base_statistics"]) == (
        needs.base, list(needs.statistics), list(needs.base_statistics)), f"{method.name}: describe is not needs(hp)"


def _wrong_values(tp: Any, models: int) -> list[Any]:
    """Values `tp` must refuse."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        if PER_MODEL in tp.__metadata__:
            return [[1.0] * (models + 1), *_wrong_values(args[0], models)]
        if SCHEDULED in tp.__metadata__:
            return ["not a number", [{"filter": "x", "value": []}]]
        return _wrong_values(args[0], models)
    if origin in (typing.Union, types.UnionType):
        choices = [a for a in args if a is not type(None)]
        wrong = [w for arg in choices for w in _wrong_values(arg, models)]
        per_model = [[1.0] * (models + 1)] if any(PER_MODEL in marks(a) for a in choices) else []
        return per_model + [w for w in wrong if w not in per_model and not any(_accepts(a, w) for a in choices)]
    if origin is Literal:
        return ["no-such-choice"]
    if origin is tuple:
        return [["not a number"]] if args and args[0] in (float, int) else []
    return {float: ["not a number", "inf"], int: [1.5, "x"], bool: ["maybe"], str: [3]}.get(tp, [])


def _accepts(tp: Any, value: Any) -> bool:
    try:
        build(_single(tp), {"value": value}, "check")
        return True
    except BlockmergeError:
        return False


def _single(tp: Any) -> type:
    return dataclasses.make_dataclass("Single", [("value", tp, dataclasses.field(default=None))], frozen=True)


def bad_hyperparameters_refused_before_any_read(method: Method, tmp_path: Path) -> None:
    """A wrong value of each hyperparameter is one error naming it, raised before any tensor is read: the inputs'
    data are NaN, which a read would report instead."""
    fam = family(method)
    nan = Family({n: t.float().fill_(math.nan) if t.is_floating_point() else t for n, t in fam.base.items()},
                 [{n: t.clone().fill_(math.nan) if t.is_floating_point() else t for n, t in m.items()}
                  for m in fam.models], fam.stats, fam.base_stats)
    inputs = nan.written(tmp_path / "nan")
    hints = typing.get_type_hints(method.hyperparameters, include_extras=True)
    for f in dataclasses.fields(method.hyperparameters):
        for wrong in _wrong_values(hints[f.name], len(fam.models)):
            try:
                api.merge(method.name, **inputs, **{f.name: wrong})
            except BlockmergeError as err:
                assert re.search(rf"\b{f.name}\b", str(err)) and "NaN" not in str(err), \
                    f"{method.name}: {f.name}={wrong!r} gave {err!r}, not an error naming {f.name}"
                continue
            raise AssertionError(f"{method.name}: {f.name}={wrong!r} was accepted")


def dask_equals_local(method: Method, tmp_path: Path, scheduler: str) -> None:
    """The Dask executor writes the bytes the local one writes."""
    fam = family(method)
    inputs = fam.written(tmp_path / "inputs")
    budget = 20_000 + _whole_tensor_budget(fam)
    api.merge(method.name, **inputs, out=tmp_path / "local.safetensors", block_size=budget)
    api.merge(method.name, **inputs, out=tmp_path / "dask.safetensors", block_size=budget, executor="dask",
              scheduler=scheduler)
    _same_bytes(load_file(tmp_path / "local.safetensors"), load_file(tmp_path / "dask.safetensors"),
                f"{method.name}, dask vs local")


def imports_no_other_method(method: Method, tmp_path: Path) -> None:
    """The method's module imports no other registered method's module (shared code lives in shared modules)."""
    module = importlib.import_module(method.merge.__module__)
    others = {importlib.import_module(m.merge.__module__).__name__ for m in registry().values()} - {module.__name__}
    tree = ast.parse(inspect.getsource(module))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), module.__package__) \
                if node.level else node.module
            names = {base, *(f"{base}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            names = {a.name for a in node.names}
        else:
            continue
        assert not names & others, f"{method.name}: {module.__name__} imports {sorted(names & others)[0]}"


CONTRACTS: list[Callable[[Method, Path], None]] = [
    block_size_invariance, thread_count_invariance, identical_models_merge_to_that_model, describe_round_trip,
    bad_hyperparameters_refused_before_any_read, imports_no_other_method,
]
