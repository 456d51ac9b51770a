"""MaTS on the realistic benchmark: CG iterations × starting point × objective, per seed.

    python benchmarks/realistic/mats_study.py --seeds 0 1 2 [--work /tmp/blockmerge-realistic] [--jobs 2]

Reuses what run.py left under ``--work`` (tasks, fine-tuned encoders, Gram and Fisher statistics, the sweeps'
records; anything missing is made by the same pipeline functions, so run run.py first). For every seed it merges
with MaTS for each number of CG iterations (``--iterations``), starting point (``--starts``) and objective
(``--objectives``):

- ``task_arithmetic``: MaTS's own start, at the init_scaling_factor that scores best on validation among the
  benchmark's MaTS candidates from task arithmetic with the K-FAC objective and the fewest iterations;
- ``ties`` / ``regmean``: the merge the benchmark chose for that method (its record's hyperparameters), merged
  again into ``WORK/seed<N>/merges/chosen-<method>.safetensors`` (pipeline.chosen_merge), passed
  as ``initialization=PATH``;

each merge run in a fresh process (wall and CPU seconds, as run.py's chosen candidates), with the CG iterations
and residuals its provenance reports per tensor, scored on validation and test as the benchmark scores. Every
result has a record under ``WORK/seed<N>/study/`` and is reused when its settings match.

Self-consistency (``--check-seed``, default the first seed): MaTS with the ``regmean`` objective run to
convergence (float64, ``rtol`` tiny) against RegMean's closed form at alpha 0.9 (at alpha 1 the pooler's input Gram,
from a few hundred [CLS] vectors, is singular to working precision, and CG and a direct solve part in its null
space), and ``diagonal_fisher`` against
the Fisher merge of the same system (``zero_fisher=zero``, no normalisation, uniform weights; MaTS from zeros,
so coordinates without Fisher are 0 in both). Writes ``benchmarks/results/mats_study.{md,json}`` (``--results``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[2]
STARTS = ("task_arithmetic", "ties", "regmean")
OBJECTIVES = ("blockwise_fisher", "regmean")
ITERATIONS = (10, 30, 100)
CHECK_ITERATIONS = 3000  # per tensor, twice the widest Gram; CG stops earlier at rtol
CHECK_RTOL = 1e-13
CHECK_ALPHA = 0.9
CHECK_BLOCK = "2GiB"  # diagonal_fisher solves every tensor whole, the word embeddings too
STAT_OF = {"blockwise_fisher": "gram", "regmean": "gram", "diagonal_fisher": "fisher"}


def _inputs(work: Path, settings: Any, seed: int, statistic: str) -> tuple[list[str], list[str], dict]:
    import pipeline

    root = pipeline.seed_dir(work, seed)
    models = [str(root / "encoders" / f"{t}.safetensors") for t in settings.tasks]
    stats = [str(root / "stats" / f"{t}.{statistic}") for t in settings.tasks]
    key = {"models": [pipeline.model_key(settings, seed, t) for t in settings.tasks],
           "stats": [pipeline.stats_key(settings, seed, t, statistic) for t in settings.tasks]}
    return models, stats, key


def _benchmark_merge(work: Path, settings: Any, seed: int, method: str) -> tuple[dict, dict]:
    """The benchmark's record of ``method`` on ``seed`` (made if missing): its key and result."""
    import pipeline

    pipeline.merge_method(work, settings, seed, method)
    record = json.loads((pipeline.seed_dir(work, seed) / "merges" / f"{method}.json").read_text())
    return record["key"], record["result"]


def task_arithmetic_scale(work: Path, settings: Any, seed: int) -> float:
    """The init_scaling_factor of the study's task-arithmetic start: the benchmark's best on validation among its MaTS
    candidates from task arithmetic with the K-FAC objective and the fewest CG iterations."""
    candidates = _benchmark_merge(work, settings, seed, "mats")[1]["candidates"]
    fewest = min(c["hyperparameters"]["num_iterations"] for c in candidates)
    return max((c for c in candidates if "initialization" not in c["hyperparameters"]
                and c["hyperparameters"].get("objective", "blockwise_fisher") == "blockwise_fisher"
                and c["hyperparameters"]["num_iterations"] == fewest),
               key=lambda c: c["validation"])["hyperparameters"]["init_scaling_factor"]


def start_checkpoint(work: Path, settings: Any, seed: int, method: str) -> dict:
    """The benchmark's chosen ``method`` merge, written to ``WORK/seed<N>/merges/chosen-<method>.safetensors``."""
    import pipeline

    return pipeline.chosen_merge(work, settings, seed, method)


def cg_summary(path: Path, iterations: int) -> dict:
    """Iterations and residuals per tensor from the provenance in the merged file's header."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        reports = json.loads(f.metadata()["blockmerge"])["reports"]
    runs = [r["iterations"] for rs in reports.values() for r in rs]
    ratios = [r["final_residual"] / r["initial_residual"] for rs in reports.values() for r in rs
              if r["initial_residual"] > 0]
    return {"tensors": len(runs), "iterations_mean": statistics.fmean(runs), "iterations_max": max(runs),
            "iterations_min": min(runs), "stopped_early": sum(1 for n in runs if n < iterations),
            "residual_ratio_median": statistics.median(ratios), "residual_ratio_max": max(ratios)}


def study_one(work: Path, settings: Any, seed: int, objective: str, start: str, iterations: int) -> dict:
    """One MaTS merge of the study: merged in a fresh process, scored on validation and test."""
    import pipeline

    from blockmerge.eval import Task, evaluate

    root = pipeline.seed_dir(work, seed)
    models, stats, key = _inputs(work, settings, seed, STAT_OF[objective])
    options = {"base": str(pipeline.base_encoder(work)), "stats": stats, "objective": objective,
               "num_iterations": iterations}
    if start == "task_arithmetic":
        options["init_scaling_factor"] = task_arithmetic_scale(work, settings, seed)
        init_key = {"init_scaling_factor": options["init_scaling_factor"]}
    else:
        chosen = start_checkpoint(work, settings, seed, start)
        options["initialization"] = chosen["path"]
        init_key = {"checkpoint": start, "made": chosen["key"]}
    name = f"{objective}-{start}-{iterations}"

    def produce() -> dict:
        tasks = [Task.from_file(root / "tasks" / f"{t}.yaml") for t in settings.tasks]
        out = root / "study" / f"{name}.safetensors"
        measured = pipeline.merge_in_child("mats", models, out, options)
        cg = cg_summary(out, iterations)
        scores = {split: {t: r["score"] for t, r in evaluate(out, tasks, split=split)["tasks"].items()}
                  for split in ("validation", "test")}
        out.unlink()
        return {"options": {k: v for k, v in options.items() if k not in ("base", "stats")}, "merge": measured,
                "cg": cg, **scores}

    key = {**key, "objective": objective, "start": init_key, "num_iterations": iterations}
    return pipeline.cached(root / "study" / f"{name}.json", key, produce)


def self_consistency(work: Path, settings: Any, seed: int) -> dict:
    """The figures of :func:`consistency_figures`, recorded in ``WORK/seed<N>/study/self_consistency.json``."""
    import pipeline

    key = {"grams": _inputs(work, settings, seed, "gram")[2], "fishers": _inputs(work, settings, seed, "fisher")[2],
           "num_iterations": CHECK_ITERATIONS, "rtol": CHECK_RTOL, "alpha": CHECK_ALPHA}
    record = pipeline.seed_dir(work, seed) / "study" / "self_consistency.json"
    return pipeline.cached(record, key, lambda: consistency_figures(work, settings, seed))


def consistency_figures(work: Path, settings: Any, seed: int, log: Any = print) -> dict:
    """Per objective and solver (CG to convergence, and the exact ``solver=direct`` of the same system): the largest
    over tensors of max|a − b| / max|b| and of ‖a − b‖ / ‖b‖ against the closed form, CG's iterations."""
    import pipeline
    import torch
    from safetensors.torch import load_file

    import blockmerge

    base = str(pipeline.base_encoder(work))
    models, grams, _ = _inputs(work, settings, seed, "gram")
    fishers = _inputs(work, settings, seed, "fisher")[1]
    cases = {
        "regmean": (dict(objective="regmean", stats=grams, alpha=CHECK_ALPHA),
                    dict(method="regmean", stats=grams, alpha=CHECK_ALPHA)),
        "diagonal_fisher": (dict(objective="diagonal_fisher", stats=fishers, initialization="zeros"),
                            dict(method="fisher", stats=fishers, zero_fisher="zero", normalize_fishers=False)),
    }
    results = {}
    for name, (mats_options, closed_options) in cases.items():
        closed_options = dict(closed_options)
        method = closed_options.pop("method")
        closed = blockmerge.merge(method, models, base=base, compute_dtype="float64", **closed_options)
        for solver in ("direct", "cg"):
            start = time.perf_counter()
            out = pipeline.seed_dir(work, seed) / "study" / f"check-{name}-{solver}.safetensors"
            out.parent.mkdir(parents=True, exist_ok=True)
            summary = blockmerge.merge("mats", models, base=base, out=out, overwrite=True, solver=solver,
                                       num_iterations=CHECK_ITERATIONS, rtol=CHECK_RTOL, solve_dtype="float64",
                                       block_size=CHECK_BLOCK, **mats_options)
            seconds = time.perf_counter() - start
            mats = load_file(out)
            out.unlink()
            worst, where, frob = 0.0, None, 0.0
            for tensor in summary.reports:
                a, b = mats[tensor].double(), closed[tensor].double()
                scale = float(b.abs().max())
                diff = float((a - b).abs().max()) / (scale if scale > 0 else 1.0)
                frob = max(frob, float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)),
                                                                               1e-300)))
                if diff >= worst:
                    worst, where = diff, tensor
            others = max((float((mats[t] - closed[t]).abs().max()) for t in closed if t not in summary.reports),
                         default=0.0)
            runs = [r["iterations"] for rs in summary.reports.values() for r in rs]
            results[f"{name} {solver}"] = {
                "objective": name, "solver": solver, "closed_form": {method: closed_options},
                "max_relative_difference": worst, "at": where, "max_frobenius_relative_difference": frob,
                "solved_tensors": len(summary.reports), "other_tensors_max_abs_difference": others,
                "cg_iterations_max": max(runs), "cg_iterations_mean": statistics.fmean(runs),
                "seconds": round(seconds, 1)}
            log(f"self-consistency {name} ({solver}): max |a - b| / max |b| = {worst:.2e} ({where}), "
                f"max ||a - b|| / ||b|| = {frob:.2e}; CG iterations up to {max(runs)}; "
                f"averaged tensors differ by {others:.1e}")
    return results


def _call(fn_name: str, *args: Any) -> Any:
    return globals()[fn_name](*args)


def run_study(work: Path, seeds: list[int], settings: Any, *, iterations: list[int], starts: list[str],
              objectives: list[str], check_seed: int | None, jobs: int, threads: int, log: Any = print,
              recorded_only: bool = False) -> dict:
    """Every study merge (and the self-consistency check) in ``jobs`` processes of ``threads`` threads; with
    ``recorded_only``, none: the results recorded so far (an interrupted study), the others listed as missing."""
    import run

    work = Path(work).absolute()
    started, clock, load = time.time(), time.perf_counter(), os.getloadavg()
    # First the benchmark's records the merges read (made here if missing, once per seed and method)
    calls = [("start_checkpoint", work, settings, s, m) for s in seeds for m in starts if m != "task_arithmetic"]
    calls += [("_benchmark_merge", work, settings, s, "mats") for s in seeds if "task_arithmetic" in starts]
    # Seed by seed (an interrupted study leaves whole seeds: rerun with the seeds done to write their tables)
    merges = [("study_one", work, settings, s, o, m, n) for s in seeds for n in sorted(iterations, reverse=True)
              for o in objectives for m in starts]
    check = [("self_consistency", work, settings, check_seed)] if check_seed is not None else []
    if recorded_only:
        results = {s: {} for s in seeds}
        for s in seeds:
            for n in iterations:
                for o in objectives:
                    for m in starts:
                        record = work / f"seed{s}" / "study" / f"{o}-{m}-{n}.json"
                        if record.is_file():
                            results[s][f"{o}-{m}-{n}"] = json.loads(record.read_text())["result"]
        record = work / f"seed{check_seed}" / "study" / "self_consistency.json"
        consistency = json.loads(record.read_text())["result"] if check and record.is_file() else None
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=run._init_worker,
                                                    initargs=(threads,)) as pool:
            for phase in (calls, check + merges):
                futures = {pool.submit(_call, *c): c for c in phase}
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    log(f"  {' '.join(str(a) for a in futures[future][3:] if a is not None)} done "
                        f"({time.perf_counter() - clock:.0f} s)")
        # Results again, from the records (cached: nothing is recomputed).
        results = {s: {f"{o}-{m}-{n}": study_one(work, settings, s, o, m, n) for n in iterations
                       for o in objectives for m in starts} for s in seeds}
        consistency = self_consistency(work, settings, check_seed) if check else None
    benchmark = {s: {m: _benchmark_merge(work, settings, s, m)[1] for m in ("task_arithmetic", "ties", "regmean",
                                                                          "mats")} for s in seeds}
    individual = {s: {t: _individual(work, settings, s, t) for t in settings.tasks} for s in seeds}
    return {"settings": dataclasses.asdict(settings), "seeds": seeds, "iterations": iterations, "starts": starts,
            "objectives": objectives, "results": results, "benchmark": benchmark, "individual": individual,
            "self_consistency": consistency,
            "timing": {"wall_seconds": round(time.perf_counter() - clock, 1), "jobs": jobs, "threads": threads,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))},
            "machine": run.machine(load, os.getloadavg())}


def _individual(work: Path, settings: Any, seed: int, task: str) -> dict:
    import pipeline

    return pipeline.finetune_model(work, settings, seed, task)["test"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def rows(raw: dict) -> list[dict]:
    """One row per (objective, start, iterations): mean validation / test / normalised accuracy, cost, CG."""
    tasks, seeds = raw["settings"]["tasks"], list(raw["results"])
    individual = raw["individual"]

    def averages(scores: dict[str, dict[str, float]]) -> dict[str, list[float]]:
        return {"test": [statistics.fmean(scores[s][t] for t in tasks) for s in seeds],
                "normalised": [statistics.fmean(scores[s][t] / individual[s][t] for t in tasks) for s in seeds]}

    table = []
    for objective in raw["objectives"]:
        for start in raw["starts"]:
            for n in raw["iterations"]:
                got = {s: raw["results"][s][f"{objective}-{start}-{n}"] for s in raw["results"]
                       if f"{objective}-{start}-{n}" in raw["results"][s]}
                if not got:
                    continue
                seeds = list(got)
                table.append({"objective": objective, "start": start, "iterations": n,
                              "validation": [statistics.fmean(got[s]["validation"].values()) for s in seeds],
                              **averages({s: got[s]["test"] for s in seeds}),
                              "seconds": [got[s]["merge"]["seconds"] for s in seeds],
                              "cpu_seconds": [got[s]["merge"]["cpu_seconds"] for s in seeds],
                              "cg_mean": [got[s]["cg"]["iterations_mean"] for s in seeds],
                              "cg_max": [got[s]["cg"]["iterations_max"] for s in seeds],
                              "stopped_early": [got[s]["cg"]["stopped_early"] for s in seeds],
                              "tensors": got[seeds[0]]["cg"]["tensors"], "seeds": seeds})
    return table


def references(raw: dict) -> list[dict]:
    tasks, seeds = raw["settings"]["tasks"], list(raw["results"])
    out = []
    for method in ("task_arithmetic", "ties", "regmean", "mats"):
        merges = {s: raw["benchmark"][s][method] for s in seeds}
        out.append({"name": method, "chosen": " / ".join(_chosen(merges[s]["hyperparameters"]) for s in seeds),
                    "validation": [max(c["validation"] for c in merges[s]["candidates"]) for s in seeds],
                    "test": [statistics.fmean(merges[s]["test"][t] for t in tasks) for s in seeds],
                    "normalised": [statistics.fmean(merges[s]["test"][t] / raw["individual"][s][t] for t in tasks)
                                   for s in seeds],
                    "seconds": [merges[s]["merge"]["seconds"] for s in seeds]})
    return out


def _chosen(hp: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in hp.items())


def markdown(raw: dict, command: str) -> str:
    seeds = ", ".join(str(s) for s in raw["seeds"])
    settings, timing, machine = raw["settings"], raw["timing"], raw["machine"]
    lines = [
        "# MaTS study on the realistic benchmark", "",
        f"Command: `{command}`", "",
        f"Seeds {seeds}; the benchmark's tasks, fine-tunes and statistics ({settings['train']} train / "
        f"{settings['validation']} validation / {settings['test']} test examples per task, statistics over "
        f"{settings['stat_examples']} training examples per task), reused from run.py's work directory.", "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, commit {machine['commit']}; "
        f"load average {machine['load_average_start'][0]} at the start, {machine['load_average_end'][0]} at the end "
        f"({timing['jobs']} worker processes × {timing['threads']} thread). Wall time "
        f"{timing['wall_seconds'] / 60:.1f} min (records made earlier are reused and not counted).", "",
        "| objective | start | CG iterations (max) | validation | test | normalised | merge s | merge CPU s "
        "| CG iterations run per tensor (mean, max) | tensors stopped at rtol |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows(raw):
        lines.append(f"| {row['objective']} | {row['start']} | {row['iterations']} | {_cell(row['validation'])} | "
                     f"{_cell(row['test'])} | {_cell(row['normalised'])} | {_cell(row['seconds'], 1)} | "
                     f"{_cell(row['cpu_seconds'], 1)} | {statistics.fmean(row['cg_mean']):.1f}, {max(row['cg_max'])} "
                     f"| {statistics.fmean(row['stopped_early']):.1f} of {row['tensors']} |")
    missing = [f"{name} (seed {s})" for s in raw["seeds"] for name in
               (f"{o}-{m}-{n}" for o in raw["objectives"] for m in raw["starts"] for n in raw["iterations"])
               if name not in raw["results"][s]]
    if missing:
        lines += ["", f"Not run yet ({len(missing)}; rerun the command without `--recorded-only`): "
                  + ", ".join(missing) + "."]
    lines += ["", "The benchmark's chosen merges (realistic.md) for reference:", "",
              "| method | chosen (per seed) | validation | test | normalised | merge s |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in references(raw):
        lines.append(f"| {row['name']} | {row['chosen']} | {_cell(row['validation'])} | {_cell(row['test'])} | "
                     f"{_cell(row['normalised'])} | {_cell(row['seconds'], 1)} |")
    lines += [
        "",
        "- Start: `task_arithmetic` is MaTS's own initialisation at the init_scaling_factor that scores best on "
        "validation among the benchmark's MaTS candidates from task arithmetic (K-FAC objective, fewest iterations) "
        "on each seed; `ties` and `regmean` are the benchmark's chosen TIES and RegMean merges, passed as "
        "`initialization=PATH`.",
        "- Objective `blockwise_fisher`: K-FAC (gram_in and gram_out) on the encoder's Linear weights; `regmean`: "
        "gram_in only, alpha 1 (MaTS's default). Every other tensor (embeddings, biases, LayerNorms) is averaged.",
        "- CG stops at `rtol` 1e-5 (SciPy's default) or the iteration cap; the iterations run and residuals come "
        "from each merge's provenance (`reports`, one per solved tensor). Validation and test: mean accuracy over "
        "the four tasks, each with its own head, as realistic.md; mean ± sample standard deviation over seeds.",
        "- Merge s / CPU s: the merge alone in a fresh process, as the benchmark measures its chosen candidates.",
    ]
    check = raw.get("self_consistency")
    if check:
        lines += ["", f"Self-consistency (seed {raw['check_seed']}, the benchmark's models and statistics; float64, "
                  f"CG up to {CHECK_ITERATIONS} iterations per tensor at rtol {CHECK_RTOL:g}; `direct` solves the "
                  "same system exactly):", "",
                  "| MaTS objective | solver | closed form | max over tensors of max\\|a − b\\| / max\\|b\\| "
                  "| max ‖a − b‖ / ‖b‖ | worst tensor | CG iterations (mean, max) | merge s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        forms = {"regmean": f"`regmean` alpha={CHECK_ALPHA} (MaTS alpha={CHECK_ALPHA})",
                 "diagonal_fisher": "`fisher` zero_fisher=zero, normalize_fishers=false (uniform weights)"}
        for c in check.values():
            iterations = f"{c['cg_iterations_mean']:.0f}, {c['cg_iterations_max']}" if c["solver"] == "cg" else "—"
            lines.append(f"| {c['objective']} | {c['solver']} | {forms[c['objective']]} | "
                         f"{c['max_relative_difference']:.1e} | {c['max_frobenius_relative_difference']:.1e} | "
                         f"`{c['at']}` | {iterations} | {c['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import run

    from blockmerge.errors import BlockmergeError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default="/tmp/blockmerge-realistic", help="run.py's work directory")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "mats_study"),
                        help="path prefix of the .md and .json written")
    parser.add_argument("--iterations", type=int, nargs="+", default=list(ITERATIONS))
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=STARTS)
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--check-seed", type=int, default=None, help="self-consistency seed (default: the first)")
    parser.add_argument("--no-check", action="store_true", help="skip the self-consistency check")
    parser.add_argument("--recorded-only", action="store_true",
                        help="merge nothing: write the tables of the results recorded so far")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    run.settings_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_seed = None if args.no_check else (args.seeds[0] if args.check_seed is None else args.check_seed)
    try:
        raw = run_study(Path(args.work), args.seeds, run.settings_from(args), iterations=args.iterations,
                        starts=args.starts, objectives=args.objectives, check_seed=check_seed, jobs=args.jobs,
                        threads=args.threads, log=lambda line: print(line, flush=True),
                        recorded_only=args.recorded_only)
    except BlockmergeError as e:
        print(f"mats_study.py: error: {e}", file=sys.stderr)
        return 2
    raw["check_seed"] = check_seed
    command = "python benchmarks/realistic/mats_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(raw, command.strip())
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps({**raw, "command": command.strip()}, indent=1) + "\n")
    results.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
