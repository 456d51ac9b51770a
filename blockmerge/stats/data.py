"""Examples for statistics: a small task format, loading, and padded batches (docs/methods.md §5.5, §6.2, §9).

A task is a :class:`TaskSpec`: where the examples are, which split, and which columns hold the input text,
the optional second text, the class label (classification) or the target text (sequence-to-sequence and
causal LM). It can be written as a YAML or JSON file whose keys are the field names; ``data`` is then
relative to that file::

    data: train.jsonl          # JSON/JSONL, CSV/TSV, Parquet (optionally compressed), a glob of those,
                               # or a directory written by datasets' save_to_disk
    split: train[:1000]        # split name, optionally sliced: [a:b] with ints or percentages
    text_column: text
    text_pair_column: null
    label_column: label        # classification: integer class ids
    target_column: null        # seq2seq / causal LM: target text (then label_column is not read)
    max_length: 128

A file (or glob) holds one split, which takes the name given in ``split``; a ``save_to_disk`` directory
holding a ``DatasetDict`` must contain that split.

:func:`batches` turns the examples into right-padded tensors. Every batch has ``input_ids``,
``attention_mask`` and ``index`` (the examples' positions, used to seed per-example sampling), plus

* classification: ``labels`` ``[B]`` (and ``token_type_ids`` when the tokenizer returns them);
* seq2seq: ``labels`` ``[B, T']`` with padding set to -100 and ``decoder_attention_mask`` ``[B, T']``
  (1 on target tokens, the target mask of docs/methods.md §6.2);
* causal LM: ``input_ids`` = prompt followed by the target (and the tokenizer's EOS token, as a
  fine-tune on prompt → answer sees it) and ``target_mask`` ``[B, T]`` marking the target tokens, the
  only ones the loss counts (docs/methods.md §9).

Batch size changes nothing but speed: the statistics are per example (batch-size-1 semantics).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from ..errors import BlockmergeError

if TYPE_CHECKING:
    import datasets

KINDS = ("classification", "seq2seq", "causal_lm")

_BUILDERS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "csv",
             ".parquet": "parquet", ".pq": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4")
_SPLIT = re.compile(r"^\s*([^\[\]\s]+)\s*(?:\[\s*([+-]?\d+%?)?\s*:\s*([+-]?\d+%?)?\s*\])?\s*$")


def read_task_file(path: Path) -> Any:
    """The parsed content of a task file: YAML, or JSON by its extension."""
    if not path.is_file():
        raise BlockmergeError("task file not found", path=path)
    try:
        text = path.read_text()
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise BlockmergeError(f"cannot read task file: {' '.join(str(e).split())}", path=path) from None


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's examples are and which columns to read (see the module docstring)."""

    data: str
    split: str = "train"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str | None = "label"
    target_column: str | None = None
    max_length: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 2:
            raise BlockmergeError(f"max_length must be an integer >= 2, got {self.max_length!r}", path=self.data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TaskSpec:
        """Read a task from a YAML or JSON file; a relative ``data`` is taken relative to the file."""
        path = Path(path)
        raw = read_task_file(path)
        if not isinstance(raw, dict):
            raise BlockmergeError("a task file must be a mapping of TaskSpec fields", path=path)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise BlockmergeError(f"unknown task keys {unknown} (known: {sorted(known)})", path=path)
        if "data" not in raw:
            raise BlockmergeError("task file has no 'data' key", path=path)
        data = str(raw["data"])
        if not os.path.isabs(data):
            data = str(path.parent / data)
        return cls(**{**raw, "data": data})

    def required_columns(self) -> list[str]:
        """The columns this task reads: text, text pair, and the target text or else the label."""
        cols = [self.text_column]
        if self.text_pair_column is not None:
            cols.append(self.text_pair_column)
        if self.target_column is not None:
            cols.append(self.target_column)
        elif self.label_column is not None:
            cols.append(self.label_column)
        return cols


def _parse_split(spec: TaskSpec) -> tuple[str, str | None, str | None]:
    match = _SPLIT.match(spec.split)
    if match is None:
        raise BlockmergeError(f"cannot parse split {spec.split!r} (expected NAME or NAME[a:b])", path=spec.data)
    return match.group(1), match.group(2), match.group(3)


def _slice(dataset: datasets.Dataset, start: str | None, stop: str | None) -> datasets.Dataset:
    if start is None and stop is None:
        return dataset
    n = len(dataset)

    def bound(value: str | None) -> int | None:
        if value is None:
            return None
        return round(float(value[:-1]) * n / 100) if value.endswith("%") else int(value)

    rows = range(n)[slice(bound(start), bound(stop))]
    return dataset.select(rows) if len(rows) else dataset.select([])


def _data_files(spec: TaskSpec) -> tuple[str, list[str]]:
    pattern = spec.data
    files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not files or not all(os.path.isfile(f) for f in files):
        missing = next((f for f in files if not os.path.isfile(f)), pattern)
        raise BlockmergeError("data file not found", path=missing)
    builders = set()
    for f in files:
        name = f.lower()
        for ext in _COMPRESSION:
            name = name.removesuffix(ext)
        builder = _BUILDERS.get(os.path.splitext(name)[1])
        if builder is None:
            raise BlockmergeError(f"unknown data format (expected one of {sorted(_BUILDERS)})", path=f)
        builders.add(builder)
    if len(builders) > 1:
        raise BlockmergeError(f"data files mix formats {sorted(builders)}", path=spec.data)
    return builders.pop(), files


def load_task(spec: TaskSpec) -> datasets.Dataset:
    """Load the examples of ``spec`` as a ``datasets.Dataset`` (one split, sliced, columns checked).

    Raises :class:`BlockmergeError` naming the file (and the column or split) when the file is missing or
    unreadable, the split is unknown or empty, or a column the task reads is absent.
    """
    import datasets

    name, start, stop = _parse_split(spec)
    if os.path.isdir(spec.data):
        try:
            loaded = datasets.load_from_disk(spec.data)
        except Exception as e:  # datasets raises FileNotFoundError / ValueError variants
            raise BlockmergeError(f"not a datasets.save_to_disk directory: {e}", path=spec.data) from e
        if isinstance(loaded, datasets.DatasetDict):
            if name not in loaded:
                raise BlockmergeError(f"unknown split {name!r} (available: {sorted(loaded)})", path=spec.data)
            dataset = loaded[name]
        else:
            dataset = loaded
    else:
        builder, files = _data_files(spec)
        kwargs: dict[str, Any] = {}
        if builder == "csv" and all(f.lower().split(".")[-1] == "tsv" or ".tsv." in f.lower() for f in files):
            kwargs["sep"] = "\t"
        try:
            dataset = datasets.load_dataset(builder, data_files={name: files}, split=name, **kwargs)
        except Exception as e:  # malformed files: pyarrow / pandas / datasets errors of many types
            if _is_empty(files):
                raise BlockmergeError(f"split {spec.split!r} is empty", path=spec.data) from e
            raise BlockmergeError(f"cannot read data: {' '.join(str(e).split())}", path=spec.data) from e
    dataset = _slice(dataset, start, stop)
    if len(dataset) == 0:
        raise BlockmergeError(f"split {spec.split!r} is empty", path=spec.data)
    for column in spec.required_columns():
        if column not in dataset.column_names:
            raise BlockmergeError(f"column {column!r} not found (columns: {dataset.column_names})", path=spec.data)
    return dataset


def _is_empty(files: Sequence[str]) -> bool:
    try:
        for f in files:
            with open(f, "rb") as handle:
                if handle.read(4096).strip():
                    return False
        return True
    except OSError:
        return False


def check_labels(dataset: datasets.Dataset, spec: TaskSpec, num_labels: int | None = None,
                 num_examples: int | None = None) -> None:
    """Check the class labels of the first ``num_examples`` examples: integers in ``[0, num_labels)``."""
    if spec.label_column is None:
        raise BlockmergeError("classification needs a label_column", path=spec.data)
    if spec.label_column not in dataset.column_names:
        raise BlockmergeError(f"column {spec.label_column!r} not found (columns: {dataset.column_names})",
                              path=spec.data)
    n = len(dataset) if num_examples is None else min(num_examples, len(dataset))
    values = dataset.select(range(n))[spec.label_column]
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                continue
            raise BlockmergeError(f"column {spec.label_column!r}: example {i} has label {v!r}, not an integer "
                                  "class id", path=spec.data)
        if v < 0 or (num_labels is not None and v >= num_labels):
            bound = f"the {num_labels} classes of the model's head" if num_labels is not None else "class ids >= 0"
            raise BlockmergeError(f"column {spec.label_column!r}: example {i} has label {v}, outside {bound}",
                                  path=spec.data)


def _texts(rows: dict[str, list], column: str, start: int, spec: TaskSpec) -> list[str]:
    values = rows[column]
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise BlockmergeError(f"column {column!r}: example {start + i} is {v!r}, not text", path=spec.data)
    return values


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _mask(seqs: list[list[int]]) -> torch.Tensor:
    return _pad([[1] * len(s) for s in seqs], 0)


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS token, else 0 (always masked)."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def batches(dataset: datasets.Dataset, tokenizer: Any, spec: TaskSpec, kind: str, batch_size: int,
            num_examples: int | None = None, *, num_labels: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Yield right-padded batches of the first ``num_examples`` examples (all when None).

    ``kind`` is ``classification``, ``seq2seq`` or ``causal_lm`` (see the module docstring for the keys).
    Classification labels are checked up front (integers, and below ``num_labels`` when given — pass the
    model's ``config.num_labels``). Errors name the file and the column at fault.
    """
    if kind not in KINDS:
        raise BlockmergeError(f"unknown model kind {kind!r} (expected one of {list(KINDS)})")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BlockmergeError(f"batch_size must be a positive integer, got {batch_size!r}")
    cols = [spec.text_column] + ([spec.text_pair_column] if spec.text_pair_column else [])
    if kind == "classification":
        check_labels(dataset, spec, num_labels, num_examples)
        cols.append(spec.label_column)
    else:
        if spec.target_column is None:
            raise BlockmergeError(f"a {kind} task needs a target_column", path=spec.data)
        cols.append(spec.target_column)
    for column in cols:
        if column not in dataset.column_names:
            raise BlockmergeError(f"column {column!r} not found (columns: {dataset.column_names})", path=spec.data)
    total = len(dataset) if num_examples is None else min(int(num_examples), len(dataset))
    if total == 0:
        raise BlockmergeError(f"split {spec.split!r} is empty", path=spec.data)
    pad = pad_id(tokenizer)
    for start in range(0, total, batch_size):
        rows = dataset[start:min(start + batch_size, total)]
        texts = _texts(rows, spec.text_column, start, spec)
        pairs = _texts(rows, spec.text_pair_column, start, spec) if spec.text_pair_column else None
        index = torch.arange(start, start + len(texts), dtype=torch.long)
        if kind == "causal_lm":
            yield _causal_batch(tokenizer, spec, texts, pairs, _texts(rows, spec.target_column, start, spec),
                                start, pad) | {"index": index}
            continue
        enc = tokenizer(texts, pairs, truncation=True, max_length=spec.max_length)
        ids = enc["input_ids"]
        batch = {"input_ids": _pad(ids, pad), "attention_mask": _mask(ids)}
        if "token_type_ids" in enc:
            batch["token_type_ids"] = _pad(enc["token_type_ids"], 0)
        if kind == "classification":
            batch["labels"] = torch.tensor([int(v) for v in rows[spec.label_column]], dtype=torch.long)
        else:
            targets = _texts(rows, spec.target_column, start, spec)
            tids = tokenizer(text_target=targets, truncation=True, max_length=spec.max_length)["input_ids"]
            for i, t in enumerate(tids):
                if not t:
                    raise BlockmergeError(f"column {spec.target_column!r}: example {start + i} has an empty target",
                                          path=spec.data)
            batch["labels"] = _pad(tids, -100)
            batch["decoder_attention_mask"] = _mask(tids)
        batch["index"] = index
        yield batch


def _causal_batch(tokenizer: Any, spec: TaskSpec, texts: list[str], pairs: list[str] | None, targets: list[str],
                  start: int, pad: int) -> dict[str, torch.Tensor]:
    prompts = tokenizer(texts, pairs)["input_ids"]
    answers = tokenizer(targets, add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    seqs, tmask = [], []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        a = list(a) + ([int(eos)] if eos is not None else [])
        if not a:
            raise BlockmergeError(f"column {spec.target_column!r}: example {start + i} has an empty target",
                                  path=spec.data)
        p = list(p)
        if not p:  # the first target token needs a token before it to be predicted
            if bos is None and eos is None:
                raise BlockmergeError(f"column {spec.text_column!r}: example {start + i} has an empty prompt and "
                                      "the tokenizer has no BOS/EOS token to start it", path=spec.data)
            p = [int(bos if bos is not None else eos)]
        a = a[:spec.max_length - 1]
        p = p[len(p) - (spec.max_length - len(a)):] if len(p) + len(a) > spec.max_length else p
        seqs.append(p + a)
        tmask.append([0] * len(p) + [1] * len(a))
    return {"input_ids": _pad(seqs, pad), "attention_mask": _mask(seqs), "target_mask": _pad(tmask, 0)}
