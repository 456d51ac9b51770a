"""A statistic of a saved model over a contiguous range (a shard) of a task's examples, into a statistics writer:
the request and the computation that a local run (one shard, means) and Dask workers (many, sums) share."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import BlockmergeError
from .data import TaskSpec, batches, load_task
from .fisher import Statistics, blockwise_fisher, fisher
from .gram import gram
from .models import model_class, model_kind
from .store import StatisticsWriter, model_sha256

STATISTICS = ("fisher", "gram", "blockwise_fisher")


def load_model(path: str | os.PathLike, device: str = "cpu") -> tuple[Any, Any]:
    """A `transformers` model (the class its config names) and its tokenizer, from a local directory."""
    import transformers

    path = Path(path)
    cls, _ = model_class(path)
    try:
        model = cls.from_pretrained(path).to(device)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise BlockmergeError(f"cannot load model or tokenizer ({str(err).splitlines()[0]})", path=path) from None
    return model, tokenizer


@dataclasses.dataclass(frozen=True)
class Request:
    """What to compute: a statistic of the model at `model` over the first `num_examples` examples of `task`."""

    statistic: str
    model: str
    task: TaskSpec
    labels: str = "empirical"
    num_examples: int | None = 1000
    batch_size: int = 8
    device: str = "cpu"
    seed: int = 0
    parameters: str | None = None
    inputs: bool = True
    outputs: bool = False
    max_memory: int | None = None
    modules: str | None = None

    def check(self) -> None:
        """Refuse what no shard could compute, before anything is loaded."""
        if self.statistic not in STATISTICS:
            raise BlockmergeError(f"unknown statistic {self.statistic!r} ({', '.join(STATISTICS)})")
        if self.statistic == "blockwise_fisher" and self.parameters is None:
            raise BlockmergeError("blockwise Fisher needs --parameters (a regex of vector parameters)")
        if not positive_int(self.batch_size):
            raise BlockmergeError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.num_examples is not None and not positive_int(self.num_examples):
            raise BlockmergeError(f"num_examples must be a positive integer, got {self.num_examples!r}")
        for option, pattern in (("parameters", self.parameters), ("modules", self.modules)):
            try:
                re.compile(pattern or "")
            except re.error as err:
                raise BlockmergeError(f"bad {option} regex {pattern!r} ({err})") from None

    def summary(self, result: dict[str, Any], kinds: list[str], seconds: float, peak_rss_bytes: int) -> dict[str, Any]:
        """The metadata of the finished store, from the figures of :func:`write_shard` (summed over shards)."""
        return {
            "statistic": self.statistic, "kinds": kinds, "model": self.model, "model_sha256": result["model_sha256"],
            "model_kind": result["model_kind"], "data": self.task.data, "split": self.task.split,
            "examples": result["examples"], "tokens": result["tokens"], "target_tokens": result["target_tokens"],
            "labels": result["labels"], "batch_size": self.batch_size, "num_examples": self.num_examples,
            "seed": self.seed, "seconds": round(seconds, 3), "peak_rss_bytes": peak_rss_bytes,
        }


def inputs_of(model: str | os.PathLike, task: TaskSpec) -> list[str | os.PathLike]:
    """What a statistic of `model` over `task` reads: the model directory and the task's data (a glob expanded)."""
    return [model, task.data, *(glob.glob(task.data) if glob.has_magic(task.data) else [])]


def positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def shard_batches(dataset: Any, tokenizer: Any, request: Request, kind: str, num_labels: int | None, start: int,
                  stop: int | None) -> Iterator[dict[str, torch.Tensor]]:
    """The task's batches of examples [start, stop) (`start` a multiple of the batch size): the very batches of
    the whole task, numbered by position, so sampled labels and error messages do not depend on the sharding."""
    for batch in batches(dataset, tokenizer, request.task, kind, request.batch_size, stop, num_labels=num_labels):
        if int(batch["index"][0]) >= start:
            yield batch


def write_shard(request: Request, writer: StatisticsWriter, start: int, stop: int | None, *, sums: bool,
                progress: bool = False, check: Callable[[], None] | None = None) -> dict[str, Any]:
    """Compute the statistic over examples [start, stop) into `writer`: the means, or with `sums` the sums.

    `check` is called before every batch and every tensor written (to stop early). Returns the figures:
    examples, tokens, target_tokens, labels, counts ({kind: {name: terms of its sum}}), model_sha256, model_kind.
    """
    model, tokenizer = load_model(request.model, request.device)
    kind = model_kind(model)
    dataset = load_task(request.task)
    num_labels = getattr(model.config, "num_labels", None) if kind == "classification" else None
    data = shard_batches(dataset, tokenizer, request, kind, num_labels, start, stop)

    def add(kind_name: str, name: str, tensor: torch.Tensor) -> None:
        if check is not None:
            check()
        writer.add(kind_name, name, tensor)

    if check is not None:
        data = _checked(data, check)
    result = _statistic(request, model, data, add, sums, progress)
    for kind_name, by_name in sorted(result.tensors.items()):
        for name, tensor in sorted(by_name.items()):
            add(kind_name, name, tensor)
    return {"examples": result.examples, "tokens": result.tokens, "target_tokens": result.target_tokens,
            "labels": result.labels, "counts": result.counts, "model_sha256": model_sha256(model),
            "model_kind": kind}


def _checked(data: Iterator[dict[str, torch.Tensor]], check: Callable[[], None]) -> Iterator[dict[str, torch.Tensor]]:
    for batch in data:
        check()
        yield batch


def _statistic(request: Request, model: Any, data: Iterator[dict[str, torch.Tensor]],
               spill: Callable[[str, str, torch.Tensor], None], sums: bool, progress: bool) -> Statistics:
    common = {"labels": request.labels, "seed": request.seed, "device": request.device, "progress": progress,
              "sums": sums}
    if request.statistic == "fisher":
        return fisher(model, data, parameters=request.parameters, **common)
    if request.statistic == "blockwise_fisher":
        return blockwise_fisher(model, data, parameters=request.parameters, **common)
    return gram(model, data, inputs=request.inputs, outputs=request.outputs, max_memory=request.max_memory,
                spill=spill, modules=request.modules, **common)
