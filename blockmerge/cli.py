"""The `blockmerge` command line: flags and YAML configs mapped onto the public API."""

from __future__ import annotations

import gc
import importlib
import json
from pathlib import Path
from typing import Any

import click
import torch
import yaml
from rich.table import Table

from . import api, mergekit
from .clitools import console, show_progress
from .clitools import one_line_errors as _errors
from .clitools import parse_pairs as _parse_pairs
from .engine.job import Summary
from .engine.plan import DEFAULT_BLOCK_BYTES
from .engine.sinks import formats, parse_size
from .errors import BlockmergeError

CONFIG_KEYS = {"method", "models", "base", "base_stats", "set", "out", "format", "adapter_rank", "block_size", "device",
               "dtype", "compute_dtype", "codec", "max_shard_size"}


def _load_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise BlockmergeError(f"cannot read config ({str(err).splitlines()[0]})", path=path) from None
    if not isinstance(config, dict):
        raise BlockmergeError("config must be a mapping", path=path)
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise BlockmergeError(f"unknown config key {unknown[0]!r} (valid: {', '.join(sorted(CONFIG_KEYS))})", path=path)

    def resolve(p: Any) -> Any:
        return str(path.parent / p) if isinstance(p, str) and not Path(p).is_absolute() else p

    models, stats = [], []
    for i, m in enumerate(config.get("models") or []):
        if isinstance(m, dict):
            if "path" not in m or set(m) - {"path", "stats"}:
                raise BlockmergeError(f"models[{i}] must be a path or {{path, stats}}", path=path)
            models.append(resolve(m["path"]))
            stats.append(resolve(m.get("stats")))
        else:
            models.append(resolve(m))
            stats.append(None)
    config["models"] = models
    config["stats"] = stats
    for key in ("base", "base_stats", "out"):
        if key in config:
            config[key] = resolve(config[key])
    if not isinstance(config.get("set", {}), dict):
        raise BlockmergeError("config key 'set' must be a mapping of hyperparameters", path=path)
    return config


def _accepted(*flags: str):
    """Options of mergekit-yaml that only tune mergekit's own loader, storage or scheduling: accepted, no effect."""
    def decorate(command):
        text = "Accepted for mergekit's scripts; no effect on blockmerge."
        for flag in flags:
            if flag.endswith("="):
                command = click.option(f"--{flag[:-1]}", default=None, hidden=True, help=text)(command)
            else:
                command = click.option(f"--{flag}/--no-{flag}", default=False, hidden=True, help=text)(command)
        return command
    return decorate


# mergekit-yaml's options for its loader (blockmerge always reads lazily, bounds memory and runs on local files),
# its GPU scheduling, its writers and its hub and LoRA caches
_ACCEPTED_MERGEKIT_FLAGS = _accepted("allow-crimes", "lazy-unpickle", "low-cpu-memory", "read-to-gpu", "multi-gpu",
                                     "gpu-rich", "async-write", "clone-tensors", "trust-remote-code",
                                     "write-threads=", "transformers-cache=", "lora-merge-cache=",
                                     "lora-merge-dtype=")


def _is_mergekit(path: Path) -> bool:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False  # _load_config says what is wrong
    return isinstance(config, dict) and "merge_method" in config


@click.command("mergekit-yaml")
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out")
@click.option("--cuda/--no-cuda", default=False, help="Merge on the GPU (cuda).")
@click.option("--device", default=None, help="Merge on this device (cpu, cuda, cuda:1); overrides --cuda.")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
              help="Copy the base model's tokenizer files into OUT (its config is always written).")
@click.option("--out-shard-size", default="5B", show_default=True,
              help="Largest output shard, in parameters as mergekit counts them (500M, 5B), or in bytes (2GiB).")
@click.option("--random-seed", type=int, default=None, help="Seed of the random methods (DARE, DELLA).")
@click.option("--write-model-card/--no-write-model-card", default=True, show_default=True,
              help="Write OUT/README.md: the method, the models and the configuration.")
@click.option("--safe-serialization/--no-safe-serialization", default=True,
              help="Accepted for mergekit's scripts (outputs are always safetensors).")
@click.option("--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings", default=False,
              help="Not supported (vocabularies must match).")
@click.option("--num-threads", "-j", type=int, default=None, help="Torch threads of the merge.")
@click.option("--quiet/--no-quiet", "-q", default=False, help="No progress bar or summary.")
@click.option("--verbose", "-v", count=True, help="Accepted for mergekit's scripts.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT (atomically, when complete).")
@_ACCEPTED_MERGEKIT_FLAGS
@_errors
def mergekit_yaml(config: Path, out: str, cuda: bool, device: str | None, copy_tokenizer: bool, out_shard_size: str,
                  random_seed: int | None, write_model_card: bool, safe_serialization: bool,
                  unsafe_truncate_embeddings: bool, num_threads: int | None, quiet: bool, verbose: int,
                  overwrite: bool, **accepted: Any) -> None:
    """Merge as a mergekit YAML configuration says, with mergekit-yaml's arguments, into the directory OUT."""
    if not safe_serialization:
        raise BlockmergeError("--no-safe-serialization is not supported: blockmerge writes safetensors only")
    if unsafe_truncate_embeddings:
        raise BlockmergeError("--unsafe-truncate-embeddings is not supported: the models' vocabularies must match")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    summary = mergekit.merge(config, out, device=device or ("cuda" if cuda else "cpu"), out_shard_size=out_shard_size,
                             copy_tokenizer=copy_tokenizer, seed=random_seed, model_card=write_model_card,
                             overwrite=overwrite, progress=show_progress(quiet))
    if not quiet:
        print_summary([summary])


def print_summary(summaries: list[Summary]) -> None:
    table = Table(title="blockmerge")
    for col in ("method", "time (s)", "peak RSS (MiB)", "anon / file (MiB)", "peak GPU (MiB)", "read (MiB)",
                "written (MiB)", "blocks", "passes", "merged", "copied", "averaged*"):
        table.add_column(col, justify="left" if col == "method" else "right")
    mib = 1024 * 1024
    for s in summaries:
        table.add_row(s.method, f"{s.seconds:.2f}", f"{s.peak_rss_bytes / mib:.0f}",
                      f"{s.peak_rss_anon_bytes / mib:.0f} / {s.peak_rss_file_bytes / mib:.0f}",
                      f"{s.peak_gpu_bytes / mib:.0f}", f"{s.bytes_read / mib:.1f}", f"{s.bytes_written / mib:.1f}",
                      str(s.blocks), str(s.passes), str(s.tensors_merged), str(s.tensors_copied),
                      str(s.tensors_averaged_missing_statistic))
    err = console(stderr=True)
    err.print(table)
    for s in summaries:
        if s.pass_seconds:
            passes = " + ".join(f"{t:.2f}" for t in s.pass_seconds)
            merge = s.seconds - sum(s.pass_seconds)
            err.print(f"{s.method}: reduction passes {passes} s, then the merge {merge:.2f} s")
        if s.output:
            err.print(f"{s.method}: written to {s.output}", highlight=False)


class _Commands(click.Group):
    """Commands whose modules (training, evaluation) load only when their command runs."""

    lazy = {"demo": "blockmerge.demo:demo", "eval": "blockmerge.eval.cli:eval_command",
            "sweep": "blockmerge.eval.cli:sweep_command", "search": "blockmerge.eval.cli:search_command"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attribute = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)


@click.group(cls=_Commands)
@click.version_option(package_name="blockmerge")
def main() -> None:
    """Merge fine-tuned models of one architecture, one parameter block at a time."""
    # What the imports built (torch's registries: most of the process's objects) lives until exit: the
    # collector skips it from now on, during the run and in the final collection at exit (~0.2 s).
    gc.freeze()


@main.command()
@click.option("-c", "--config", type=click.Path(path_type=Path), help="YAML config (flags override it).")
@click.option("--method", help="Registered method name (see `blockmerge methods`).")
@click.option("--base", help="Pretrained checkpoint.")
@click.option("--model", "models", multiple=True, help="Fine-tuned checkpoint (repeat).")
@click.option("--stats", "stats", multiple=True, help="INDEX=PATH: statistics store of model INDEX (0-based).")
@click.option("--base-stats", help="Statistics store of the base.")
@click.option("--set", "sets", multiple=True, help="Hyperparameter NAME=VALUE (canonical names).")
@click.option("--out", "-o", help="Output: a .safetensors file or a directory.")
@click.option("--format", type=click.Choice([*formats(), "adapter"]),
              help="Output format (default: from --out); adapter: the models are LoRA adapters of --base, merged "
                   "into one adapter.")
@click.option("--adapter-rank", type=int, help="With --format adapter: truncate to this rank (default: exact).")
@click.option("--block-size", help=f"Bytes of inputs per block (default {DEFAULT_BLOCK_BYTES // 2**20}MiB).")
@click.option("--device", help="cpu, cuda or cuda:N.")
@click.option("--dtype", help="Output dtype of merged tensors (default: the models').")
@click.option("--compute-dtype", help="float32 (default) or float64.")
@click.option("--codec", help="Store compression: none, zstd, gzip, blosc.")
@click.option("--max-shard-size", help="Shard safetensors outputs above this size (default 5GiB).")
@click.option("--repo", help="git-theta repository that REV:PATH inputs name (default: the current one).")
@click.option("--commit", is_flag=True, help="Commit --out (tracked with git-theta) with the merge's provenance.")
@click.option("--message", "-m", help="With --commit: the commit message.")
@click.option("--resume", is_flag=True, help="Continue an interrupted merge into the same output.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (atomically, when complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@click.option("--executor", type=click.Choice(["local", "dask"]), default="local",
              help="Merge here, or as tasks on a Dask cluster (inputs and --out on storage every worker sees).")
@click.option("--scheduler", help="With --executor dask: tcp://HOST:8786 (default $BLOCKMERGE_DASK_SCHEDULER, "
              "else a local cluster).")
@_errors
def merge(config, method, base, models, stats, base_stats, sets, out, format, adapter_rank, block_size, device, dtype,
          compute_dtype, codec, max_shard_size, repo, commit, message, resume, overwrite, quiet, executor,
          scheduler) -> None:
    """Merge checkpoints with a method and write the result (a mergekit configuration is read as mergekit does)."""
    if config and _is_mergekit(config):
        if not out:
            raise BlockmergeError("a mergekit config gives no output: pass --out")
        ignored = {"--method": method, "--base": base, "--model": models, "--stats": stats, "--base-stats": base_stats,
                   "--set": sets, "--format": format, "--dtype": dtype, "--codec": codec, "--repo": repo,
                   "--commit": commit}
        for flag, value in ignored.items():
            if value:
                raise BlockmergeError(f"{flag} does not apply to a mergekit config (the config says what it merges, "
                                      "how, and in which dtype)", path=config)
        engine = {"block_size": block_size, "compute_dtype": compute_dtype, "executor": executor,
                  "scheduler": scheduler, "resume": resume}
        summary = mergekit.merge(config, out, device=device or "cpu",
                                 out_shard_size=parse_size(max_shard_size or "5GiB", "max_shard_size"),
                                 overwrite=overwrite, progress=show_progress(quiet),
                                 **{k: v for k, v in engine.items() if v is not None})
        if not quiet:
            print_summary([summary])
        return
    cfg = _load_config(config) if config else {"models": [], "stats": []}
    flags = {"method": method, "base": base, "base_stats": base_stats, "out": out, "format": format,
             "adapter_rank": adapter_rank, "block_size": block_size, "device": device, "dtype": dtype,
             "compute_dtype": compute_dtype, "codec": codec, "max_shard_size": max_shard_size}
    cfg.update({k: v for k, v in flags.items() if v is not None})
    if models:
        cfg["models"], cfg["stats"] = list(models), [None] * len(models)
    for index, path in _parse_pairs(stats, "--stats").items():
        if not index.isdigit() or int(index) >= len(cfg["models"]):
            raise BlockmergeError(f"--stats index {index!r} does not name one of the {len(cfg['models'])} models")
        cfg["stats"][int(index)] = path
    hyperparameters = {**(cfg.get("set") or {}), **_parse_pairs(sets, "--set")}
    for key in ("method", "out"):
        if not cfg.get(key):
            raise BlockmergeError(f"missing --{key} (or '{key}:' in the config)")
    given = [s for s in cfg["stats"] if s is not None]
    if given and len(given) != len(cfg["stats"]):
        raise BlockmergeError("statistics must be given for every model or none")
    options = {k: cfg[k] for k in ("format", "adapter_rank", "block_size", "device", "dtype", "compute_dtype", "codec",
                                   "max_shard_size") if cfg.get(k) is not None}
    if message and not commit:
        raise BlockmergeError("--message is for --commit")
    run = api.merge
    if commit:
        from .gittheta.commit import committing

        run = committing(message)
    summary = run(cfg["method"], cfg["models"], base=cfg.get("base"), stats=cfg["stats"] if given else None,
                  base_stats=cfg.get("base_stats"), out=cfg["out"], resume=resume, overwrite=overwrite,
                  progress=show_progress(quiet), executor=executor, scheduler=scheduler, repo=repo, **options,
                  **hyperparameters)
    if quiet:
        return
    if isinstance(summary, dict):  # an adapter's report
        rank = max((m["rank"] for m in summary["modules"].values()), default=0)
        console().print(f"{cfg['method']}: adapter of rank up to {rank} written to {cfg['out']} (largest relative "
                        f"truncation error {summary['relative_error']:.3g})")
    else:
        print_summary([summary])


main.add_command(mergekit_yaml)


@main.command()
@click.argument("name", required=False)
@click.option("--set", "sets", multiple=True, help="With NAME: hyperparameter NAME=VALUE whose needs to show.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_errors
def methods(name: str | None, sets: tuple[str, ...], as_json: bool) -> None:
    """List merge methods, their hyperparameters (defaults) and what they need at the defaults (or, for NAME, with
    the --set values)."""
    if sets and name is None:
        raise BlockmergeError("--set needs a method NAME")
    items = api.methods(name, **_parse_pairs(sets, "--set"))
    if as_json:
        click.echo(json.dumps(items, indent=1, default=str))
        return
    table = Table(title="merge methods")
    for col in ("method", "hyperparameters (default)", "needs" + (" (with --set)" if sets else ""), "description"):
        table.add_column(col)
    for m in items:
        hps = ", ".join(f"{n}={h['default']}" for n, h in m["hyperparameters"].items())
        one_of = [f"one of {', '.join(m['one_of_statistics'])}"] if m["one_of_statistics"] else []
        least, most = m["model_count"]
        count = [] if (least, most) == (1, None) else [f"{least} models" if least == most else
                                                       f"{least}-{most or ''} models"]
        needs = ", ".join((["base"] if m["needs_base"] else []) + m["statistics"] + one_of
                          + [f"{k} (optional)" for k in m["optional_statistics"]]
                          + [f"base {k}" for k in m["base_statistics"]] + count
                          + (["whole tensors"] if m["granularity"] == "tensor" else []))
        table.add_row(m["name"], hps, needs or "-", m["description"])
    console().print(table)
    click.echo("Formulas, every hyperparameter and the papers: docs/methods.md in blockmerge's source repository.")


@main.command("import")
@click.argument("source")
@click.argument("store")
@click.option("--codec", default="none", help="none, zstd, gzip or blosc.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (only once the new one is complete).")
@_errors
def import_(source: str, store: str, codec: str, overwrite: bool) -> None:
    """Copy a checkpoint (safetensors, shards, .bin/.pt, HF directory) into a blockmerge store."""
    summary = api.convert(source, store, format="store", codec=codec, overwrite=overwrite,
                          progress=show_progress(), label="import")
    click.echo(f"imported {summary.blocks} blocks, {summary.bytes_written / 2**20:.1f} MiB into {summary.output}")


@main.command()
@click.argument("store")
@click.argument("out")
@click.option("--format", type=click.Choice(["safetensors", "hf"]), default=None,
              help="safetensors (file or shards) or hf (shards + config/tokenizer files).")
@click.option("--max-shard-size", default="5GiB", show_default=True,
              help="Shard the safetensors output above this size.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (only once the new one is complete).")
@_errors
def export(store: str, out: str, format: str | None, max_shard_size: str, overwrite: bool) -> None:
    """Copy a store (or any checkpoint) to safetensors or a Hugging Face directory."""
    fmt = format or ("safetensors" if out.endswith(".safetensors") else "hf")
    summary = api.convert(store, out, format=fmt, max_shard_size=max_shard_size, overwrite=overwrite,
                          progress=show_progress(), label="export")
    click.echo(f"exported {summary.bytes_written / 2**20:.1f} MiB to {summary.output}")


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_errors
def inspect(path: str, as_json: bool) -> None:
    """Names, shapes, dtypes and sizes of a checkpoint or store."""
    info = api.inspect(path)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    table = Table(title=f"{info['path']} ({info['total_bytes'] / 2**20:.1f} MiB)")
    for col in ("name", "shape", "dtype", "MiB"):
        table.add_column(col, justify="right" if col == "MiB" else "left")
    for name, t in info["tensors"].items():
        table.add_row(name, "×".join(map(str, t["shape"])) or "scalar", t["dtype"], f"{t['bytes'] / 2**20:.2f}")
    console().print(table)
    if info.get("kinds"):
        click.echo(f"kinds: {', '.join(info['kinds'])}")


@main.group()
def stats() -> None:
    """Compute statistics of a model (Fisher, Gram matrices, trimmed task vectors) into a store."""


@stats.command("trimmed")
@click.option("--model", required=True, help="Fine-tuned checkpoint.")
@click.option("--base", required=True, help="Pretrained checkpoint.")
@click.option("--density", default=0.2, show_default=True, type=float, help="Kept fraction K of the task vector.")
@click.option("--out", "-o", required=True, help="Statistics store (directory) or FILE.safetensors (one kind).")
@click.option("--block-size", default=None, help="Bytes of inputs per block.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (only once the new one is complete).")
@_errors
def stats_trimmed(model: str, base: str, density: float, out: str, block_size: str | None, overwrite: bool) -> None:
    """The task vector trimmed to its global top-DENSITY magnitudes (TIES's trim, docs/methods.md §4.3)."""
    from .engine.statsfile import statistics_output
    from .stats.trimmed import trimmed

    options = {"block_size": block_size} if block_size else {}
    with statistics_output(out, overwrite=overwrite, inputs=[model, base]) as target:
        summary = trimmed(model, base, target, density=density, overwrite=overwrite, progress=show_progress(),
                          **options)
    click.echo(f"trimmed task vector of {model} written to {out} ({summary.seconds:.1f} s)")


def _task_options(fn):
    options = [
        click.option("--model", required=True, help="Hugging Face model directory (config, weights, tokenizer)."),
        click.option("--data", help="Examples: JSON/JSONL/CSV/Parquet file(s) or a datasets directory."),
        click.option("--task", "task_file", help="Task file (YAML/JSON with the TaskSpec fields) instead of flags."),
        click.option("--split", default="train", show_default=True, help="Split of --data to read."),
        click.option("--text-column", default="text", show_default=True, help="Column of the input text."),
        click.option("--text-pair-column", default=None, help="Column of a second input text (sentence pairs)."),
        click.option("--label-column", default="label", show_default=True, help="Column of the class label."),
        click.option("--target-column", default=None, help="Target text (seq2seq / causal LM)."),
        click.option("--max-length", default=128, show_default=True, type=int,
                     help="Tokens per example (longer inputs are truncated)."),
        click.option("--labels", default="empirical", show_default=True,
                     type=click.Choice(["empirical", "sampled", "exact"]),
                     help="y in log p(y|x): the data's label, one draw from the model, or every class weighted "
                     "by its probability."),
        click.option("--num-examples", default=1000, show_default=True, type=int,
                     help="Examples read (the first ones of the split)."),
        click.option("--batch-size", default=8, show_default=True, type=int,
                     help="Examples per forward/backward pass (the statistic does not depend on it)."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of sampled labels."),
        click.option("--out", "-o", required=True, help="Statistics store (directory) or FILE.safetensors (one kind)."),
        click.option("--overwrite", is_flag=True, help="Replace an existing output (only once the new one is "
                     "complete)."),
        click.option("--executor", type=click.Choice(["local", "dask"]), default="local", show_default=True,
                     help="Compute here, or as shards on a Dask cluster (model, data and --out on storage every "
                     "worker sees)."),
        click.option("--scheduler", help="With --executor dask: tcp://HOST:8786 (default "
                     "$BLOCKMERGE_DASK_SCHEDULER, else a local cluster)."),
        click.option("--shards", type=int, help="With --executor dask: number of tasks the examples are split into "
                     "(default: one per worker thread)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _compute(statistic: str, model: str, data: str | None, task_file: str | None, split: str, text_column: str,
             text_pair_column: str | None, label_column: str, target_column: str | None, max_length: int,
             **options: Any) -> None:
    from .stats.compute import compute
    from .stats.data import TaskSpec
    from .stats.shard import inputs_of

    if task_file:
        task = TaskSpec.from_file(task_file)
    elif data:
        task = TaskSpec(data=data, split=split, text_column=text_column, text_pair_column=text_pair_column,
                        label_column=label_column, target_column=target_column, max_length=max_length)
    else:
        raise BlockmergeError("pass --data (with column options) or --task")
    from .engine.statsfile import statistics_output

    out = options.pop("out")
    with statistics_output(out, overwrite=options["overwrite"], inputs=inputs_of(model, task)) as target:
        summary = compute(statistic, model, task, target, progress=show_progress(), **options)
    click.echo(f"{', '.join(summary['kinds'])} of {model}: {summary['examples']} examples, {summary['tokens']} "
               f"tokens, {summary['seconds']:.1f} s, peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB")


@stats.command("fisher")
@_task_options
@click.option("--parameters", default=None, help="Regex of parameter names (default: every trainable one).")
@_errors
def stats_fisher(**kwargs: Any) -> None:
    """Diagonal Fisher: mean squared per-example gradient of log p(y|x) (docs/methods.md §5.5)."""
    _compute("fisher", **kwargs)


@stats.command("gram")
@_task_options
@click.option("--inputs/--no-inputs", default=True, show_default=True, help="Gram of Linear inputs (gram_in).")
@click.option("--outputs/--no-outputs", default=False, show_default=True,
              help="Gram of Linear output gradients (gram_out).")
@click.option("--max-memory", default=None, help="Bound on accumulators held at once (e.g. 2GiB).")
@click.option("--modules", default=None,
              help="Regex the Linear module names must match in full (default: every one), e.g. '(?!lm_head).*'.")
@_errors
def stats_gram(max_memory: str | None, **kwargs: Any) -> None:
    """Gram matrices of every Linear layer's inputs and/or output gradients (docs/methods.md §6.2, §7.5)."""
    _compute("gram", max_memory=parse_size(max_memory, "max_memory") if max_memory else None, **kwargs)


@stats.command("blockwise-fisher")
@_task_options
@click.option("--parameters", required=True, help="Regex of the vector parameters (e.g. '.*ia3.*').")
@_errors
def stats_blockwise_fisher(**kwargs: Any) -> None:
    """Per-vector Fisher blocks: mean outer product of per-example gradients (docs/methods.md §5.5)."""
    _compute("blockwise_fisher", **kwargs)
