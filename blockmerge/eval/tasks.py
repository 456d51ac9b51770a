"""Evaluation tasks: named splits of examples, the columns to read, metrics, tokenizer and optional head.

A task is a YAML or JSON file (or the same mapping in Python); relative paths are taken relative to the file::

    name: sentiment                # default: the file name without its extension
    data: data/sentiment           # a datasets.save_to_disk directory, a data file or glob (JSON/JSONL, CSV/TSV,
                                   # Parquet), or a mapping split name -> file
    splits:                        # split name -> what to load (slices as in datasets); default: the keys of a
      validation: validation[:500] # `data` mapping, else validation and test
      test: test
    text_column: sentence
    text_pair_column: null
    label_column: label            # classification: integer class ids
    target_column: null            # seq2seq / causal LM: the target text
    max_length: 128
    metric: [accuracy, macro_f1]   # accuracy, macro_f1 | exact_match, token_accuracy, token_loss
    tokenizer: models/sentiment    # local tokenizer directory (default: the directory of the model's config)
    config: null                   # directory whose config.json gives the architecture (default: the head's
                                   # directory, else the config passed to evaluate, else the evaluated directory)
    head: models/sentiment         # checkpoint this task's head parameters are read from (optional)
    head_parameters: null          # regex (full match) of the head's parameter names (default: every parameter
                                   # outside the transformers base model, e.g. classifier.*)

Examples are read by :func:`blockmerge.stats.data.load_task`, one :class:`~blockmerge.stats.data.TaskSpec` per
split, so a data file holds one split, named by the split expression. The default metric is ``accuracy`` for a
task with a label column only, ``exact_match`` for one with a target column.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BlockmergeError
from ..stats.data import TaskSpec, load_task, read_task_file
from .metrics import CLASSIFICATION_METRICS, METRICS

COLUMN_KEYS = ("text_column", "text_pair_column", "label_column", "target_column", "max_length")
KEYS = ("name", "data", "splits", *COLUMN_KEYS, "metric", "tokenizer", "config", "head", "head_parameters")
DEFAULT_SPLITS = ("validation", "test")


@dataclass
class Task:
    """One evaluation task (see the module docstring); loaded splits and tokenizers are kept once read."""

    name: str
    splits: dict[str, TaskSpec]
    metrics: tuple[str, ...]
    tokenizer: str | None = None
    config: str | None = None
    head: str | None = None
    head_parameters: str | None = None
    source: str = "task"
    _datasets: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _tokenizers: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Task:
        """Read a task file (YAML, or JSON by its extension)."""
        path = Path(path)
        raw = read_task_file(path)
        return cls.from_dict(raw, base=path.parent, name=path.stem, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, *, base: str | os.PathLike = ".", name: str | None = None,
                  source: str = "task") -> Task:
        """A task from the mapping of a task file; relative paths are taken relative to ``base``."""
        if not isinstance(raw, Mapping):
            raise BlockmergeError("a task must be a mapping of task keys", path=source)
        unknown = sorted(set(raw) - set(KEYS))
        if unknown:
            raise BlockmergeError(f"unknown task key {unknown[0]!r} (known: {', '.join(KEYS)})", path=source)
        base = Path(base)
        task_name = raw.get("name", name)
        if not isinstance(task_name, str) or not task_name:
            raise BlockmergeError("the task needs a 'name' (a non-empty string)", path=source)
        columns = {k: raw[k] for k in COLUMN_KEYS if k in raw}
        for key in ("text_column", "text_pair_column", "label_column", "target_column"):
            if key in columns and columns[key] is not None and not isinstance(columns[key], str):
                raise BlockmergeError(f"{key} must be a column name, got {columns[key]!r}", path=source)
        metrics = _metrics(raw.get("metric"), columns, source)
        splits = {split: TaskSpec(data=data, split=expression, **columns)
                  for split, (data, expression) in _splits(raw, base, source).items()}
        paths = {k: _path(raw.get(k), base, k, source) for k in ("tokenizer", "config", "head")}
        pattern = raw.get("head_parameters")
        if pattern is not None:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                raise BlockmergeError(f"head_parameters: bad regular expression {pattern!r} ({err})",
                                      path=source) from None
        return cls(name=task_name, splits=splits, metrics=metrics, head_parameters=pattern, source=source, **paths)

    @property
    def classification(self) -> bool:
        """Whether the task's metrics are classification metrics (else sequence metrics)."""
        return self.metrics[0] in CLASSIFICATION_METRICS

    def spec(self, split: str) -> TaskSpec:
        """Where the examples of ``split`` are and which columns to read."""
        if split not in self.splits:
            raise BlockmergeError(f"task {self.name!r} has no split {split!r} (declared: {', '.join(self.splits)})",
                                  path=self.source)
        return self.splits[split]

    def dataset(self, split: str) -> Any:
        """The examples of ``split`` (a ``datasets.Dataset``), loaded once."""
        if split not in self._datasets:
            self._datasets[split] = load_task(self.spec(split))
        return self._datasets[split]

    def load_tokenizer(self, config_dir: str | os.PathLike) -> Any:
        """The task's tokenizer, or else the one saved with the model's config in ``config_dir``."""
        directory = str(self.tokenizer or config_dir)
        if directory not in self._tokenizers:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoTokenizer

            if not Path(directory).is_dir():
                raise BlockmergeError(f"task {self.name!r}: tokenizer directory not found", path=directory)
            try:
                self._tokenizers[directory] = AutoTokenizer.from_pretrained(directory)
            except (OSError, ValueError, KeyError) as err:
                raise BlockmergeError(f"task {self.name!r}: cannot load tokenizer ({str(err).splitlines()[0]})",
                                      path=directory) from None
        return self._tokenizers[directory]


def load_tasks(tasks: Iterable[Task | str | os.PathLike | Mapping[str, Any]]) -> list[Task]:
    """Tasks from Task objects, task file paths or mappings (paths relative to the working directory)."""
    if isinstance(tasks, (str, os.PathLike, Mapping, Task)):
        tasks = [tasks]
    loaded = []
    for i, item in enumerate(tasks):
        if isinstance(item, Task):
            loaded.append(item)
        elif isinstance(item, Mapping):
            loaded.append(Task.from_dict(item, name=f"task{i}", source=f"tasks[{i}]"))
        elif isinstance(item, (str, os.PathLike)):
            loaded.append(Task.from_file(item))
        else:
            raise BlockmergeError(f"tasks[{i}]: expected a task file, a mapping or a Task, got {type(item).__name__}")
    if not loaded:
        raise BlockmergeError("no tasks given")
    seen: dict[str, str] = {}
    for task in loaded:
        if task.name in seen:
            raise BlockmergeError(f"task name {task.name!r} is used twice (also by {seen[task.name]})",
                                  path=task.source)
        seen[task.name] = task.source
    return loaded


def _metrics(value: Any, columns: Mapping[str, Any], source: str) -> tuple[str, ...]:
    target = columns.get("target_column")
    if value is None:
        value = ["exact_match" if target is not None else "accuracy"]
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise BlockmergeError(f"metric must be a metric name or a list of them, got {value!r}", path=source)
    for n in names:
        if n not in METRICS:
            raise BlockmergeError(f"unknown metric {n!r} (known: {', '.join(METRICS)})", path=source)
    classification = {n in CLASSIFICATION_METRICS for n in names}
    if len(classification) > 1:
        raise BlockmergeError(f"metrics {names} mix classification and sequence metrics", path=source)
    if classification == {True} and columns.get("label_column", "label") is None:
        raise BlockmergeError(f"metric {names[0]!r} needs a label_column", path=source)
    if classification == {False} and target is None:
        raise BlockmergeError(f"metric {names[0]!r} needs a target_column", path=source)
    return tuple(dict.fromkeys(names))


def _splits(raw: Mapping[str, Any], base: Path, source: str) -> dict[str, tuple[str, str]]:
    """split name -> (data path, split expression)."""
    data = raw.get("data")
    if data is None:
        raise BlockmergeError("the task has no 'data'", path=source)
    if isinstance(data, Mapping):
        if not data or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise BlockmergeError("data must be a path or a non-empty mapping of split name -> path", path=source)
        files = {k: str(base / v) for k, v in data.items()}
    elif isinstance(data, str):
        files = None
    else:
        raise BlockmergeError(f"data must be a path or a mapping of split name -> path, got {data!r}", path=source)
    splits = raw.get("splits")
    if splits is None:
        splits = {s: s for s in (files or DEFAULT_SPLITS)}
    if (not isinstance(splits, Mapping) or not splits
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in splits.items())):
        raise BlockmergeError(f"splits must be a non-empty mapping of split name -> split, got {splits!r}",
                              path=source)
    out = {}
    for split, expression in splits.items():
        if files is None:
            out[split] = (str(base / data), expression)
        elif split in files:
            out[split] = (files[split], expression)
        else:
            raise BlockmergeError(f"split {split!r} has no file in 'data' (files for: {', '.join(files)})",
                                  path=source)
    return out


def _path(value: Any, base: Path, key: str, source: str) -> str | None:
    """A path relative to the task file when it exists there; otherwise kept as written (e.g. REV:PATH)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BlockmergeError(f"{key} must be a path, got {value!r}", path=source)
    resolved = base / value
    return str(resolved) if resolved.exists() else value
