"""The local executor against Dask (LocalCluster of 2 and 4 single-threaded worker processes) on one merge.

Each configuration runs in a fresh child process on the same generated family (a base and N fine-tunes,
float32 Llama-shaped `.safetensors` files from peak_memory.py), inputs' page cache dropped before each run.
Recorded: wall time of `blockmerge.merge`, the client's peak RSS, and each worker's peak RSS (VmHWM) next
to its RSS before the merge. Every Dask output is checked byte for byte against the local one. Also
measured: Dask's per-task overhead (no-op tasks through a 2-worker cluster) and the memory a Client and an
idle worker add. Writes benchmarks/results/dask_executor.md.

    python benchmarks/dask_executor.py --size 0.25 --models 4 --method task_arithmetic
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import peak_memory as pm

RESULT_PREFIX = "DASK-BENCH "
CONFIGS = [("local", 0), ("dask", 2), ("dask", 4)]
NOOP_TASKS = 2000


def vm(key: str) -> int:
    """A line of /proc/self/status in bytes (VmRSS, VmHWM); run on workers too, so it uses nothing else."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def tree_sha256(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if f != path else "").encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(16 * pm.MiB):
                h.update(chunk)
    return h.hexdigest()


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One merge in this (fresh) process: locally, or on a new LocalCluster of `workers` processes."""
    rss_bare = vm("VmRSS")
    result: dict[str, Any] = {}
    cluster = client = None
    if spec["workers"]:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=spec["workers"], threads_per_worker=1, processes=True,
                               dashboard_address=":0")
        client = Client(cluster, set_as_default=False)
        result["client_rss_added"] = vm("VmRSS") - rss_bare
        result["worker_idle_rss"] = list(client.run(vm, "VmRSS").values())
    import blockmerge
    from blockmerge.engine import memory

    if client:
        client.run(importlib.import_module, "blockmerge.engine.cluster")  # workers import torch before the clock
    options = {"executor": "dask", "scheduler": cluster.scheduler_address} if cluster else {}
    before = client.run(vm, "VmRSS") if client else {}
    result["client_before"] = vm("VmRSS")
    memory.return_freed_blocks_to_the_os()  # as the blockmerge command does, once per process
    t0 = time.perf_counter()
    summary = blockmerge.merge(spec["method"], spec["models"], base=spec["base"], out=spec["out"],
                               block_size=spec["block_size"], **spec["hyperparameters"], **options)
    result["seconds"] = time.perf_counter() - t0
    result["client_peak_rss"] = vm("VmHWM")
    result["blocks"] = summary.blocks
    result["bytes_read"] = summary.bytes_read
    if client:
        peaks = client.run(vm, "VmHWM")
        result["worker_rss"] = [{"before": before.get(a), "peak": peaks[a]} for a in sorted(peaks)]
        if spec["workers"] == 2:
            result["task_overhead_ms"] = task_overhead_ms(client)
        client.close()
        cluster.close()
    return result


def task_overhead_ms(client: Any) -> float:
    """Wall milliseconds per no-op task through the cluster (submitted at once, gathered)."""
    def noop(i: int) -> int:
        return i

    client.gather(client.map(noop, range(100), pure=False))  # warm
    t0 = time.perf_counter()
    client.gather(client.map(noop, range(NOOP_TASKS), pure=False))
    return (time.perf_counter() - t0) * 1000 / NOOP_TASKS


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def table(rows: list[dict[str, Any]], spec: dict[str, Any], machine: dict[str, Any], overhead: float,
          client_added: int, idle: list[int], model_bytes: int) -> str:
    mib = pm.MiB
    local = rows[0]["seconds"]
    lines = [
        f"# Local vs Dask executor: `{spec['method']}` of a base and {spec['models_n']} fine-tunes "
        f"× {model_bytes / mib:.0f} MiB (float32), {spec['block_size'] // mib} MiB blocks",
        "",
        f"Measured on a SHARED machine ({machine['nproc']} CPUs, other engineers' jobs running: load average "
        f"{os.getloadavg()[0]:.1f} at the end; timings are indicative): "
        f"{machine['cpu']}, {machine['ram_bytes'] / pm.GiB:.0f} GiB RAM, torch {machine['torch']}. "
        f"Command: `python benchmarks/dask_executor.py --size {spec['size']} --models {spec['models_n']} "
        f"--method {spec['method']}`. Each row is a fresh process; inputs' page cache "
        "dropped before it; Dask rows start a LocalCluster of single-threaded worker processes (its start-up is "
        "not in the time). Worker RSS: VmHWM of each worker process (before the merge → peak).",
        "",
        "| executor | workers | wall (s) | vs local | client RSS before → peak (MiB) "
        "| per-worker RSS before → peak (MiB) | worker peak − before (MiB) | output identical to local |",
        "| --- | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for r in rows:
        workers = r.get("worker_rss") or []
        spans = ", ".join(f"{w['before'] / mib:.0f} → {w['peak'] / mib:.0f}" for w in workers) or "—"
        deltas = ", ".join(f"{(w['peak'] - w['before']) / mib:.0f}" for w in workers) or "—"
        lines.append(f"| {r['executor']} | {r['workers'] or '—'} | {r['seconds']:.1f} | {r['seconds'] / local:.2f}× "
                     f"| {r['client_before'] / mib:.0f} → {r['client_peak_rss'] / mib:.0f} | {spans} | {deltas} "
                     f"| {r['identical']} |")
    lines += [
        "",
        f"Dask's per-task overhead (no-op tasks, 2 workers): {overhead:.2f} ms. A Client adds "
        f"{client_added / mib:.0f} MiB to its process (import of distributed + connection); an idle worker process "
        f"holds {sum(idle) / len(idle) / mib:.0f} MiB before blockmerge and torch are imported into it.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=0.25, help="GiB per checkpoint")
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--block-size", type=int, default=32 * pm.MiB)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/blockmerge-bench"))
    parser.add_argument("--results", type=Path, default=pm.DEFAULT_RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(RESULT_PREFIX + json.dumps(child(json.loads(args.child))), flush=True)
        return
    family = pm.family_for(args.size)
    base, models, _ = pm.ensure_family(args.workdir, family, args.models, regenerate=False)
    outs = args.workdir / "dask-executor-outputs"
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir(parents=True)
    spec: dict[str, Any] = {"method": args.method, "base": str(base), "models": [str(m) for m in models],
                            "block_size": args.block_size, "hyperparameters": {}, "size": args.size,
                            "models_n": args.models}
    rows, reference = [], None
    for executor, workers in CONFIGS:
        for path in [base, *models]:
            pm.drop_cache(path)
        out = outs / f"{executor}-{workers}"
        print(f"{executor} {workers or ''} ...", flush=True)
        row = {"executor": executor, "workers": workers,
               **run_child({**spec, "workers": workers, "out": str(out)})}
        digest = tree_sha256(out)
        reference = reference or digest
        row["identical"] = "yes" if digest == reference else "NO"
        print(f"  {row['seconds']:.1f} s, identical: {row['identical']}", flush=True)
        rows.append(row)
    two = next(r for r in rows if r["workers"] == 2)
    idle = [w for r in rows for w in r.get("worker_idle_rss", [])]
    text = table(rows, spec, pm.machine_description(), two["task_overhead_ms"], two["client_rss_added"], idle,
                 family.nbytes())
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "dask_executor.md").write_text(text)
    print(text)
    shutil.rmtree(outs, ignore_errors=True)


if __name__ == "__main__":
    main()
