"""`blockmerge eval`, `blockmerge sweep` and `blockmerge search`: flags mapped onto blockmerge.eval."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from ..clitools import console, one_line_errors, parse_pairs, show_progress
from ..engine.sinks import formats
from ..errors import BlockmergeError
from .evaluate import evaluate
from .sweep import parse_grid, search, sweep


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.absolute().parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as err:
        raise BlockmergeError(f"cannot write JSON results ({err.strerror})", path=path) from None


def _metric_names(results: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(m for r in results for m in r["metrics"]))


def print_evaluation(result: dict[str, Any], title: str | None = None) -> None:
    """A table of an evaluate() result: one row per task, one column per metric, and the mean score."""
    tasks = result["tasks"]
    metrics = _metric_names(list(tasks.values()))
    table = Table(title=title or f"{result['checkpoint']} ({result['split']})")
    for col in ("task", "examples", *metrics, "score"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, r in tasks.items():
        table.add_row(name, str(r["examples"]), *(_number(r["metrics"].get(m)) for m in metrics), _number(r["score"]),
                      end_section=name == list(tasks)[-1])
    table.add_row("mean", "", *([""] * len(metrics)), _number(result["score"]))
    console().print(table)


def print_sweep(result: dict[str, Any]) -> None:
    """A table of every candidate of a sweep() result (task scores on the selection split, best marked), then the
    best candidate's report."""
    rows = result["candidates"]
    names = list(result["grid"])
    tasks = list(rows[0]["tasks"]) if rows else []
    table = Table(title=f"{result['method']}: candidates scored on {result['select_split']}")
    for col in ("", *names, *tasks, "score"):
        table.add_column(col, justify="left" if col in names or not col else "right")
    for i, row in enumerate(rows):
        table.add_row("*" if i == result["best"]["index"] else str(i),
                      *(_value(row["hyperparameters"][n]) for n in names),
                      *(_number(row["tasks"][t]["score"]) for t in tasks), _number(row["score"]))
    console().print(table)
    best = result["best"]
    chosen = ", ".join(f"{n}={_value(v)}" for n, v in best["hyperparameters"].items())
    if best["report"] is not None:
        print_evaluation(best["report"], title=f"best ({chosen}) on {result['report_split']}")
    else:
        click.echo(f"best: {chosen} (score {_number(best['score'])} on {result['select_split']})")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@click.command("eval")
@click.argument("checkpoint")
@click.option("--task", "tasks", multiple=True, required=True, help="Task file (YAML/JSON); repeat for several.")
@click.option("--split", default="test", show_default=True, help="Split of every task to evaluate on.")
@click.option("--config", help="Directory whose config.json gives the architecture (default: the task's config or "
                               "head directory, else CHECKPOINT).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Examples per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", help="Evaluate in this dtype: float32, bfloat16, float16 (default: float32).")
@click.option("--json-out", help="Also write the results as JSON to this file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@one_line_errors
def eval_command(checkpoint: str, tasks: tuple[str, ...], split: str, config: str | None, batch_size: int,
                 device: str, dtype: str | None, json_out: str | None, quiet: bool) -> None:
    """Evaluate CHECKPOINT (safetensors, HF directory, store) on tasks: metrics per task and their mean."""
    result = evaluate(checkpoint, list(tasks), split=split, config=config, batch_size=batch_size, device=device,
                      dtype=dtype, progress=show_progress(quiet))
    if json_out:
        write_json(json_out, result)
    print_evaluation(result)


def _merge_options(fn):
    options = [
        click.option("--base", help="Pretrained checkpoint."),
        click.option("--model", "models", multiple=True, required=True, help="Fine-tuned checkpoint (repeat)."),
        click.option("--stats", "stats", multiple=True, help="INDEX=PATH: statistics store of model INDEX."),
        click.option("--base-stats", help="Statistics store of the base."),
        click.option("--set", "sets", multiple=True, help="Fixed hyperparameter NAME=VALUE."),
        click.option("--task", "tasks", multiple=True, required=True, help="Task file (YAML/JSON); repeat."),
        click.option("--select-split", default="validation", show_default=True,
                     help="Split every candidate is scored on."),
        click.option("--report-split", default="test", show_default=True,
                     help="Split the best candidate is reported on ('none': no report)."),
        click.option("--config", help="Directory whose config.json gives the architecture (default: the task's, "
                                      "else --base's, else the first model's directory)."),
        click.option("--out", "-o", help="Write the best merge here (.safetensors file or directory)."),
        click.option("--format", type=click.Choice(formats()), help="Output format (default: from --out)."),
        click.option("--overwrite", is_flag=True, help="Replace an existing output."),
        click.option("--json-out", help="Write every candidate's results as JSON to this file."),
        click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
                     help="Examples per forward pass."),
        click.option("--device", default="cpu", show_default=True, help="Where blocks are merged and models run."),
        click.option("--block-size", help="Bytes of inputs per merge block."),
        click.option("--dtype", help="Output dtype of merged tensors (default: the models')."),
        click.option("--compute-dtype", default="float32", show_default=True, help="float32 or float64."),
        click.option("--workdir", help="Where candidates are written while scored (default: next to --out)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _sweep_arguments(models: tuple[str, ...], stats: tuple[str, ...], sets: tuple[str, ...], tasks: tuple[str, ...],
                     report_split: str, block_size: str | None, quiet: bool, **options: Any) -> dict[str, Any]:
    """Keyword arguments of sweep()/search() from the shared flags."""
    per_model: list[str | None] = [None] * len(models)
    for index, path in parse_pairs(stats, "--stats").items():
        if not index.isdigit() or int(index) >= len(models):
            raise BlockmergeError(f"--stats index {index!r} does not name one of the {len(models)} models")
        per_model[int(index)] = path
    if any(s is not None for s in per_model) and None in per_model:
        raise BlockmergeError("statistics must be given for every model or none")
    if block_size is not None:
        options["block_size"] = block_size
    return {"models": list(models), "tasks": list(tasks), "stats": per_model if stats else None,
            "report_split": None if report_split.lower() == "none" else report_split, "progress": show_progress(quiet),
            **options, **parse_pairs(sets, "--set")}


def _finish(result: dict[str, Any], json_out: str | None) -> None:
    if json_out:
        write_json(json_out, result)
    print_sweep(result)
    if result["out"]:
        click.echo(f"best merge written to {result['out']}", err=True)


@click.command("sweep")
@click.option("--method", required=True, help="Registered method name (see `blockmerge methods`).")
@click.option("--grid", "grids", multiple=True, required=True,
              help="NAME=START:STOP:STEP (inclusive), NAME=A,B,C or NAME=[...]; several give their product.")
@_merge_options
@one_line_errors
def sweep_command(method: str, grids: tuple[str, ...], json_out: str | None, **flags: Any) -> None:
    """Merge every grid candidate, score it on the selection split, write the best and report it."""
    _finish(sweep(method, grid=parse_grid(grids), **_sweep_arguments(**flags)), json_out)


@click.command("search")
@click.option("--method", default="fisher", show_default=True, help="A method with per-model `weights`.")
@click.option("--num-samples", type=click.IntRange(min=1), help="Draws from Dirichlet(1, ..., 1).")
@click.option("--grid-points", type=click.IntRange(min=2),
              help="Points per axis of a weight grid (default with two models: 51).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the Dirichlet draws.")
@_merge_options
@one_line_errors
def search_command(method: str, num_samples: int | None, grid_points: int | None, seed: int, json_out: str | None,
                   **flags: Any) -> None:
    """Search the per-model weights of a merge (Fisher coefficients, docs/methods.md §5.1) on the selection split."""
    _finish(search(method=method, num_samples=num_samples, grid_points=grid_points, seed=seed,
                   **_sweep_arguments(**flags)), json_out)
