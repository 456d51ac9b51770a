"""End-to-end demo: fine-tune a tiny Llama on synthetic tasks, merge the fine-tunes with every registered method,
each at its best hyperparameter, and compare test accuracies.

Everything is built locally from a config (no downloads): a base `LlamaForCausalLM` with a word-level tokenizer
(token ``i`` is the word ``t<i>``), then one copy per task trained for a few steps on next-token prediction of
sequences that follow a task-specific deterministic rule. Each task file (``tasks/task<t>.yaml``: the first token
is the prompt, the rest the target; metric ``token_accuracy``, i.e. greedy next-token accuracy at every position
but the last) has three splits of sequences with disjoint start tokens: ``train`` (what the fine-tune read),
``validation`` and ``test``.

The statistics the methods read (``STATISTICS``) are computed by the code ``blockmerge stats`` runs, over each
fine-tune's ``train`` split (the base's: over all tasks'), into ``stats/``. Each method of ``PLANS``, and any
other registered method at its defaults, merges the fine-tuned Hugging Face directories into ``merged/<method>``
at the hyperparameters that score best on the ``validation`` split among a small grid
(:func:`blockmerge.eval.sweep`, or :func:`blockmerge.eval.search` for Fisher's per-model weights). Every model is
reported on the ``test`` split by :func:`blockmerge.eval.evaluate`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
import yaml
from rich.console import Console
from rich.table import Table

from . import api, clitools
from .eval import Task, evaluate, search, sweep
from .stats.compute import compute

SEQ_LEN = 16
BAND = 64  # each task lives in a band of 64 token ids; a sequence is determined by its start token
VOCAB = 256
BATCH = 8  # training sequences per AdamW step
VALIDATION_STARTS = 16  # start tokens (hence sequences) of each task's validation split
TEST_STARTS = 16  # ... and of its test split; the fine-tune trains on sequences from the other start tokens
STATS_EXAMPLES = 64  # training sequences each statistic is computed over
# (multiplier, increment) of task t's affine rule; both maps are permutations of the band (odd multiplier).
RULES = ((1, 1), (1, 3), (5, 1), (3, 7), (1, 5), (7, 3), (5, 5), (3, 1))


@dataclass(frozen=True)
class Statistic:
    """A statistic of a model over training sequences, as `blockmerge stats` computes it."""

    statistic: str  # fisher | gram | blockwise_fisher
    options: Mapping[str, Any] = field(default_factory=dict)  # keyword arguments of blockmerge.stats.compute
    kinds: str = ""  # what the store holds, for the table
    note: str = ""  # what the table's caption says of it


STATISTICS: dict[str, Statistic] = {
    "fisher": Statistic("fisher", {"labels": "empirical"}, "fisher"),
    "gram": Statistic("gram", {}, "gram_in"),
    # K-FAC factors of every Linear layer but lm_head (which would get no gram_out: MaTS averages it instead).
    "kfac": Statistic("gram", {"outputs": True, "modules": "(?!lm_head).*"}, "gram_in+gram_out",
                      "gram_in+gram_out: K-FAC factors of every Linear layer but lm_head"),
}


@dataclass(frozen=True)
class Plan:
    """How the demo merges with one method: the grid searched on validation (none: merged once), the fixed
    hyperparameters, hyperparameters taken from another method's choice, and the statistics read."""

    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    inherit: Mapping[str, str] = field(default_factory=dict)  # hyperparameter -> method whose chosen value it takes
    stats: str | None = None  # key of STATISTICS, read for every fine-tune
    base_stats: str | None = None  # key of STATISTICS, read for the base
    weights: bool = False  # grid: per-model weights (blockmerge.eval.search)


SCALES = (0.2, 0.4, 0.6, 0.8, 1.0)
PLANS: dict[str, Plan] = {
    "average": Plan(),
    "task_arithmetic": Plan(grid={"scaling_factor": SCALES}),
    "ties": Plan(grid={"density": (0.2, 0.5, 0.8), "scaling_factor": (0.7, 1.0)}),
    "dare": Plan(grid={"drop_rate": (0.1, 0.3, 0.5, 0.7, 0.9)}, inherit={"scaling_factor": "task_arithmetic"}),
    "breadcrumbs": Plan(grid={"density": (0.5, 0.8, 0.95), "gamma": (0.0, 0.01)},
                        inherit={"scaling_factor": "task_arithmetic"}),
    "della": Plan(grid={"density": (0.3, 0.5, 0.8), "scaling_factor": (0.7, 1.0)}),
    "fisher": Plan(weights=True, stats="fisher"),
    "regmean": Plan(grid={"alpha": (0.01, 0.1, 0.5, 0.9)}, stats="gram"),
    "mats": Plan(grid={"alpha": (0.1, 0.5, 0.9)}, fixed={"objective": "blockwise_fisher"}, stats="kfac"),
    "ubgm": Plan(grid={"scaling_factor": SCALES}, stats="fisher", base_stats="fisher"),
}
# Fisher's per-model weights: the simplex grid through uniform weights if it has at most this many points, else as
# many Dirichlet draws.
FISHER_DRAWS = 10


def task_rule(task: int) -> str:
    """Human-readable rule of `task` (e.g. 'x -> 64 + (1*(x-64) + 3) mod 64')."""
    offset, (a, b) = BAND * (task % (VOCAB // BAND)), RULES[task % len(RULES)]
    return f"x -> {offset} + ({a}*(x-{offset}) + {b}) mod {BAND}"


def rule_sequences(task: int, starts: torch.Tensor, length: int = SEQ_LEN) -> torch.Tensor:
    """The sequences of task `task` from the start positions `starts` (in [0, 64)), one row each.

    Task t uses the token band [64*(t mod 4), 64*(t mod 4) + 64) and rule RULES[t mod 8], so tasks 0-3 occupy
    disjoint bands and tasks 4+ conflict with earlier ones.
    """
    offset, (a, b) = BAND * (task % (VOCAB // BAND)), RULES[task % len(RULES)]
    x = starts.long()
    columns = [x]
    for _ in range(length - 1):
        x = (a * x + b) % BAND
        columns.append(x)
    return torch.stack(columns, dim=1) + offset


def task_sequences(task: int, count: int, generator: torch.Generator, length: int = SEQ_LEN) -> torch.Tensor:
    """`count` sequences of task `task` from random start tokens: x -> offset + (a*x + b) mod 64."""
    return rule_sequences(task, torch.randint(0, BAND, (count,), generator=generator), length)


def task_splits(task: int, *, seed: int, steps: int) -> dict[str, torch.Tensor]:
    """Sequences of task `task` by split: ``validation`` and ``test`` (one per start token, VALIDATION_STARTS and
    TEST_STARTS of them), ``train`` (``steps * BATCH`` draws, in training order, from the remaining start tokens).
    The three splits share no start token, hence no sequence."""
    generator = torch.Generator().manual_seed(1_000_003 + 7919 * seed + task)
    starts = torch.randperm(BAND, generator=generator)
    held_out = VALIDATION_STARTS + TEST_STARTS
    train_starts = starts[held_out:]
    picks = torch.randint(0, len(train_starts), (steps * BATCH,), generator=generator)
    return {"train": rule_sequences(task, train_starts[picks]),
            "validation": rule_sequences(task, starts[:VALIDATION_STARTS].sort().values),
            "test": rule_sequences(task, starts[VALIDATION_STARTS:held_out].sort().values)}


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                       tie_word_embeddings=False)


def _train(model: Any, sequences: torch.Tensor, *, lr: float = 3e-3) -> None:
    """AdamW steps of next-token prediction on `sequences`, BATCH at a time (in place)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for ids in sequences.split(BATCH):
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


def _write_jsonl(path: Path, sequences: torch.Tensor) -> None:
    with open(path, "w") as f:
        for seq in sequences.tolist():
            words = [f"t{i}" for i in seq]
            f.write(json.dumps({"prompt": words[0], "target": " ".join(words[1:])}) + "\n")


def write_tasks(workdir: Path, *, num_tasks: int, seed: int, steps: int = 30) -> list[Task]:
    """Task files ``tasks/task<t>.yaml`` with the ``train``, ``validation`` and ``test`` splits of
    :func:`task_splits` (``tasks/task<t>-<split>.jsonl``), loaded."""
    folder = Path(workdir) / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for t in range(num_tasks):
        files = {}
        for split, sequences in task_splits(t, seed=seed, steps=steps).items():
            files[split] = f"task{t}-{split}.jsonl"
            _write_jsonl(folder / files[split], sequences)
        spec = {"name": f"task{t}", "data": files, "text_column": "prompt", "label_column": None,
                "target_column": "target", "metric": "token_accuracy"}
        (folder / f"task{t}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        tasks.append(Task.from_file(folder / f"task{t}.yaml"))
    return tasks


def build_models(workdir: Path, *, num_models: int = 3, seed: int = 0, steps: int = 30,
                 log: Callable[..., Any] | None = None) -> tuple[Path, list[Path]]:
    """Save a random tiny Llama base and `num_models` fine-tunes of it (one per task, trained on the task's
    ``train`` split of :func:`task_splits`) as HF directories (with the word-level tokenizer)."""
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
        _train(model, task_splits(t, seed=seed, steps=steps)["train"])
        task_dir = models / f"task{t}"
        model.save_pretrained(task_dir)
        tokenizer.save_pretrained(task_dir)
        task_dirs.append(task_dir)
    return base_dir, task_dirs


def compute_statistics(workdir: Path, base_dir: Path, task_dirs: Sequence[Path], tasks: Sequence[Task],
                       names: Sequence[str], base_names: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Statistic stores ``stats/<model>.<name>``: each of `names` (keys of STATISTICS) of every fine-tune t over the
    first STATS_EXAMPLES sequences of task t's ``train`` split, each of `base_names` of the base over as many of
    every task's (interleaved). Returns ``{name: {"models": [store per fine-tune] | None, "base": store | None}}``.
    """
    folder = Path(workdir) / "stats"
    folder.mkdir(parents=True, exist_ok=True)
    specs = [task.spec("train") for task in tasks]
    mixture = folder / "mixture-train.jsonl"
    lines = [Path(spec.data).read_text().splitlines() for spec in specs]
    mixture.write_text("".join(line + "\n" for group in zip(*lines) for line in group))
    mixed = dataclasses.replace(specs[0], data=str(mixture))

    def store(name: str, model_dir: Path, spec: Any) -> str:
        statistic, out = STATISTICS[name], folder / f"{Path(model_dir).name}.{name}"
        compute(statistic.statistic, model_dir, spec, out, num_examples=STATS_EXAMPLES, batch_size=STATS_EXAMPLES,
                overwrite=True, **statistic.options)
        return str(out)

    return {name: {"models": [store(name, d, spec) for d, spec in zip(task_dirs, specs)] if name in names else None,
                   "base": store(name, base_dir, mixed) if name in base_names else None}
            for name in dict.fromkeys([*names, *base_names])}


def _scores(result: dict[str, Any]) -> list[float]:
    return [r["metrics"]["token_accuracy"] for r in result["tasks"].values()]


def _row(name: str, kind: str, path: Path, tasks: list[Task]) -> dict[str, Any]:
    scores = _scores(evaluate(path, tasks, split="test"))
    return {"model": name, "kind": kind, "path": str(path), "accuracy": scores, "mean": sum(scores) / len(scores),
            "fine_tunes": None, "chosen": None, "fixed": None, "inherited": None, "statistics": None,
            "stats_examples": None,
            "validation": None, "merges": None, "seconds": None, "sweep": None}


def plans() -> dict[str, Plan | None]:
    """The plan of every registered method: PLANS' (in its order), then any other method at its defaults with the
    statistics it declares if the demo computes them (fisher, gram_in; the base's fisher), else None."""
    stores = {frozenset(): None, frozenset({"fisher"}): "fisher", frozenset({"gram_in"}): "gram"}
    registered = {info["name"]: info for info in api.methods()}
    out: dict[str, Plan | None] = {name: plan for name, plan in PLANS.items() if name in registered}
    for name, info in registered.items():
        if name in PLANS:
            continue
        kinds, base_kinds = frozenset(info["statistics"]), set(info["base_statistics"])
        supported = kinds in stores and base_kinds <= {"fisher"}
        out[name] = Plan(stats=stores[kinds], base_stats="fisher" if base_kinds else None) if supported else None
    return out


def run_demo(workdir: Path, *, num_models: int = 3, seed: int = 0, progress: bool = False,
             steps: int = 30) -> list[dict[str, Any]]:
    """Build, fine-tune, compute statistics, merge with every registered method (but one reading statistics the
    demo does not compute) at the hyperparameters chosen on validation, and evaluate on test; one row per model.

    A method the demo cannot run (statistics it does not compute, more models than it has) is a row of kind
    `skipped` with the model (name) and a note saying why. Every other row: model (name), kind (base | fine-tuned
    | merge), path, accuracy (test, per task, list), mean, and for
    merges (None for the other kinds): fine_tunes (how many were merged: the first N, for a method of at most N
    models), chosen (the hyperparameters chosen on validation, {} when none is
    searched), fixed (the others set), inherited (hyperparameter -> the method whose choice it is), statistics
    (what the method read), stats_examples (training sequences per statistic), validation (mean validation
    accuracy of the chosen merge), merges (how many were made), seconds (of choosing and writing it) and sweep
    (the result of blockmerge.eval.sweep or search; None when nothing is searched). `progress` logs the stages on
    stderr. Torch runs on one thread meanwhile: the tiny model's operations gain nothing from more, and lose much
    on a busy machine.
    """
    if num_models < 1:
        raise ValueError("num_models must be at least 1")
    if steps < 1:
        raise ValueError("steps must be at least 1 (the statistics read the training sequences)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # transformers' save/load and datasets' loading bars would drown the demo's
    datasets.disable_progress_bars()
    try:
        return _run(Path(workdir), num_models, seed, progress, steps)
    finally:
        torch.set_num_threads(threads)
        if bars[0]:
            hf_logging.enable_progress_bar()
        if bars[1]:
            datasets.enable_progress_bars()


def _run(workdir: Path, num_models: int, seed: int, progress: bool, steps: int) -> list[dict[str, Any]]:
    log = Console(stderr=True).log if progress else None
    base_dir, task_dirs = build_models(workdir, num_models=num_models, seed=seed, steps=steps, log=log)
    tasks = write_tasks(workdir, num_tasks=num_models, seed=seed, steps=steps)

    rows = [_row("base", "base", base_dir, tasks)]
    for t, task_dir in enumerate(task_dirs):
        rows.append(_row(f"task{t}", "fine-tuned", task_dir, tasks))

    methods = plans()
    counts = {info["name"]: info["model_count"] for info in api.methods()}
    skipped = {n: "it reads statistics the demo does not compute" for n, p in methods.items() if p is None}
    skipped.update({n: f"it merges at least {counts[n][0]} models; the demo has {num_models}"
                    for n in methods if n not in skipped and counts[n][0] > num_models})
    for name, reason in skipped.items():
        if log:
            log(f"{name}: skipped ({reason})")
        del methods[name]
        rows.append({"model": name, "kind": "skipped", "note": reason})
    needed = list(dict.fromkeys(p.stats for p in methods.values() if p.stats))
    base_needed = list(dict.fromkeys(p.base_stats for p in methods.values() if p.base_stats))
    examples = min(STATS_EXAMPLES, steps * BATCH)
    if log:
        log(f"statistics over {examples} training sequences: {', '.join(STATISTICS[n].kinds for n in needed)} of "
            f"every fine-tune, {', '.join(STATISTICS[n].kinds for n in base_needed) or 'none'} of the base")
    stores = compute_statistics(workdir, base_dir, task_dirs, tasks, needed, base_needed)

    merged = workdir / "merged"
    merged.mkdir(parents=True, exist_ok=True)
    chosen: dict[str, dict[str, Any]] = {}
    for name, plan in methods.items():
        models = [str(d) for d in task_dirs][:counts[name][1]]  # a method of at most N models merges the first N
        fixed = {**plan.fixed, **{hp: chosen[source][hp] for hp, source in plan.inherit.items()}}
        options = {"base": str(base_dir), "out": merged / name, "format": "hf", "overwrite": True,
                   "stats": stores[plan.stats]["models"][:len(models)] if plan.stats else None,
                   "base_stats": stores[plan.base_stats]["base"] if plan.base_stats else None}
        start = time.perf_counter()
        if log:
            searched = ("per-model weights" if plan.weights else
                        ", ".join(f"{k} in {list(v)}" for k, v in plan.grid.items()))
            log(f"{name}: " + (f"searching {searched} on validation" if searched else "merged once")
                + (f" ({_text(fixed)})" if fixed else ""))
        if plan.weights:
            points = len(models) + 1  # the simplex grid through uniform weights
            size = math.comb(points - 1 + len(models) - 1, len(models) - 1)
            draws = {"grid_points": points} if size <= FISHER_DRAWS else {"num_samples": FISHER_DRAWS, "seed": seed}
            result = search(models, tasks, method=name, **draws, **options, **fixed)
        elif plan.grid:
            result = sweep(name, models, tasks, plan.grid, **options, **fixed)
        else:
            result = None
            api.merge(name, models, **options, **fixed)
        if result is None:
            scores, validation, count, picked = _scores(evaluate(merged / name, tasks, split="test")), None, 1, {}
        else:
            best = result["best"]
            scores, validation = _scores(best["report"]), best["score"]
            count, picked = len(result["candidates"]) + 1, dict(best["hyperparameters"])
        chosen[name] = {**fixed, **picked}
        if log and picked:
            log(f"{name}: chose {_text(picked)} (validation accuracy {validation:.3f})")
        statistics = " + ".join(([STATISTICS[plan.stats].kinds] if plan.stats else [])
                                + ([f"base {STATISTICS[plan.base_stats].kinds}"] if plan.base_stats else []))
        rows.append({"model": name, "kind": "merge", "path": str(merged / name), "accuracy": scores,
                     "mean": sum(scores) / len(scores), "chosen": picked, "fixed": fixed,
                     "inherited": dict(plan.inherit), "statistics": statistics or None, "fine_tunes": len(models),
                     "stats_examples": examples if statistics else None, "validation": validation, "merges": count,
                     "seconds": time.perf_counter() - start, "sweep": result})
    return rows


def _value(value: Any, digits: int = 3) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 1:  # one per-model value for every model
        return _value(value[0], digits)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v, 2) for v in value) + "]"
    if not isinstance(value, float):
        return str(value)
    text = f"{value:.{digits}g}"
    return text if any(c in text for c in ".en") else text + ".0"


def _text(hyperparameters: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in (hyperparameters or {}).items())


def _grid(name: str, values: list[Any], search: Mapping[str, Any] | None) -> str:
    if search is not None:
        how = "Dirichlet draws" if search["mode"] == "dirichlet" else "points of the simplex grid"
        return f"{name}: {len(values)} {how}"
    return f"{name} {{{', '.join(_value(v) for v in values)}}}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_table(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """Print the rows of `run_demo` as a rich table: per model, the hyperparameters chosen on validation, the
    statistics read, test accuracy per task and its mean, the validation accuracy of the choice and what choosing
    cost; a caption gives the fixed hyperparameters and how the statistics were computed."""
    num_tasks = len(rows[0]["accuracy"]) if rows else 0
    table = Table(title="blockmerge demo: next-token accuracy on each task's test split, every merge at the "
                        "hyperparameters best on validation", caption=_caption(rows),
                  caption_justify="left")
    for col in ("model", "chosen on validation", "statistics"):
        table.add_column(col)
    for t in range(num_tasks):
        table.add_column(f"task{t}", justify="right")
    for col in ("mean", "valid.", "merges", "time (s)"):
        table.add_column(col, justify="right")
    shown = [r for r in rows if r["kind"] != "skipped"]
    for i, r in enumerate(shown):
        merge = r["kind"] == "merge"
        last_of_kind = i + 1 < len(shown) and shown[i + 1]["kind"] != r["kind"]
        settings = [_text(r["chosen"]) or "-", r["statistics"] or "-"] if merge else [""] * 2
        table.add_row(r["model"], *settings, *(f"{a:.3f}" for a in r["accuracy"]),
                      f"{r['mean']:.3f}", _fmt(r["validation"], ".3f"), _fmt(r["merges"], "d"),
                      _fmt(r["seconds"], ".1f"), end_section=last_of_kind)
    (console or clitools.console()).print(table)


def _caption(rows: list[dict[str, Any]]) -> str:
    merges = [r for r in rows if r["kind"] == "merge"]
    lines = ["valid.: mean validation accuracy of the chosen merge; merges: the candidates scored and the final "
             "one; time (s): making and scoring them."]
    grids = [f"{r['model']} " + " × ".join(_grid(name, values, r["sweep"].get("search"))
                                          for name, values in r["sweep"]["grid"].items())
             for r in merges if r["sweep"] is not None]
    if grids:
        lines.append("grids: " + "; ".join(grids) + ".")
    fixed = [f"{r['model']} " + ", ".join(f"{hp}={_value(v)}" + (f" ({r['inherited'][hp]}'s choice)"
                                                                  if hp in r["inherited"] else "")
                                          for hp, v in r["fixed"].items()) for r in merges if r["fixed"]]
    if fixed:
        lines.append("fixed: " + "; ".join(fixed) + ".")
    skipped = [f"{r['model']} ({r['note']})" for r in rows if r["kind"] == "skipped"]
    if skipped:
        lines.append("skipped: " + "; ".join(skipped) + ".")
    every = max((r["fine_tunes"] for r in merges), default=0)
    fewer = [f"{r['model']} merges " + ("task0" if r["fine_tunes"] == 1 else f"task0-task{r['fine_tunes'] - 1}")
             + " only" for r in merges if r["fine_tunes"] < every]
    if fewer:
        lines.append("fine-tunes: " + "; ".join(fewer) + " (it merges at most that many models).")
    read = {kinds for r in merges if r["statistics"] for kinds in r["statistics"].split(" + ")}
    if read:
        examples = max(r["stats_examples"] for r in merges if r["statistics"])
        base = " (of the base: as many from every task's)" if any(k.startswith("base ") for k in read) else ""
        notes = [f"`blockmerge stats` of each fine-tune over {examples} sequences of its task's train split{base}"]
        notes += [s.note for s in STATISTICS.values() if s.note and s.kinds in read]
        lines.append("statistics: " + "; ".join([*notes, "a parameter without the statistic a method reads is "
                                                 "averaged."]))
    return "\n".join(lines)


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("./demo-out"),
              show_default=True, help="Where models, task files, statistics and merges are written.")
@click.option("--models", "num_models", type=click.IntRange(min=1), default=3, show_default=True,
              help="Number of fine-tuned models (one synthetic task each).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the base, training and task splits.")
@click.option("--steps", type=click.IntRange(min=1), default=30, show_default=True,
              help="AdamW steps per fine-tune.")
@click.option("--quiet", "-q", is_flag=True, help="No progress messages, only the table.")
def demo(workdir: Path, num_models: int, seed: int, steps: int, quiet: bool) -> None:
    """Fine-tune a tiny Llama on synthetic tasks, merge with every method at its best, compare test accuracy."""
    start = time.perf_counter()
    rows = run_demo(workdir, num_models=num_models, seed=seed, progress=not quiet, steps=steps)
    print_table(rows)
    if not quiet:
        click.echo(f"demo finished in {time.perf_counter() - start:.1f} s; outputs in {workdir}", err=True)
    sys.stdout.flush()
