"""End-to-end demo: fine-tune a tiny Llama on synthetic tasks, merge the fine-tunes, compare accuracies.

Everything is built locally from a config (no downloads): a base `LlamaForCausalLM` with a word-level tokenizer
(token ``i`` is the word ``t<i>``), then one copy per task trained for a few steps on next-token prediction of
sequences that follow a task-specific deterministic rule. The statistic-free methods of ``HYPERPARAMETERS`` merge
the fine-tuned Hugging Face directories, and every model is scored by :func:`blockmerge.eval.evaluate` on task
files of held-out sequences (``tasks/task<t>.yaml``: the first token is the prompt, the rest the target; metric
``token_accuracy``, i.e. greedy next-token accuracy at every position but the last).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch
import yaml
from rich.console import Console
from rich.table import Table

from . import api
from .eval import Task, evaluate

SEQ_LEN = 16
BAND = 64  # each task lives in a band of 64 token ids
VOCAB = 256
EVAL_SEQUENCES = 64
# (multiplier, increment) of task t's affine rule; both maps are permutations of the band (odd multiplier).
RULES = ((1, 1), (1, 3), (5, 1), (3, 7), (1, 5), (7, 3), (5, 5), (3, 1))
# The methods the demo runs (none reads statistics) and their hyperparameters.
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "average": {},
    "task_arithmetic": {"scaling_factor": 0.3},
    "ties": {"density": 0.2, "scaling_factor": 1.0},
    "dare": {"drop_rate": 0.9, "scaling_factor": 0.3},
}
MIB = 1024 * 1024


def task_rule(task: int) -> str:
    """Human-readable rule of `task` (e.g. 'x -> 64 + (1*(x-64) + 3) mod 64')."""
    offset, (a, b) = BAND * (task % (VOCAB // BAND)), RULES[task % len(RULES)]
    return f"x -> {offset} + ({a}*(x-{offset}) + {b}) mod {BAND}"


def task_sequences(task: int, count: int, generator: torch.Generator, length: int = SEQ_LEN) -> torch.Tensor:
    """`count` sequences of task `task`: a random start in the task's band, then x -> offset + (a*x + b) mod 64.

    Task t uses the token band [64*(t mod 4), 64*(t mod 4) + 64) and rule RULES[t mod 8], so tasks 0-3 occupy
    disjoint bands and tasks 4+ conflict with earlier ones.
    """
    offset, (a, b) = BAND * (task % (VOCAB // BAND)), RULES[task % len(RULES)]
    x = torch.randint(0, BAND, (count,), generator=generator)
    columns = [x]
    for _ in range(length - 1):
        x = (a * x + b) % BAND
        columns.append(x)
    return torch.stack(columns, dim=1) + offset


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                       tie_word_embeddings=False)


def _train(model: Any, task: int, *, steps: int, seed: int, lr: float = 3e-3, batch: int = 8) -> None:
    """A few AdamW steps of next-token prediction on task `task` (in place)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        ids = task_sequences(task, batch, generator)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def _tokenizer() -> Any:
    """Word-level tokenizer: token id i is the word 't<i>'; no special tokens are added."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}))
    words.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words)


def write_tasks(workdir: Path, *, num_tasks: int, seed: int, count: int = EVAL_SEQUENCES) -> list[Task]:
    """Task files ``tasks/task<t>.yaml`` of ``count`` held-out sequences each (split ``test``), loaded."""
    folder = Path(workdir) / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for t in range(num_tasks):
        generator = torch.Generator().manual_seed(1_000_003 + 7919 * seed + t)
        with open(folder / f"task{t}.jsonl", "w") as f:
            for seq in task_sequences(t, count, generator).tolist():
                words = [f"t{i}" for i in seq]
                f.write(json.dumps({"prompt": words[0], "target": " ".join(words[1:])}) + "\n")
        spec = {"name": f"task{t}", "data": f"task{t}.jsonl", "splits": {"test": "test"}, "text_column": "prompt",
                "label_column": None, "target_column": "target", "metric": "token_accuracy"}
        (folder / f"task{t}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        tasks.append(Task.from_file(folder / f"task{t}.yaml"))
    return tasks


def build_models(workdir: Path, *, num_models: int = 3, seed: int = 0, steps: int = 30,
                 log: Any = None) -> tuple[Path, list[Path]]:
    """Save a random tiny Llama base and `num_models` fine-tunes of it (one per task) as HF directories (with the
    word-level tokenizer)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaForCausalLM

    models = Path(workdir) / "models"
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    base = LlamaForCausalLM(_config()).eval()
    base_dir = models / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    task_dirs = []
    for t in range(num_models):
        if log:
            log(f"fine-tuning task{t} ({task_rule(t)}), {steps} steps")
        model = LlamaForCausalLM(_config())
        model.load_state_dict(base.state_dict())
        torch.manual_seed(seed * 1000 + t + 1)
        _train(model, t, steps=steps, seed=seed * 1000 + t + 1)
        task_dir = models / f"task{t}"
        model.save_pretrained(task_dir)
        tokenizer.save_pretrained(task_dir)
        task_dirs.append(task_dir)
    return base_dir, task_dirs


def _row(name: str, kind: str, path: Path, tasks: list[Task]) -> dict[str, Any]:
    result = evaluate(path, tasks, split="test")
    scores = [r["metrics"]["token_accuracy"] for r in result["tasks"].values()]
    return {"model": name, "kind": kind, "path": str(path), "accuracy": scores, "mean": sum(scores) / len(scores),
            "hyperparameters": None, "seconds": None, "peak_rss_mib": None, "read_mib": None, "written_mib": None}


def run_demo(workdir: Path, *, num_models: int = 3, seed: int = 0, progress: bool = False,
             steps: int = 30) -> list[dict[str, Any]]:
    """Build, fine-tune, merge (every method of HYPERPARAMETERS) and evaluate; one row per evaluated model.

    Each row: model (name), kind (base | fine-tuned | merge), path, accuracy (per task, list), mean, and for
    merges hyperparameters, seconds, peak_rss_mib, read_mib, written_mib (from the merge's Summary; None
    otherwise). `progress` shows the merge progress bars and stage messages on stderr.
    """
    if num_models < 1:
        raise ValueError("num_models must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' save/load and datasets' loading bars would drown the demo's
    datasets.disable_progress_bars()
    try:
        return _run(Path(workdir), num_models, seed, progress, steps)
    finally:
        if bars[0]:
            hf_logging.enable_progress_bar()
        if bars[1]:
            datasets.enable_progress_bars()


def _run(workdir: Path, num_models: int, seed: int, progress: bool, steps: int) -> list[dict[str, Any]]:
    log = Console(stderr=True).log if progress else None
    base_dir, task_dirs = build_models(workdir, num_models=num_models, seed=seed, steps=steps, log=log)
    tasks = write_tasks(workdir, num_tasks=num_models, seed=seed)

    rows = [_row("base", "base", base_dir, tasks)]
    for t, task_dir in enumerate(task_dirs):
        rows.append(_row(f"task{t}", "fine-tuned", task_dir, tasks))

    for name, hp in HYPERPARAMETERS.items():
        if log:
            log(f"merging with {name} {hp}")
        out = workdir / "merged" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        summary = api.merge(name, [str(d) for d in task_dirs], base=str(base_dir), out=out, format="hf",
                            overwrite=True, progress=progress, **hp)
        row = _row(name, "merge", out, tasks)
        row.update(hyperparameters=hp, seconds=summary.seconds, peak_rss_mib=summary.peak_rss_bytes / MIB,
                   read_mib=summary.bytes_read / MIB, written_mib=summary.bytes_written / MIB)
        rows.append(row)
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_table(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """Print the rows of `run_demo` as a rich table: per-task accuracy, mean, and merge costs."""
    num_tasks = len(rows[0]["accuracy"]) if rows else 0
    table = Table(title="blockmerge demo: next-token accuracy on held-out sequences of each task")
    table.add_column("model")
    table.add_column("hyperparameters")
    for t in range(num_tasks):
        table.add_column(f"task{t} acc", justify="right")
    for col in ("mean acc", "time (s)", "peak RSS (MiB)", "read (MiB)", "written (MiB)"):
        table.add_column(col, justify="right")
    for i, r in enumerate(rows):
        hp = r.get("hyperparameters")
        hp_text = "-" if hp is None else (", ".join(f"{k}={v}" for k, v in hp.items()) or "defaults")
        last_of_kind = i + 1 < len(rows) and rows[i + 1]["kind"] != r["kind"]
        table.add_row(r["model"], hp_text, *(f"{a:.3f}" for a in r["accuracy"]), f"{r['mean']:.3f}",
                      _fmt(r["seconds"], ".2f"), _fmt(r["peak_rss_mib"], ".0f"), _fmt(r["read_mib"], ".2f"),
                      _fmt(r["written_mib"], ".2f"), end_section=last_of_kind)
    (console or Console(width=160)).print(table)


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("./demo-out"),
              show_default=True, help="Where models and merges are written.")
@click.option("--models", "num_models", type=click.IntRange(min=1), default=3, show_default=True,
              help="Number of fine-tuned models (one synthetic task each).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the base, training and evaluation.")
@click.option("--steps", type=click.IntRange(min=0), default=30, show_default=True,
              help="AdamW steps per fine-tune.")
@click.option("--quiet", "-q", is_flag=True, help="No progress messages, only the table.")
def demo(workdir: Path, num_models: int, seed: int, steps: int, quiet: bool) -> None:
    """Fine-tune a tiny Llama on synthetic tasks, merge with statistic-free methods, compare accuracy."""
    start = time.perf_counter()
    rows = run_demo(workdir, num_models=num_models, seed=seed, progress=not quiet, steps=steps)
    print_table(rows)
    if not quiet:
        click.echo(f"demo finished in {time.perf_counter() - start:.1f} s; outputs in {workdir}", err=True)
    sys.stdout.flush()
