"""The stages of the realistic benchmark for one seed: tasks, fine-tuned models, encoders, statistics, merges.

Every stage leaves its products under ``WORK/seed<N>/`` and a record ``<product>.json`` holding the settings it
was made with (its key) and its result; a stage whose record matches is not run again. Keys nest the keys of
the stages they read, so changing e.g. the fine-tuning steps redoes the models, their statistics and merges.

Only the encoders (``bert.*``) are merged: each task keeps its own head (``classifier.*``, ``[k, 384]``), read
at evaluation from the fine-tuned directory. With ``lora_rank`` > 0 the fine-tunes are LoRA adapters, and the
merges read each task's adapter directory over the base encoder (``adapters/<task>``), not a full encoder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import TASKS, build_tasks  # noqa: E402
from finetune import base_model_dir, finetune_task, read_manifest, task_spec  # noqa: E402

from blockmerge.engine.sources import open_statistics  # noqa: E402
from blockmerge.errors import BlockmergeError  # noqa: E402
from blockmerge.eval import Task, evaluate, sweep  # noqa: E402
from blockmerge.stats.compute import compute  # noqa: E402
from blockmerge.stats.store import write_statistics  # noqa: E402

BODY = "bert."
BODY_REGEX = r"bert\..*"
MERGE_CHILD = Path(__file__).resolve().with_name("merge_child.py")


@dataclasses.dataclass(frozen=True)
class Method:
    """A merge method as the benchmark runs it: its grid (empty: no sweep), fixed values and statistics."""

    grid: dict[str, list[Any]]
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    stats: str | None = None  # "fisher" or "gram": which statistics store of each model it reads
    zero_base_fisher: bool = False
    # MaTS: starting points swept besides the grid's; "task_arithmetic" is the grid itself, a method's name its
    # chosen merge (see chosen_merge), passed as initialization=PATH with the grid's other values
    starts: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of the benchmark and the grids swept (defaults: the published run)."""

    tasks: tuple[str, ...] = TASKS
    train: int = 1000
    validation: int = 200
    test: int = 500
    max_length: int = 32
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-4
    lora_rank: int = 0  # > 0: fine-tune LoRA adapters of this rank (and the head), and merge the adapters
    lora_alpha: int = 16
    stat_examples: int = 128
    fisher_batch_size: int = 4
    gram_batch_size: int = 16
    scaling: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    regmean_alpha: tuple[float, ...] = (0.5, 0.7, 0.9)
    mats_init: tuple[float, ...] = (0.3, 0.6, 0.9)
    mats_iterations: tuple[int, ...] = (10, 30, 100)
    mats_start: tuple[str, ...] = ("task_arithmetic", "ties", "regmean")
    mats_objective: tuple[str, ...] = ("blockwise_fisher", "regmean")
    ubgm_scaling: tuple[float, ...] = (0.25, 0.5)
    ubgm_delta0: tuple[float, ...] = (1e-12, 1e-5)
    subspace_scaling: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)  # the papers sweep up to 3.0

    def methods(self) -> dict[str, Method]:
        """Every method of docs/methods.md §16 with the grid of its main hyperparameter(s)."""
        return {
            "average": Method({}),
            "task_arithmetic": Method({"scaling_factor": list(self.scaling)}),
            "dare": Method({"scaling_factor": list(self.scaling)}, {"drop_rate": 0.9, "seed": 0}),
            "ties": Method({"scaling_factor": list(self.scaling)}, {"density": 0.2}),
            "fisher": Method({"normalize_fishers": [False, True]}, stats="fisher"),
            "regmean": Method({"alpha": list(self.regmean_alpha)}, stats="gram"),
            "mats": Method({"objective": list(self.mats_objective), "init_scaling_factor": list(self.mats_init),
                            "num_iterations": list(self.mats_iterations)}, stats="gram",
                           starts=() if self.mats_start == ("task_arithmetic",) else self.mats_start),
            "ubgm": Method({"scaling_factor": list(self.ubgm_scaling), "delta0": list(self.ubgm_delta0)},
                           stats="fisher", zero_base_fisher=True),
            "tsv_m": Method({"scaling_factor": list(self.subspace_scaling)}),
            "iso_c": Method({"scaling_factor": list(self.subspace_scaling)}),
            "iso_cts": Method({"scaling_factor": list(self.subspace_scaling)}, {"common_space_fraction": 0.8}),
        }


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def cached(record: Path, key: dict, produce: Callable[[], Any]) -> Any:
    """The result recorded at ``record`` when it was made with ``key``, else ``produce()``'s, recorded."""
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("key") == json.loads(json.dumps(key)):  # as JSON keeps it: tuples are lists
            return saved["result"]
    record.parent.mkdir(parents=True, exist_ok=True)
    result = produce()
    write_json(record, {"key": key, "result": result})
    return result


def seed_dir(work: Path, seed: int) -> Path:
    return work / f"seed{seed}"


def data_key(settings: Settings, seed: int) -> dict:
    return {"seed": seed, "tasks": list(settings.tasks), "train": settings.train, "validation": settings.validation,
            "test": settings.test, "max_length": settings.max_length}


def model_key(settings: Settings, seed: int, task: str) -> dict:
    lora = {"lora_rank": settings.lora_rank, "lora_alpha": settings.lora_alpha} if settings.lora_rank else {}
    return {"data": data_key(settings, seed), "task": task, "steps": settings.steps,
            "batch_size": settings.batch_size, "lr": settings.lr, **lora}


def stats_key(settings: Settings, seed: int, task: str, statistic: str) -> dict:
    batch = settings.fisher_batch_size if statistic == "fisher" else settings.gram_batch_size
    return {"model": model_key(settings, seed, task), "statistic": statistic, "examples": settings.stat_examples,
            "batch_size": batch}


def prepare_data(work: Path, settings: Settings, seed: int) -> dict:
    """Build the tasks of ``seed`` and one evaluation task file per task (validation and test, own head)."""
    root = seed_dir(work, seed)

    def produce() -> dict:
        manifest = build_tasks(root / "data", settings.tasks, train=settings.train, validation=settings.validation,
                               test=settings.test, seed=seed, max_length=settings.max_length)
        (root / "tasks").mkdir(parents=True, exist_ok=True)
        for task in settings.tasks:
            spec = {"name": task, "data": {split: f"../data/{task}/{split}.jsonl" for split in ("validation", "test")},
                    "text_column": "text", "label_column": "label", "max_length": settings.max_length,
                    "head": f"../models/{task}"}
            (root / "tasks" / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        return {task: entry["sizes"] for task, entry in manifest["tasks"].items()}

    return cached(root / "data.json", data_key(settings, seed), produce)


def base_encoder(work: Path) -> Path:
    """The pretrained encoder with the fine-tuned models' names (``bert.`` prefix; the integer buffer
    ``embeddings.position_ids``, which they do not hold, dropped)."""
    out = work / "base" / "encoder.safetensors"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with safe_open(base_model_dir() / "model.safetensors", "pt") as f:
            tensors = {BODY + name: f.get_tensor(name) for name in f.keys() if name != "embeddings.position_ids"}
        _save_atomic(tensors, out)
    return out


def zero_base_fisher(work: Path) -> Path:
    """A Fisher store of zeros for every base encoder tensor: UBGM's H_0, for want of a pretraining Fisher."""
    out = work / "base" / "zero.fisher"
    if not out.exists():
        with safe_open(base_encoder(work), "pt") as f:
            zeros = {name: torch.zeros(f.get_slice(name).get_shape()) for name in f.keys()}
        write_statistics({"fisher": zeros}, out, {"statistic": "fisher", "note": "zeros: no pretraining Fisher"})
    return out


def _save_atomic(tensors: dict[str, torch.Tensor], out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, out)


def finetune_model(work: Path, settings: Settings, seed: int, task: str) -> dict:
    """Fine-tune ``task``'s model and write its encoder; its validation/test accuracy and the base row's."""
    root = seed_dir(work, seed)

    def produce() -> dict:
        manifest = read_manifest(root / "data")
        result = finetune_task(task, manifest["tasks"][task], root / "data", root / "models", base=base_model_dir(),
                               steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, seed=seed,
                               max_length=None, lora_rank=settings.lora_rank, lora_alpha=settings.lora_alpha)
        with safe_open(root / "models" / task / "model.safetensors", "pt") as f:
            encoder = {name: f.get_tensor(name) for name in f.keys() if name.startswith(BODY)}
        with safe_open(base_encoder(work), "pt") as f:
            differ = sorted(set(encoder) ^ set(f.keys()))
        if differ:
            raise BlockmergeError(f"encoder names differ from the base's, e.g. {differ[:3]}", path=root / "models")
        (root / "encoders").mkdir(exist_ok=True)
        _save_atomic(encoder, root / "encoders" / f"{task}.safetensors")
        if settings.lora_rank:
            adapter = adapter_dir(root, task)
            adapter.parent.mkdir(exist_ok=True)
            shutil.rmtree(adapter, ignore_errors=True)
            os.replace(root / "models" / f"{task}.adapter", adapter)
        return result

    return cached(root / "models" / f"{task}.json", model_key(settings, seed, task), produce)


def adapter_dir(root: Path, task: str) -> Path:
    """The LoRA adapter of ``task``'s encoder (with ``lora_rank`` > 0)."""
    return root / "adapters" / task


def merge_inputs(root: Path, settings: Settings) -> list[str]:
    """What the merges read per task: its encoder, or its encoder's LoRA adapter (over the base encoder)."""
    if settings.lora_rank:
        return [str(adapter_dir(root, task)) for task in settings.tasks]
    return [str(root / "encoders" / f"{task}.safetensors") for task in settings.tasks]


def statistic(work: Path, settings: Settings, seed: int, task: str, kind: str) -> dict:
    """Fisher (diagonal, encoder parameters) or Gram (input and output-gradient Grams of the encoder's Linear
    layers) of ``task``'s model over the first training examples."""
    root = seed_dir(work, seed)
    key = stats_key(settings, seed, task, kind)

    def produce() -> dict:
        spec = task_spec(root / "data", read_manifest(root / "data")["tasks"][task], "train")
        out = root / "stats" / f"{task}.{kind}"
        cpu = time.process_time()
        if kind == "fisher":
            # Of every parameter, then cut to the encoder's: with trainable parameters left out (the head), the
            # vectorised Fisher's accumulators keep an autograd graph and memory grows with every batch.
            full = out.with_name(f"{out.name}.all")
            summary = compute(kind, root / "models" / task, spec, full, num_examples=settings.stat_examples,
                              batch_size=key["batch_size"], overwrite=True)
            _encoder_statistics(full, out)
        else:
            summary = compute(kind, root / "models" / task, spec, out, num_examples=settings.stat_examples,
                              batch_size=key["batch_size"], inputs=True, outputs=True, modules=BODY_REGEX,
                              overwrite=True)
        return {"examples": summary["examples"], "seconds": summary["seconds"],
                "cpu_seconds": round(time.process_time() - cpu, 1), "peak_rss_bytes": summary["peak_rss_bytes"]}

    return cached(root / "stats" / f"{task}.{kind}.json", key, produce)


def _encoder_statistics(full: Path, out: Path) -> None:
    """Rewrite the statistics store ``full`` as ``out`` with the encoder's tensors only; remove ``full``."""
    kinds = open_statistics(full, str(full))
    tensors = {kind: {name: ckpt.read(name, 0, spec.rows) for name, spec in ckpt.specs.items() if name.startswith(BODY)}
               for kind, ckpt in kinds.items()}
    metadata = next(iter(kinds.values())).reader.metadata["statistics"]
    write_statistics(tensors, out, {**metadata, "parameters": BODY_REGEX}, overwrite=True)
    shutil.rmtree(full)


def merge_method(work: Path, settings: Settings, seed: int, name: str) -> dict:
    """Sweep ``name`` on validation, merge the chosen candidate again in a fresh process (time, peak RSS) and
    score it on test."""
    root = seed_dir(work, seed)
    method = settings.methods()[name]
    models = merge_inputs(root, settings)
    stats = [str(root / "stats" / f"{task}.{method.stats}") for task in settings.tasks] if method.stats else None
    options = {"base": str(base_encoder(work)), "stats": stats,
               "base_stats": str(zero_base_fisher(work)) if method.zero_base_fisher else None}
    starts = {start: chosen_merge(work, settings, seed, start) for start in method.starts
              if start != "task_arithmetic"}
    key = {"models": [model_key(settings, seed, t) for t in settings.tasks],
           "stats": [stats_key(settings, seed, t, method.stats) for t in settings.tasks] if method.stats else None,
           "method": name, **{k: v for k, v in dataclasses.asdict(method).items() if k != "starts" or v}}
    if starts:
        key["start_merges"] = {start: made["key"] for start, made in starts.items()}

    def produce() -> dict:
        tasks = [Task.from_file(root / "tasks" / f"{task}.yaml") for task in settings.tasks]
        chosen, candidates, cpu = {}, [], time.process_time()
        for start in method.starts or (None,):
            grid, fixed = method.grid, dict(method.fixed)
            if start in starts:  # a checkpoint start: the grid without task arithmetic's scale
                grid = {k: v for k, v in grid.items() if k != "init_scaling_factor"}
                fixed["initialization"] = starts[start]["path"]
            if not grid:
                continue
            result = sweep(name, models, tasks, grid, report_split=None, workdir=root / "merges", **options, **fixed)
            shown = {"initialization": start} if start in starts else {}
            candidates += [{"hyperparameters": {**shown, **c["hyperparameters"]}, "validation": c["score"]}
                           for c in result["candidates"]]
        if candidates:
            chosen = max(candidates, key=lambda c: c["validation"])["hyperparameters"]  # the first of equals
        sweep_cpu = time.process_time() - cpu
        out = root / "merges" / f"{name}.safetensors"
        values = {**method.fixed, **chosen}
        if chosen.get("initialization") in starts:
            values["initialization"] = starts[chosen["initialization"]]["path"]
            values.pop("init_scaling_factor", None)
        measured = merge_in_child(name, models, out, {**options, **values})
        cpu = time.process_time()
        report = evaluate(out, tasks, split="test")
        out.unlink()
        return {"hyperparameters": chosen, "candidates": candidates, "merge": measured,
                "test": {t: r["score"] for t, r in report["tasks"].items()},
                "sweep_cpu_seconds": round(sweep_cpu, 1), "test_cpu_seconds": round(time.process_time() - cpu, 1)}

    return cached(root / "merges" / f"{name}.json", key, produce)


def chosen_merge(work: Path, settings: Settings, seed: int, name: str) -> dict:
    """The merge ``name``'s sweep chose on ``seed`` (its record reused or made), written again to
    ``merges/chosen-<name>.safetensors``: a starting point for MaTS. Returns its path, hyperparameters and key."""
    import blockmerge

    root = seed_dir(work, seed)
    result = merge_method(work, settings, seed, name)
    benchmark_key = json.loads((root / "merges" / f"{name}.json").read_text())["key"]
    method = settings.methods()[name]
    out = root / "merges" / f"chosen-{name}.safetensors"
    values = {**method.fixed, **result["hyperparameters"]}
    key = {"merge": benchmark_key, "hyperparameters": values}

    def produce() -> dict:
        models = merge_inputs(root, settings)
        stats = [str(root / "stats" / f"{task}.{method.stats}") for task in settings.tasks] if method.stats else None
        blockmerge.merge(name, models, base=str(base_encoder(work)), stats=stats,
                         base_stats=str(zero_base_fisher(work)) if method.zero_base_fisher else None, out=out,
                         overwrite=True, **values)
        return {"path": str(out), "hyperparameters": values}

    record = root / "merges" / f"chosen-{name}.json"
    if not out.is_file() and record.is_file():
        record.unlink()
    return {**cached(record, key, produce), "key": key}


def merge_in_child(method: str, models: list[str], out: Path, options: dict) -> dict:
    """Merge in a new Python process, so that its peak RSS is the merge's own; the merge's figures."""
    spec = json.dumps({"method": method, "models": models, "out": str(out), "options": options})
    proc = subprocess.run([sys.executable, str(MERGE_CHILD), spec], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise BlockmergeError(f"{method}: merge failed: {last}", path=out)
    return json.loads(proc.stdout.strip().splitlines()[-1])
