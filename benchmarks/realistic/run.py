"""Realistic offline merging benchmark: fine-tune, compute statistics, merge with every method, evaluate.

    bash benchmarks/realistic/setup.sh && python benchmarks/realistic/run.py --seeds 0 1 2

For each seed: build the four tasks (data.py), fine-tune all-MiniLM-L6-v2 on each (finetune.py), compute
each model's diagonal Fisher and Gram statistics (``blockmerge.stats.compute.compute``, as ``blockmerge
stats``), then for every method of docs/methods.md §16 sweep its main hyperparameter on validation
(``blockmerge.eval.sweep``), merge the chosen candidate again in a fresh process (time, peak RSS) and score it
on test with each task's own head. Everything is kept under ``--work`` and reused when its settings match, so
a second run only redoes what changed. Jobs run in ``--jobs`` processes of ``--threads`` threads each.
Writes ``benchmarks/results/realistic.{md,json,png}`` (``--results``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[2]
STATISTICS = ("fisher", "gram")
RECORDS = ("data.json", "models/*.json", "stats/*.json", "merges/*.json")  # one per product, see pipeline.cached


def _init_worker(threads: int) -> None:
    import datasets
    import torch
    import transformers

    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _call(fn_name: str, *args: Any) -> Any:
    import pipeline

    return getattr(pipeline, fn_name)(*args)


class Runner:
    """Runs a stage's jobs in worker processes (or in this one with ``jobs=1``), longest first."""

    def __init__(self, jobs: int, threads: int):
        import torch

        self.pool, self.threads_before = None, torch.get_num_threads()
        if jobs > 1:
            context = multiprocessing.get_context("spawn")
            self.pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                                               initargs=(threads,))
        else:
            torch.set_num_threads(threads)

    def map(self, label: str, fn_name: str, calls: list[tuple], log: Callable[[str], None]) -> list[Any]:
        start = time.perf_counter()
        if self.pool is None:
            results = []
            for args in calls:
                results.append(_call(fn_name, *args))
                log(f"  {label} {_describe(args)} done ({time.perf_counter() - start:.0f} s)")
        else:
            futures = {self.pool.submit(_call, fn_name, *args): i for i, args in enumerate(calls)}
            results = [None] * len(calls)
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                log(f"  {label} {_describe(calls[i])} done ({time.perf_counter() - start:.0f} s)")
        log(f"{label}: {len(calls)} jobs in {time.perf_counter() - start:.0f} s")
        return results

    def close(self) -> None:
        import torch

        if self.pool is not None:
            self.pool.shutdown()
        torch.set_num_threads(self.threads_before)


def _describe(args: tuple) -> str:
    return " ".join(str(a) for a in args[2:])


def run(work: str | os.PathLike, seeds: list[int], settings: Any, *, jobs: int = 2, threads: int = 1,
        log: Callable[[str], None] = print) -> dict:
    """Run (or reuse) every stage for ``seeds`` under ``work``; return the raw results by seed and the timings."""
    import pipeline

    work = Path(work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    start, started, load = time.perf_counter(), time.time(), os.getloadavg()
    stages = {}
    runner = Runner(jobs, threads)
    try:
        clock = time.perf_counter()
        for seed in seeds:
            pipeline.prepare_data(work, settings, seed)
        pipeline.zero_base_fisher(work)
        stages["data"] = time.perf_counter() - clock
        clock = time.perf_counter()
        models = runner.map("fine-tune", "finetune_model",
                            [(work, settings, s, t) for s in seeds for t in settings.tasks], log)
        stages["fine-tune"] = time.perf_counter() - clock
        clock = time.perf_counter()
        stats = runner.map("statistics", "statistic",
                           [(work, settings, s, t, k) for s in seeds for k in STATISTICS for t in settings.tasks], log)
        stages["statistics"] = time.perf_counter() - clock
        clock = time.perf_counter()
        methods = settings.methods()
        order = sorted(methods, key=lambda m: (bool(methods[m].starts), -_cost(methods[m])))
        # A method that starts from other methods' chosen merges (MaTS, see Method.starts) runs after them
        first = [m for m in order if not methods[m].starts]
        merges = runner.map("merge", "merge_method", [(work, settings, s, m) for m in first for s in seeds], log)
        if len(first) < len(order):
            merges += runner.map("merge", "merge_method",
                                 [(work, settings, s, m) for m in order[len(first):] for s in seeds], log)
        stages["merge"] = time.perf_counter() - clock
    finally:
        runner.close()
    records = [p for seed in seeds for pattern in RECORDS for p in (work / f"seed{seed}").glob(pattern)]
    reused = sum(1 for p in records if p.stat().st_mtime < started)
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    tasks = list(settings.tasks)
    per_seed = {}
    for i, seed in enumerate(seeds):
        per_seed[seed] = {
            "models": dict(zip(tasks, models[i * len(tasks):(i + 1) * len(tasks)])),
            "statistics": {f"{t}.{k}": stats[(i * len(STATISTICS) + j) * len(tasks) + n]
                           for j, k in enumerate(STATISTICS) for n, t in enumerate(tasks)},
            "merges": {m: merges[k * len(seeds) + i] for k, m in enumerate(order)}}
    return {"settings": dataclasses.asdict(settings), "seeds": seeds, "results": per_seed,
            "methods": {m: dataclasses.asdict(v) for m, v in settings.methods().items()},
            "timing": {"wall_seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(cpu, 1),
                       "stages_wall_seconds": {k: round(v, 1) for k, v in stages.items()},
                       "jobs": jobs, "threads": threads, "records": len(records), "reused": reused},
            "machine": machine(load, os.getloadavg())}


def _cost(method: Any) -> int:
    """Candidates to score, Gram methods counted thrice (their solves and larger reads): a scheduling order."""
    size = 1
    for values in method.grid.values():
        size *= len(values)
    return size * (3 if method.stats == "gram" else 1)


def machine(load_start: tuple, load_end: tuple) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in load_end], "commit": _commit()}


def _commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "blockmerge", "benchmarks"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per field of pipeline.Settings (``--tasks``, ``--train``, ``--mats-init`` …), its default."""
    import pipeline

    defaults = pipeline.Settings()
    parser.add_argument("--tasks", nargs="+", default=list(defaults.tasks), choices=defaults.tasks)
    for field in dataclasses.fields(defaults):
        value = getattr(defaults, field.name)
        if field.name == "tasks":
            continue
        many = isinstance(value, tuple)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(value[0] if many else value),
                            nargs="+" if many else None, default=value, help=f"default: {value}")


def settings_from(args: argparse.Namespace) -> Any:
    """The pipeline.Settings of options added by :func:`settings_arguments`."""
    import pipeline

    return pipeline.Settings(**{f.name: tuple(getattr(args, f.name)) if isinstance(f.default, tuple)
                                else getattr(args, f.name) for f in dataclasses.fields(pipeline.Settings)})


def main(argv: list[str] | None = None) -> int:
    import report

    from blockmerge.errors import BlockmergeError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default="/tmp/blockmerge-realistic", help="where data, models, statistics go")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "realistic"),
                        help="path prefix of the .md, .json and .png written")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    settings_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = settings_from(args)
    try:
        raw = run(args.work, args.seeds, settings, jobs=args.jobs, threads=args.threads,
                  log=lambda line: print(line, flush=True))
    except BlockmergeError as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    command = "python benchmarks/realistic/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    paths = report.write(raw, args.results, command.strip())
    print(report.markdown_table(report.rows(raw)))
    print(f"wall {raw['timing']['wall_seconds']:.0f} s, CPU {raw['timing']['cpu_seconds']:.0f} s; wrote "
          + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
