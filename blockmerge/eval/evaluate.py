"""Evaluate a checkpoint on tasks: the model built from a config, its weights read through the engine's
checkpoint readers (any format blockmerge reads), per-task heads laid over them, metrics on one split."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..engine.sources import Checkpoint, open_checkpoint
from ..errors import BlockmergeError
from ..stats.data import batches
from ..stats.models import logits, model_class, model_kind, prepare, to_device
from .metrics import Tally, score
from .tasks import Task, load_tasks


def evaluate(checkpoint: Any, tasks: Iterable[Task | str | os.PathLike | Mapping[str, Any]], *, split: str = "test",
             config: str | os.PathLike | None = None, batch_size: int = 32, device: str = "cpu",
             dtype: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Score ``checkpoint`` on the ``split`` of each task.

    checkpoint: a path blockmerge reads (safetensors, shard index, .bin/.pt, Hugging Face directory, store) or a
    mapping of name -> tensor. tasks: task files, mappings of task keys or :class:`Task` objects (a Task keeps
    its loaded data, so reuse it across calls). config: the directory whose ``config.json`` gives the
    architecture for tasks that name neither a ``config`` nor a head directory (default: ``checkpoint`` when it
    is such a directory). Returns ``{"checkpoint", "split", "tasks": {name: {"metrics", "examples", "score"}},
    "score"}`` — the overall score is the mean of the task scores (see :mod:`blockmerge.eval.metrics`).
    """
    tasks = load_tasks(tasks)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise BlockmergeError(f"batch_size must be a positive integer, got {batch_size!r}")
    torch_dtype = _dtype(dtype)
    ckpt = open_checkpoint(checkpoint, "checkpoint")
    groups: dict[tuple[str, str | None, str | None], list[Task]] = {}
    for task in tasks:
        task.dataset(split)  # bad task data fails here, before any model is built
        key = (_config_dir(task, config, checkpoint), task.head, task.head_parameters)
        groups.setdefault(key, []).append(task)
    results: dict[str, dict[str, Any]] = {}
    for (config_dir, head, pattern), group in groups.items():
        head_ckpt = open_checkpoint(head, f"head of task {group[0].name!r}") if head is not None else None
        model = load_model(ckpt, config_dir, head=head_ckpt, head_parameters=pattern, device=device,
                           dtype=torch_dtype)
        for task in group:
            results[task.name] = evaluate_task(model, task, split, config_dir=config_dir, batch_size=batch_size,
                                               device=device, progress=progress)
        del model
    ordered = {task.name: results[task.name] for task in tasks}
    return {"checkpoint": ckpt.label, "split": split, "tasks": ordered,
            "score": sum(r["score"] for r in ordered.values()) / len(ordered)}


@torch.no_grad()
def evaluate_task(model: torch.nn.Module, task: Task, split: str, *, config_dir: str | os.PathLike,
                  batch_size: int = 32, device: str = "cpu", progress: bool = False) -> dict[str, Any]:
    """``{"metrics": {name: value}, "examples": n, "score": s}`` of a loaded model on one split of a task."""
    kind = model_kind(model)
    if task.classification != (kind == "classification"):
        raise BlockmergeError(f"task {task.name!r}: metric {task.metrics[0]!r} does not apply to a {kind} model "
                              f"({type(model).__name__})", path=task.source)
    spec = task.spec(split)
    dataset = task.dataset(split)
    tokenizer = task.load_tokenizer(config_dir)
    num_labels = model.config.num_labels if kind == "classification" else None
    tally = Tally(kind)
    data = batches(dataset, tokenizer, spec, kind, batch_size, num_labels=num_labels)
    with tqdm(data, total=math.ceil(len(dataset) / batch_size), desc=f"{task.name} ({split})", unit="batch",
              disable=not progress, leave=False) as bar:
        for batch in bar:
            batch = to_device(prepare(model, batch, kind), device)
            tally.add(logits(model, batch, kind), batch)
    values = tally.values(task.metrics)
    return {"metrics": values, "examples": tally.examples, "score": score(values)}


def load_model(checkpoint: Checkpoint, config_dir: str | os.PathLike, *, head: Checkpoint | None = None,
               head_parameters: str | None = None, device: str = "cpu",
               dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The transformers model named by ``config_dir/config.json`` with its weights read from ``checkpoint``, and
    its head parameters (``head_parameters``, default every parameter outside the base model) from ``head``.

    Every parameter and persistent buffer must come from a checkpoint (tied weights once); a missing or
    mis-shaped one is an error naming it.
    """
    model = _instantiate(config_dir)
    state = model.state_dict()
    head_names = _head_names(model, state, head_parameters) if head is not None else set()
    missing, loaded = [], set()
    with torch.no_grad():
        for name, target in state.items():
            source = head if name in head_names else checkpoint
            if name not in source.specs:
                missing.append((name, source, target))
                continue
            spec = source.specs[name]
            if tuple(spec.shape) != tuple(target.shape):
                raise BlockmergeError(f"shape {list(spec.shape)} does not match {list(target.shape)} in the model "
                                      f"of {config_dir}", path=source.label, param=name)
            target.copy_(source.read(name, 0, spec.rows))
            loaded.add(target.data_ptr())
    missing = [(n, s) for n, s, t in missing if t.data_ptr() not in loaded]  # tied to a loaded tensor
    if missing:
        name, source = missing[0]
        hint = "" if head is not None else " (a task can read its head from a checkpoint: 'head')"
        raise BlockmergeError(f"missing ({len(missing)} parameters the model of {config_dir} needs are absent, "
                              f"e.g. {[n for n, _ in missing[:3]]}){hint}", path=source.label, param=name)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def _instantiate(config_dir: str | os.PathLike) -> torch.nn.Module:
    cls, config = model_class(config_dir, "model config directory")
    return cls(config)


def _head_names(model: torch.nn.Module, state: Mapping[str, torch.Tensor], pattern: str | None) -> set[str]:
    if pattern is None:
        prefix = getattr(model, "base_model_prefix", "")
        if not prefix or not hasattr(model, prefix):
            raise BlockmergeError(f"{type(model).__name__} has no separate base model: give the task's "
                                  "head_parameters (a regex of the head's parameter names)")
        names = {n for n in state if not n.startswith(prefix + ".")}
    else:
        regex = re.compile(pattern)
        names = {n for n in state if regex.fullmatch(n)}
    if not names:
        raise BlockmergeError(f"head_parameters {pattern!r} matches no parameter of {type(model).__name__}"
                              if pattern is not None else f"{type(model).__name__} has no head parameters")
    return names


def _config_dir(task: Task, config: str | os.PathLike | None, checkpoint: Any) -> str:
    """The task's config, else its head's directory, else ``config``, else the evaluated directory."""
    if task.config is not None:
        return _require_config(task.config, f"task {task.name!r}: config")
    if _has_config(task.head):
        return str(task.head)
    if config is not None:
        return _require_config(config, "config")
    if _has_config(checkpoint):
        return str(checkpoint)
    raise BlockmergeError(f"task {task.name!r}: no model config (config.json) to build the model from: name a "
                          "'config' directory in the task, or pass one (config=, --config)", path=task.source)


def _has_config(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and (Path(path) / "config.json").is_file()


def _require_config(directory: str | os.PathLike, what: str) -> str:
    if not (Path(directory) / "config.json").is_file():
        raise BlockmergeError(f"{what}: no config.json in this directory", path=directory)
    return str(directory)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
              "float64": torch.float64}
    if name not in dtypes:
        raise BlockmergeError(f"unknown evaluation dtype {name!r} (choose from {', '.join(dtypes)})")
    return dtypes[name]
