"""Hyperparameter selection: merge every candidate of a grid through the public merge API, score it on a
validation split, keep the best and report it on a test split (docs/methods.md §11); Fisher coefficient search
(docs/methods.md §5.1) is the same loop over per-model ``weights``."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from .. import api
from ..engine.output import check_output, parents_made, source_paths
from ..errors import BlockmergeError
from ..plugins import get, parse_hyperparameters
from .evaluate import evaluate
from .tasks import Task, load_tasks

FISHER_GRID_POINTS = 51  # FISHER's pairwise grid (1, 0), (0.98, 0.02), ..., (0, 1)


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """``NAME=START:STOP:STEP`` (inclusive range), ``NAME=A,B,C`` or ``NAME=[...]`` (a YAML list, e.g. of weight
    lists) for each item; one name may appear once."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name or not text:
            raise BlockmergeError(f"--grid expects NAME=START:STOP:STEP, NAME=A,B,C or NAME=[...], got {item!r}")
        if name in grid:
            raise BlockmergeError(f"--grid: hyperparameter {name!r} given twice")
        if text.startswith("["):
            try:
                values = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise BlockmergeError(f"--grid {name}: not a YAML list ({' '.join(str(err).split())})") from None
            if not isinstance(values, list) or not values:
                raise BlockmergeError(f"--grid {name}: expected a non-empty list, got {text!r}")
        elif ":" in text:
            values = _range(name, text)
        else:
            values = [v.strip() for v in text.split(",") if v.strip()]
        grid[name] = values
    return grid


def _range(name: str, text: str) -> list[float | int]:
    parts = text.split(":")
    if len(parts) != 3:
        raise BlockmergeError(f"--grid {name}: a range is START:STOP:STEP, got {text!r}")
    integral = all(p.strip().lstrip("+-").isdigit() for p in parts)
    try:
        start, stop, step = (int(p) if integral else float(p) for p in parts)
    except ValueError:
        raise BlockmergeError(f"--grid {name}: START:STOP:STEP must be numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in (start, stop, step)) or step <= 0 or stop < start:
        raise BlockmergeError(f"--grid {name}: need STEP > 0 and STOP >= START, got {text!r}")
    count = math.floor((stop - start) / step + 1e-9) + 1
    return [start + i * step if integral else round(start + i * step, 12) for i in range(count)]


def candidates(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values (the product, the last name varying fastest)."""
    if not grid:
        raise BlockmergeError("the grid is empty: give at least one hyperparameter and its values")
    for name, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise BlockmergeError(f"grid {name!r}: expected a non-empty list of values, got {values!r}")
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def simplex_grid(num_models: int, points: int) -> list[tuple[float, ...]]:
    """Every weight vector with entries in {0, 1/(points-1), ..., 1} summing to one, model 0's weight descending;
    for two models and 51 points, FISHER's (1, 0), (0.98, 0.02), ..., (0, 1)."""
    if num_models < 1 or points < 2:
        raise BlockmergeError(f"a weight grid needs >= 1 model and >= 2 points, got {num_models} and {points}")
    steps = points - 1
    return [tuple(k / steps for k in combo) for combo in _compositions(steps, num_models)]


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    if parts == 1:
        yield (total,)
        return
    for first in range(total, -1, -1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def dirichlet_weights(num_models: int, num_samples: int, seed: int = 0) -> list[tuple[float, ...]]:
    """``num_samples`` draws from Dirichlet(1, ..., 1) over ``num_models`` weights (uniform on the simplex),
    the same for the same seed."""
    if num_models < 1 or num_samples < 1:
        raise BlockmergeError(f"need >= 1 model and >= 1 sample, got {num_models} and {num_samples}")
    draws = np.random.default_rng(seed).dirichlet(np.ones(num_models), size=num_samples)
    return [tuple(float(w) for w in row) for row in draws]


def sweep(method: str, models: Sequence[Any], tasks: Iterable[Task | str | os.PathLike | Mapping[str, Any]],
          grid: Mapping[str, Sequence[Any]], *, base: Any = None, stats: Sequence[Any] | None = None,
          base_stats: Any = None, out: str | os.PathLike | None = None, format: str | None = None,
          overwrite: bool = False, config: str | os.PathLike | None = None, select_split: str = "validation",
          report_split: str | None = "test", batch_size: int = 32, device: str = "cpu",
          eval_dtype: str | None = None, block_size: int | str | None = None, dtype: str | None = None,
          compute_dtype: str = "float32", workdir: str | os.PathLike | None = None, progress: bool = False,
          **hyperparameters: Any) -> dict[str, Any]:
    """Merge each candidate of ``grid`` (with the fixed ``hyperparameters``), score it on ``select_split``, keep
    the one with the best score (the first on ties), write it to ``out`` and score it on ``report_split``.

    Each candidate is merged by :func:`blockmerge.merge` into a temporary ``.safetensors`` file (in ``workdir``,
    default next to ``out``), evaluated by :func:`blockmerge.eval.evaluate` and deleted before the next one.
    ``config`` gives the architecture where a task names none (default: the base's, else the first model's
    directory). Everything is checked — hyperparameters, splits, task data, the output path — before the first
    merge. Returns ``{"method", "hyperparameters", "grid", "select_split", "report_split", "candidates":
    [{"hyperparameters", "score", "tasks"}], "best": {"index", "hyperparameters", "score", "report"}, "out"}``.
    """
    spec = get(method)
    grid_candidates = candidates(grid)
    both = sorted(set(grid) & set(hyperparameters))
    if both:
        raise BlockmergeError(f"hyperparameter {both[0]!r} is both fixed and in the grid")
    fixed = _typed(spec, hyperparameters, hyperparameters)
    typed = [_typed(spec, {**hyperparameters, **c}, c) for c in grid_candidates]
    tasks = load_tasks(tasks)
    for task in tasks:
        for split in (select_split, report_split):
            if split is not None:
                task.dataset(split)
    if out is not None:
        out = check_output(out, format=format, overwrite=overwrite,
                           inputs=source_paths(models, base, stats, base_stats, config))
    config_dir = config if config is not None else _default_config(base, models)
    merge_options = {"base": base, "stats": stats, "base_stats": base_stats, "block_size": block_size,
                     "device": device, "dtype": dtype, "compute_dtype": compute_dtype}
    eval_options = {"config": config_dir, "batch_size": batch_size, "device": device, "dtype": eval_dtype,
                    "progress": progress}
    where = workdir if workdir is not None else (out.parent if out is not None else None)
    rows: list[dict[str, Any]] = []
    with (parents_made(out.parent if out is not None else None),
          tempfile.TemporaryDirectory(prefix=".blockmerge-sweep-", dir=where) as tmp):
        candidate = Path(tmp) / "candidate.safetensors"
        with tqdm(total=len(grid_candidates), desc=f"sweep {method}", unit="candidate",
                  disable=not progress) as bar:
            for values, shown in zip(grid_candidates, typed):
                api.merge(method, models, out=candidate, overwrite=True, progress=progress, **merge_options,
                          **hyperparameters, **values)
                result = evaluate(candidate, tasks, split=select_split, **eval_options)
                candidate.unlink()
                rows.append({"hyperparameters": shown, "score": result["score"], "tasks": result["tasks"]})
                bar.set_postfix(best=max(_key(r["score"]) for r in rows))
                bar.update()
        best = max(range(len(rows)), key=lambda i: _key(rows[i]["score"]))
        report = None
        if out is not None or report_split is not None:
            target = out if out is not None else candidate
            api.merge(method, models, out=target, format=format if out is not None else "safetensors",
                      overwrite=overwrite or out is None, progress=progress, **merge_options, **hyperparameters,
                      **grid_candidates[best])
            if report_split is not None:
                report = evaluate(target, tasks, split=report_split, **eval_options)
    shown_grid = {n: [_typed(spec, {**hyperparameters, n: v}, [n])[n] for v in vs] for n, vs in grid.items()}
    return {"method": method, "hyperparameters": fixed, "grid": shown_grid,
            "select_split": select_split, "report_split": report_split, "candidates": rows,
            "best": {"index": best, "hyperparameters": rows[best]["hyperparameters"], "score": rows[best]["score"],
                     "report": report},
            "out": str(out) if out is not None else None}


def search(models: Sequence[Any], tasks: Iterable[Task | str | os.PathLike | Mapping[str, Any]], *,
           method: str = "fisher", num_samples: int | None = None, grid_points: int | None = None, seed: int = 0,
           **options: Any) -> dict[str, Any]:
    """Per-model ``weights`` of ``method`` searched as in FISHER (docs/methods.md §5.1): ``num_samples`` draws from
    Dirichlet(1, ..., 1) (seeded), or the simplex grid of ``grid_points`` points per axis (default, for two
    models only: FISHER's 51-point pairwise grid); each candidate scored by :func:`sweep` (``options`` are its
    keyword arguments). The result is sweep's, with ``"search": {"mode", "num_samples" | "grid_points", "seed"}``.
    """
    if isinstance(models, (str, os.PathLike, Mapping)):
        raise BlockmergeError("models must be a list of checkpoints")
    if num_samples is not None and grid_points is not None:
        raise BlockmergeError("give either num_samples (Dirichlet draws) or grid_points (a grid), not both")
    if num_samples is None and grid_points is None:
        if len(models) != 2:
            raise BlockmergeError(f"with {len(models)} models give num_samples (Dirichlet draws) or grid_points")
        grid_points = FISHER_GRID_POINTS
    if num_samples is not None:
        weights = dirichlet_weights(len(models), num_samples, seed)
        mode = {"mode": "dirichlet", "num_samples": num_samples, "seed": seed}
    else:
        weights = simplex_grid(len(models), grid_points)
        mode = {"mode": "grid", "grid_points": grid_points}
    return {**sweep(method, models, tasks, {"weights": weights}, **options), "search": mode}


def _key(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _typed(spec: Any, values: Mapping[str, Any], shown: Iterable[str]) -> dict[str, Any]:
    """The values of the ``shown`` hyperparameters as the method reads them (checked: a bad value fails here)."""
    hp, common = parse_hyperparameters(spec, dict(values))
    own = {f.name for f in dataclasses.fields(hp)}
    return {name: _plain(getattr(hp if name in own else common, name)) for name in shown}


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _default_config(base: Any, models: Sequence[Any]) -> str | None:
    for candidate in (base, *models):
        if isinstance(candidate, (str, os.PathLike)) and (Path(candidate) / "config.json").is_file():
            return str(candidate)
    return None
