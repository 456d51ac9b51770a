"""Tables and the plot of the realistic benchmark from run.py's raw results (mean ± std over seeds)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

MiB = 1 << 20
INDIVIDUAL, BASE = "individual models", "base encoder + task heads"
NOTES = [
    "Accuracy on each task's test split with the task's own fine-tuned head over the merged encoder; "
    "normalised = mean over tasks of merged ÷ individual accuracy. Mean ± sample standard deviation over seeds; "
    "a seed changes the data splits and the fine-tuning.",
    "Chosen: the hyperparameter the sweep picked on validation, per seed (average: nothing to tune).",
    "Merge time, CPU time and peak RSS: the chosen candidate merged again in a fresh process (peak RSS includes "
    "the Python/torch runtime); 4 encoders of 22.7M float32 parameters and the base.",
    "Statistics: diagonal Fisher (empirical labels) of the encoder parameters and input/output-gradient Grams "
    "of the encoder's Linear layers, over the first training examples of each task.",
    "UBGM: there is no Fisher of the pretraining task for this encoder, so H_0 is zero (a zero Fisher store); "
    "delta0 then plays the role of an isotropic H_0, and is swept with scaling_factor.",
    "Fisher: uniform weights; the grid is normalize_fishers (off, or each model's weight divided by the L2 norm "
    "of its Fisher, FISHER's default).",
    "MaTS: K-FAC objective (blockwise_fisher on Linear weights: gram_in and gram_out) solved by conjugate "
    "gradient from the task-arithmetic initialisation; tensors without Grams (embeddings, biases, LayerNorms) "
    "are averaged.",
    "RegMean: Linear weights from the input Grams, every other tensor averaged.",
]

LORA_NOTE = ("LoRA: each method merges the four tasks' adapters, each read over the base encoder as W + s·B·A row "
             "block by row block (no full encoder is written); the individual models' row is the adapters merged "
             "into the encoder, and statistics are computed on that model.")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def rows(raw: dict) -> list[dict[str, Any]]:
    """One row per model kind: per-task and average accuracy by seed, normalised accuracy, chosen values, cost."""
    tasks = raw["settings"]["tasks"]
    seeds = list(raw["results"])
    individual = {s: {t: raw["results"][s]["models"][t]["test"] for t in tasks} for s in seeds}
    table = [{"name": INDIVIDUAL, "accuracy": individual},
             {"name": BASE, "accuracy": {s: {t: raw["results"][s]["models"][t]["base_test"] for t in tasks}
                                         for s in seeds}}]
    for method in raw["methods"]:
        merges = {s: raw["results"][s]["merges"][method] for s in seeds}
        table.append({"name": method, "accuracy": {s: merges[s]["test"] for s in seeds},
                      "chosen": {s: merges[s]["hyperparameters"] for s in seeds},
                      "merge": {s: merges[s]["merge"] for s in seeds},
                      "candidates": {s: merges[s]["candidates"] for s in seeds}})
    for row in table:
        acc = row["accuracy"]
        row["average"] = {s: statistics.fmean(acc[s][t] for t in tasks) for s in seeds}
        row["normalised"] = {s: statistics.fmean(acc[s][t] / individual[s][t] for t in tasks) for s in seeds}
    return table


def _listed(value: Any) -> str:
    """A setting that is one value or a list of them (older results hold one)."""
    return " / ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _cell(values: list[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _chosen(row: dict) -> str:
    chosen = list(row.get("chosen", {}).values())
    if not chosen or not chosen[0]:
        return "—"
    return ", ".join(f"{name} {'/'.join(_value(c[name]) for c in chosen)}" for name in chosen[0])


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown_table(table: list[dict], tasks: list[str] | None = None) -> str:
    tasks = tasks or list(next(iter(table[0]["accuracy"].values())))
    head = ["method", *tasks, "average", "normalised", "chosen (per seed)", "merge s", "merge CPU s", "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in table:
        seeds = list(row["accuracy"])
        cells = [row["name"], *(_cell([row["accuracy"][s][t] for s in seeds]) for t in tasks),
                 _cell(list(row["average"].values())), _cell(list(row["normalised"].values())), _chosen(row)]
        if "merge" in row:
            merge = list(row["merge"].values())
            cells += [_cell([m["seconds"] for m in merge], 1), _cell([m["cpu_seconds"] for m in merge], 1),
                      f"{statistics.fmean(m['peak_rss_bytes'] for m in merge) / MiB:.0f}"]
        else:
            cells += ["—", "—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def candidates_table(table: list[dict]) -> str:
    """Validation score of every candidate, mean over seeds."""
    lines = ["| method | candidate: mean validation accuracy |", "| --- | --- |"]
    for row in table:
        by_seed = list(row.get("candidates", {}).values())
        if not by_seed or not by_seed[0]:
            continue
        cells = []
        for i, candidate in enumerate(by_seed[0]):
            label = ", ".join(f"{k}={_value(v)}" for k, v in candidate["hyperparameters"].items())
            cells.append(f"{label}: {statistics.fmean(seed[i]['validation'] for seed in by_seed):.3f}")
        lines.append(f"| {row['name']} | " + "; ".join(cells) + " |")
    return "\n".join(lines)


def markdown(raw: dict, table: list[dict], command: str) -> str:
    settings, timing, machine = raw["settings"], raw["timing"], raw["machine"]
    lora = settings.get("lora_rank", 0)
    tuned = (f"LoRA adapters of rank {lora} (alpha {settings['lora_alpha']}) on the encoder's attention and MLP "
             "Linear layers, and the head, fine-tuned" if lora else "fine-tuning")
    sizes = (f"{len(settings['tasks'])} tasks, {settings['train']} train / {settings['validation']} validation / "
             f"{settings['test']} test examples per task (fewer where a class runs out), {settings['max_length']} "
             f"tokens; {tuned} {settings['steps']} steps of {settings['batch_size']} (lr {settings['lr']:g}); "
             f"statistics over {settings['stat_examples']} training examples per task; MaTS "
             f"{_listed(settings.get('mats_objective', ['blockwise_fisher']))} objective, "
             f"{_listed(settings['mats_iterations'])} CG iterations from "
             f"{_listed(settings.get('mats_start', ['task_arithmetic']))}")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in timing["stages_wall_seconds"].items())
    out = [
        "# Realistic merging benchmark (MiniLM, four text-classification tasks"
        + (", LoRA fine-tunes merged as adapters)" if lora else ")"), "",
        f"Command: `{command}`", "",
        f"Seeds {', '.join(map(str, raw['seeds']))}; {sizes}.", "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, torch {machine['torch']}, "
        f"commit {machine['commit']}; load average {machine['load_average_start'][0]:.1f} at the start, "
        f"{machine['load_average_end'][0]:.1f} at the end ({timing['jobs']} worker processes × "
        f"{timing['threads']} thread).", "",
        f"Wall time {timing['wall_seconds'] / 60:.1f} min ({stages}); CPU time of all processes "
        f"{timing['cpu_seconds'] / 60:.1f} min" + (f"; {timing['reused']} of {timing['records']} products were "
                                                  "reused from an earlier run, their time is not included."
                                                  if timing.get("reused") else "."),
        "", markdown_table(table, settings["tasks"]), "",
        *(f"- {note}" for note in NOTES), *([f"- {LORA_NOTE}"] if lora else []), "",
        "Sweeps (validation):", "", candidates_table(table), "",
    ]
    return "\n".join(out)


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["name"] for row in table]
    means = [_mean_std(list(row["average"].values())) for row in table]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    colors = ["#4c72b0" if n == INDIVIDUAL else "#8c8c8c" if n == BASE else "#dd8452" for n in names]
    ax.bar(range(len(names)), [m for m, _ in means], yerr=[s for _, s in means], color=colors, capsize=3)
    for i, row in enumerate(table):
        values = list(row["average"].values())
        ax.plot([i] * len(values), values, "k.", markersize=4)
    ax.axhline(means[0][0], color="#4c72b0", linestyle="--", linewidth=1)
    for i, (mean, _) in enumerate(means):
        ax.text(i, 0.02, f"{mean:.3f}", ha="center", fontsize=8, color="white")
    labels = {INDIVIDUAL: "individual\nmodels", BASE: "base encoder\n+ task heads"}
    ax.set_xticks(range(len(names)), [labels.get(n, n.replace("_", "\n")) for n in names], fontsize=8)
    ax.set_ylabel("average test accuracy (4 tasks)")
    ax.set_ylim(0, 1)
    ax.set_title(f"Merging 4 fine-tuned MiniLM encoders (mean ± std over {len(table[0]['average'])} seeds)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write(raw: dict, prefix: str | os.PathLike, command: str) -> list[Path]:
    """Write ``prefix``.json (raw results and the table), .md and .png; return their paths."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    table = rows(raw)
    paths = [prefix.with_suffix(".json"), prefix.with_suffix(".md"), prefix.with_suffix(".png")]
    summary = [{"name": r["name"], **{k: _mean_std(list(r[k].values())) for k in ("average", "normalised")}}
               for r in table]
    for path, text in ((paths[0], json.dumps({**raw, "command": command, "table": summary}, indent=1) + "\n"),
                       (paths[1], markdown(raw, table, command))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    plot(table, paths[2])
    return paths
