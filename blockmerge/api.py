"""The public Python API: `merge` and `methods`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .adapter_merge import merge_adapters
from .engine.adapters import open_model
from .engine.job import Job, Layout, Summary, check
from .engine.output import source_paths
from .engine.plan import DEFAULT_BLOCK_BYTES
from .engine.run import execute
from .engine.sinks import DEFAULT_SHARD_BYTES, infer_format, parse_size
from .engine.sources import Checkpoint, StoreCheckpoint, is_tokenizer_file, open_checkpoint, open_statistics
from .errors import BlockmergeError
from .plugins import Common, describe, get, parse_hyperparameters, registry
from .plugins.hyperparameters import IN_MEMORY, checkpoint_fields

Checkpointish = Mapping[str, torch.Tensor] | str | os.PathLike


def merge(method: str, models: Sequence[Checkpointish], base: Checkpointish | None = None,
          stats: Sequence[Any] | None = None, base_stats: Any = None, out: str | os.PathLike | None = None, *,
          format: str | None = None, block_size: int | str | None = None, device: str = "cpu",
          dtype: str | None = None, compute_dtype: str = "float32", resume: bool = False, overwrite: bool = False,
          codec: str = "none", max_shard_size: int | str = DEFAULT_SHARD_BYTES, progress: bool = False,
          executor: str = "local", scheduler: str | None = None, repo: str | os.PathLike | None = None,
          copy_tokenizer: bool | str | os.PathLike = True, adapter_rank: int | None = None, **hyperparameters: Any
          ) -> dict[str, torch.Tensor] | Summary | dict[str, Any]:
    """Merge fine-tuned checkpoints with a registered method, one parameter block at a time.

    models, base: paths (safetensors, shard index, .bin/.pt, Hugging Face directory, blockmerge
    store), `REV:PATH` of a file tracked with git-theta in the repository `repo` (default: the current one),
    or mappings of name -> tensor. stats: per model, a statistics store path, a one-kind statistics
    `.safetensors` file (or its `REV:PATH`) or {kind: path or mapping}. out: None returns the merged
    tensors; a path writes there atomically (`.safetensors` file, or a directory in `format` store |
    safetensors | hf) and returns the Summary. Hyperparameters use the canonical names of docs/methods.md §16.
    executor: `local`, or `dask` to run the blocks as tasks on the Dask cluster at `scheduler` (default
    $BLOCKMERGE_DASK_SCHEDULER, else a LocalCluster of this machine); inputs and `out` must then be
    paths every worker sees. format `adapter`: the models are PEFT LoRA adapters of `base` and the method is linear
    (`methods()` says which): `out` is one adapter, exact (rank Σ r) or truncated to `adapter_rank`, and the
    report (ranks, truncation errors) is returned. block_size: bytes of inputs per block (default 8 MiB, raised
    to the largest tensor of a method that merges whole tensors; a given size is never exceeded).
    copy_tokenizer: an `hf` output gets the base's (else the first model's) tokenizer files beside its config and
    other files; a directory: its tokenizer files instead; False: none.
    """
    if format == "adapter":
        if out is None or base is None:
            raise BlockmergeError("an adapter output needs out= (--out) and the adapters' base (--base)")
        return merge_adapters(method, list(models), base, out, rank=adapter_rank, overwrite=overwrite,
                              **hyperparameters)
    if adapter_rank is not None:
        raise BlockmergeError("adapter_rank (--adapter-rank) is for format='adapter' (--format adapter)")
    if executor not in ("local", "dask"):
        raise BlockmergeError(f"unknown executor {executor!r} (local or dask)")
    if scheduler is not None and executor != "dask":
        raise BlockmergeError("a scheduler is given but the executor is local (pass executor='dask' / --executor dask)")
    spec = get(method)
    in_memory = {name: hyperparameters[name] for name in checkpoint_fields(spec.hyperparameters)
                 if isinstance(hyperparameters.get(name), Mapping)}
    hp, common = parse_hyperparameters(spec, {**hyperparameters, **dict.fromkeys(in_memory, IN_MEMORY)})
    if isinstance(models, (str, os.PathLike, Mapping)) or len(models) == 0:
        raise BlockmergeError("models must be a non-empty list of checkpoints")
    opened_base = open_checkpoint(base, "base", repo=repo) if base is not None else None
    opened = [open_model(m, f"models[{i}]", opened_base, repo) for i, m in enumerate(models)]
    job = Job(
        method=spec, hyperparameters=hp, common=common, models=opened, base=opened_base,
        stats=[open_statistics(s, f"stats[{i}]", repo) for i, s in enumerate(stats or [])],
        base_stats=open_statistics(base_stats, "base_stats", repo) if base_stats is not None else {},
        inputs={name: _hyperparameter_checkpoint(spec.name, name, in_memory.get(name, getattr(hp, name)), repo)
                for name in spec.needs(hp).checkpoints},
        device=device, dtype=dtype, compute_dtype=compute_dtype,
        block_bytes=parse_size(block_size, "block_size") if block_size is not None else None, progress=progress,
    )
    layout = check(job)
    out_format = infer_format(out, format) if out is not None else "store"
    files = [f for f in (job.base or job.models[0]).files if copy_tokenizer is True or not is_tokenizer_file(f)]
    if not isinstance(copy_tokenizer, bool):
        files += sorted(f for f in Path(copy_tokenizer).iterdir() if f.is_file() and is_tokenizer_file(f))
    options = dict(out_format=out_format, codec=codec, shard_bytes=parse_size(max_shard_size, "max_shard_size"),
                   resume=resume, overwrite=overwrite, files=files,
                   inputs=source_paths(models, base, stats, base_stats, [hyperparameters[n] for n in job.inputs]))
    if executor == "dask":
        if out is None:
            raise BlockmergeError("the dask executor writes to a path every worker sees: pass out= / --out")
        from .engine.cluster import DaskExecutor

        with DaskExecutor(job, scheduler) as runner:
            summary, tensors = execute(job, layout, out, executor=runner, **options)
    else:
        summary, tensors = execute(job, layout, out, **options)
    return tensors if out is None else summary


def _hyperparameter_checkpoint(method: str, name: str, source: Any, repo: str | os.PathLike | None) -> Checkpoint:
    try:
        return open_checkpoint(source, name, repo=repo)
    except BlockmergeError as err:
        raise BlockmergeError(f"{method}: hyperparameter {name}: {err}") from None


def methods(name: str | None = None, **hyperparameters: Any) -> list[dict[str, Any]]:
    """Every registered method (or the one named): name, description, hyperparameters (type, default), and the base
    and statistics it needs at its defaults (or, for the named method, with `hyperparameters`)."""
    if name is None:
        return [describe(m) for _, m in sorted(registry().items())]
    method = get(name)
    hp, _ = parse_hyperparameters(method, hyperparameters)
    return [describe(method, hp)]


def convert(source: Checkpointish, out: str | os.PathLike, *, format: str | None = None, codec: str = "none",
            max_shard_size: int | str = DEFAULT_SHARD_BYTES, overwrite: bool = False,
            block_size: int | str = DEFAULT_BLOCK_BYTES, progress: bool = False, label: str = "copy") -> Summary:
    """Copy a checkpoint bit-exactly into another format (store, safetensors, hf), block by block; `label` names
    the copy on its progress bar."""
    ckpt = open_checkpoint(source, "source")
    copier = get("average")
    job = Job(method=copier, hyperparameters=copier.hyperparameters(), common=Common(), models=[ckpt],
              block_bytes=parse_size(block_size, "block_size"), progress=progress, label=label)
    layout = Layout(ckpt.specs, ckpt.specs, dict.fromkeys(ckpt.specs, "copy"), {}, frozenset())
    summary, _ = execute(job, layout, out, out_format=infer_format(out, format), codec=codec,
                         shard_bytes=parse_size(max_shard_size, "max_shard_size"), overwrite=overwrite,
                         files=ckpt.files, inputs=source_paths(source))
    return summary


def inspect(source: Checkpointish) -> dict[str, Any]:
    """Names, shapes, dtypes and sizes of a checkpoint (and the statistic kinds of a store)."""
    ckpt = open_checkpoint(source, "source")
    tensors = {n: {"shape": list(s.shape), "dtype": s.dtype, "bytes": s.nbytes} for n, s in ckpt.specs.items()}
    info: dict[str, Any] = {"path": ckpt.label, "tensors": tensors,
                            "total_bytes": sum(s.nbytes for s in ckpt.specs.values()),
                            "files": [f.name for f in ckpt.files]}
    if isinstance(ckpt, StoreCheckpoint):
        info["kinds"] = sorted(ckpt.reader.kinds())
        info["metadata"] = ckpt.reader.metadata
    return info
