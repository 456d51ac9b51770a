"""A merge's job (its inputs, opened, and options), what it reports, and the checks of its inputs that decide
each tensor's action before any data is read."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import BlockmergeError
from ..plugins import Common, Method
from ..plugins.hyperparameters import is_scheduled, places, resolve
from .kinds import statistic_shape
from .sources import Checkpoint
from .tensors import FLOATING, TensorSpec


@dataclass
class Job:
    """Everything a merge needs, already opened (nothing read yet)."""

    method: Method
    hyperparameters: Any
    common: Common
    models: list[Checkpoint]
    base: Checkpoint | None = None
    stats: list[dict[str, Checkpoint]] = field(default_factory=list)
    base_stats: dict[str, Checkpoint] = field(default_factory=dict)
    inputs: dict[str, Checkpoint] = field(default_factory=dict)  # checkpoints named by hyperparameters, by field
    device: str = "cpu"
    dtype: str | None = None
    compute_dtype: str = "float32"
    block_bytes: int | None = None  # None: the default, raised to the largest tensor a whole-tensor method holds
    progress: bool = False
    label: str | None = None  # the progress bar's label (default: the method's name)


@dataclass
class Summary:
    """What a merge did and what it cost."""

    method: str
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_rss_anon_bytes: int = 0
    peak_rss_file_bytes: int = 0
    peak_gpu_bytes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    blocks: int = 0
    passes: int = 0
    pass_seconds: list[float] = field(default_factory=list)  # each reduction pass before the merge
    tensors_merged: int = 0
    tensors_copied: int = 0
    tensors_averaged_missing_statistic: int = 0
    blocks_resumed: int = 0
    output: str | None = None
    reports: dict[str, list[dict]] = field(default_factory=dict)  # per tensor, one entry per block a method reported on


@dataclass
class Layout:
    """What happens to each tensor, decided before any data is read."""

    specs: dict[str, TensorSpec]
    out_specs: dict[str, TensorSpec]
    actions: dict[str, str]
    stat_kinds: dict[str, tuple[str, ...]]
    used_kinds: frozenset[str]


def device(name: str) -> torch.device:
    """The torch device `name` (cpu, cuda or cuda:N), checked to be there."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BlockmergeError(f"unknown device {name!r} (cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BlockmergeError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BlockmergeError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif device.type != "cpu":
        raise BlockmergeError(f"unsupported device {name!r} (cpu, cuda or cuda:N)")
    return device


def check(job: Job) -> Layout:
    """Validate names, shapes, dtypes, statistics and options; decide each tensor's action."""
    method = job.method
    needs = method.needs(job.hyperparameters)
    if not job.models:
        raise BlockmergeError(f"{method.name} needs at least one model")
    if needs.base and job.base is None:
        raise BlockmergeError(f"{method.name} needs a base (pretrained) checkpoint: pass base= / --base")
    try:
        method.validate(job.hyperparameters, len(job.models))
    except ValueError as err:
        raise BlockmergeError(f"{method.name}: {err}") from None
    if job.dtype is not None and job.dtype not in FLOATING:
        raise BlockmergeError(f"unknown output dtype {job.dtype!r} (choose from {', '.join(sorted(FLOATING))})")
    if job.compute_dtype not in ("float32", "float64"):
        raise BlockmergeError(f"compute dtype must be float32 or float64, got {job.compute_dtype!r}")
    device(job.device)
    try:
        excludes = [re.compile(p) for p in job.common.exclude]
    except re.error as err:
        raise BlockmergeError(f"exclude: bad regular expression ({err})") from None

    reference = job.models[0]
    specs = reference.specs
    for other in [*job.models[1:], *([job.base] if job.base else [])]:
        for name in sorted(set(specs) | set(other.specs)):
            if name not in other.specs:
                raise BlockmergeError(f"missing (present in {reference.label})", path=other.label, param=name)
            if name not in specs:
                raise BlockmergeError(f"not in {reference.label}", path=other.label, param=name)
            a, b = specs[name], other.specs[name]
            if a.shape != b.shape:
                raise BlockmergeError(f"shape {list(b.shape)} does not match {list(a.shape)} in {reference.label}",
                                      path=other.label, param=name)
            if a.dtype != b.dtype:
                raise BlockmergeError(f"dtype {b.dtype} does not match {a.dtype} in {reference.label}",
                                      path=other.label, param=name)
    for name in needs.checkpoints:
        if name not in job.inputs:
            raise BlockmergeError(f"{method.name}: hyperparameter {name} names a checkpoint, and none was opened")
    for name, ckpt in job.inputs.items():
        for param in sorted(n for n, s in specs.items() if s.floating):
            if param not in ckpt.specs:
                raise BlockmergeError(f"missing (the {name} checkpoint of {method.name})", path=ckpt.label,
                                      param=param)
            if ckpt.specs[param].shape != specs[param].shape or not ckpt.specs[param].floating:
                raise BlockmergeError(f"{ckpt.specs[param].dtype} {list(ckpt.specs[param].shape)} does not match "
                                      f"{specs[param].dtype} {list(specs[param].shape)} in {reference.label}",
                                      path=ckpt.label, param=param)
    if len(job.stats) not in (0, len(job.models)):
        raise BlockmergeError(f"statistics given for {len(job.stats)} models, there are {len(job.models)}")
    supplied = [set(s) for s in job.stats] or [set() for _ in job.models]
    for kind in needs.statistics:
        for t, kinds in enumerate(supplied):
            if kind not in kinds:
                raise BlockmergeError(f"{method.name} reads {kind!r} statistics; none given for model {t} "
                                      f"({job.models[t].label})")
    for t, kinds in enumerate(supplied):
        if needs.one_of_statistics and not kinds & set(needs.one_of_statistics):
            raise BlockmergeError(f"{method.name} reads {' or '.join(map(repr, needs.one_of_statistics))} "
                                  f"statistics; none given for model {t} ({job.models[t].label})")
    for kind in needs.base_statistics:
        if kind not in job.base_stats:
            raise BlockmergeError(f"{method.name} reads {kind!r} statistics of the base; none given")
    optional = {k for k in needs.optional_statistics + needs.one_of_statistics if all(k in s for s in supplied)}
    used = frozenset(needs.statistics) | frozenset(optional)
    declared = needs.statistics + needs.optional_statistics + needs.one_of_statistics
    for ckpts in [*job.stats, job.base_stats]:
        for kind, ckpt in ckpts.items():
            _check_statistic(kind, ckpt, specs)

    actions, stat_kinds, out_specs = {}, {}, {}
    for name, spec in specs.items():
        out_dtype = (job.dtype or spec.dtype) if spec.floating else spec.dtype
        out_specs[name] = TensorSpec(spec.shape, out_dtype)
        if not spec.floating or any(p.search(name) for p in excludes):
            actions[name] = "copy"
            continue
        present = {k: [k in s and name in s[k].specs for s in job.stats] for k in used}
        for kind, flags in present.items():
            if any(flags) and not all(flags):
                t = flags.index(False)
                raise BlockmergeError(f"no {kind!r} statistic for model {t} ({job.models[t].label}) "
                                      "while other models have one", param=name)
        for kind in needs.base_statistics:
            if name not in job.base_stats[kind].specs and job.common.missing_statistic == "error":
                raise BlockmergeError(f"no {kind!r} statistic of the base", param=name)
        together = [k for k in dict.fromkeys(declared) if statistic_shape(k, spec.shape) is not None]
        have = [k for k in together if k in used and all(present[k])]
        if have and len(have) < len(together):
            lacking = next(k for k in together if k not in have)
            raise BlockmergeError(f"has a {have[0]!r} statistic but no {lacking!r} statistic; {method.name} reads "
                                  "them together", param=name)
        applicable = [k for k in sorted(used) if k in together]
        missing = [k for k in applicable if not all(present[k])] if applicable else sorted(used)
        missing += [k for k in needs.base_statistics if name not in job.base_stats[k].specs]
        if missing:
            if job.common.missing_statistic == "error":
                raise BlockmergeError(f"no {missing[0]!r} statistic (missing_statistic=error)", param=name)
            actions[name] = "average"
            continue
        actions[name] = "merge"
        stat_kinds[name] = tuple(applicable)
    if is_scheduled(job.hyperparameters):
        placed = places(list(specs))
        for name in (n for n, a in actions.items() if a == "merge"):
            try:
                resolve(job.hyperparameters, placed[name])
            except ValueError as err:
                raise BlockmergeError(f"{method.name}: {err}", param=name) from None
    return Layout(specs, out_specs, actions, stat_kinds, used)


def _check_statistic(kind: str, ckpt: Checkpoint, specs: dict[str, TensorSpec]) -> None:
    for name, spec in ckpt.specs.items():
        if name not in specs:
            raise BlockmergeError(f"{kind!r} statistic for a parameter the models do not have", path=ckpt.label,
                                  param=name)
        expected = statistic_shape(kind, specs[name].shape)
        if expected is None:
            raise BlockmergeError(f"{kind!r} statistics do not apply to a tensor of shape {list(specs[name].shape)}",
                                  path=ckpt.label, param=name)
        if spec.shape != tuple(expected):
            raise BlockmergeError(f"{kind!r} statistic has shape {list(spec.shape)}, expected {list(expected)}",
                                  path=ckpt.label, param=name)
        if not spec.floating:
            raise BlockmergeError(f"{kind!r} statistic has dtype {spec.dtype}, expected a float type",
                                  path=ckpt.label, param=name)
