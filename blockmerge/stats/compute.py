"""A statistic of a saved model over a task, from files to a statistics store: what `blockmerge stats` runs."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..engine import memory
from ..errors import BlockmergeError
from .data import TaskSpec, batches, load_task
from .fisher import blockwise_fisher, fisher
from .gram import gram
from .models import model_kind
from .store import StatisticsWriter, model_sha256


def load_model(path: str | os.PathLike, device: str = "cpu") -> tuple[Any, Any]:
    """A `transformers` model (the class its config names) and its tokenizer, from a local directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    path = Path(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise BlockmergeError(f"not a model directory ({str(err).splitlines()[0]})", path=path) from None
    architecture = (config.architectures or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    if cls is None:
        raise BlockmergeError(f"config names no known transformers architecture ({architecture!r})", path=path)
    try:
        model = cls.from_pretrained(path).to(device)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise BlockmergeError(f"cannot load model or tokenizer ({str(err).splitlines()[0]})", path=path) from None
    return model, tokenizer


def compute(statistic: str, model_path: str | os.PathLike, task: TaskSpec, out: str | os.PathLike, *,
            labels: str = "empirical", num_examples: int | None = 1000, batch_size: int = 8, device: str = "cpu",
            seed: int = 0, parameters: str | None = None, inputs: bool = True, outputs: bool = False,
            max_memory: int | None = None, overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Compute `fisher`, `gram` or `blockwise_fisher` of the model at `model_path` over `task`; write to `out`.

    Returns the summary written into the store's metadata (examples, tokens, seconds, peak RSS).
    """
    start = time.perf_counter()
    model, tokenizer = load_model(model_path, device)
    kind = model_kind(model)
    dataset = load_task(task)
    num_labels = getattr(model.config, "num_labels", None) if kind == "classification" else None
    data = batches(dataset, tokenizer, task, kind, batch_size, num_examples, num_labels=num_labels)
    with StatisticsWriter(out, overwrite=overwrite) as writer:
        common = {"labels": labels, "seed": seed, "device": device, "progress": progress}
        if statistic == "fisher":
            result = fisher(model, data, parameters=parameters, **common)
        elif statistic == "blockwise_fisher":
            if parameters is None:
                raise BlockmergeError("blockwise Fisher needs --parameters (a regex of vector parameters)")
            result = blockwise_fisher(model, data, parameters=parameters, **common)
        elif statistic == "gram":
            result = gram(model, data, inputs=inputs, outputs=outputs, max_memory=max_memory,
                                      spill=writer.add, **common)
        else:
            raise BlockmergeError(f"unknown statistic {statistic!r} (fisher, gram, blockwise_fisher)")
        for kind_name, by_name in sorted(result.tensors.items()):
            for name, tensor in sorted(by_name.items()):
                writer.add(kind_name, name, tensor)
        summary = {
            "statistic": statistic, "kinds": sorted({k for k, _ in writer.checksums}),
            "model": str(model_path), "model_sha256": model_sha256(model), "model_kind": kind,
            "data": task.data, "split": task.split, "examples": result.examples, "tokens": result.tokens,
            "target_tokens": result.target_tokens, "labels": result.labels, "batch_size": batch_size,
            "num_examples": num_examples, "seed": seed,
            "seconds": round(time.perf_counter() - start, 3), "peak_rss_bytes": memory.peak_rss_bytes(),
        }
        writer.close(summary)
    return summary
