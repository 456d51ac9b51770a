"""Statistic methods at scale: Fisher merging of a 7B-shape family, RegMean and MaTS where their Grams fit.

Merges two fine-tunes of `benchmarks/xl.py`'s family (same `--workdir`, the family reused when it is complete,
generated otherwise) with a statistic method, each run a fresh `python -m blockmerge merge` process under the
same hard memory limit as xl.py (`--limit`, 2 GiB, a cgroup by default) with the page cache dropped first, and
records what xl.py records: wall and CPU time, peak RSS, the cgroup's peak charge, bytes read and written, and
time ÷ the disk floor (the models' and statistics' files read once cold + the output written and fsynced).

The statistics are generated, not computed from data: a 7B model's Fisher needs its weights and gradients in
memory (> 24 GiB), and the merge's I/O and memory do not depend on the values. Each fine-tune gets a statistics
store written row block by row block in a child process under the same limit:

- `fisher` (Fisher merging): a diagonal Fisher of every tensor, (1e-2 · N(0, 1))², in `--fisher-dtype`
  (bfloat16 by default, the models' dtype: in float32 two fine-tunes' Fishers of the 7B shape take 54 GB);
- `gram_in` (RegMean, and MaTS with its `regmean` objective): the input Gram of every projection weight,
  AᵀA / 16 + I with A 16 random rows, float32. A Gram is [in, in], so it grows with hidden² (and MLP²): see
  `gram_bytes`, printed per shape.

MaTS runs its conjugate gradient on the RegMean system (`objective=regmean`) for at most `--mats-iterations` (10)
from its task-arithmetic start; the official default objective (K-FAC, `blockwise_fisher`) also needs output
Grams and two Gram products per task and iteration. The number of CG iterations depends on the statistics (a
Gram that is the identity plus rank 16 converges in few), so MaTS's time here is a per-iteration cost more than a
prediction for real Grams: the iterations per tensor (from the output's provenance) are reported.

    python benchmarks/xl_statistics.py --shape 7b --methods fisher
    python benchmarks/xl_statistics.py --shape 1b --methods regmean mats

Free disk needed (checked first): the family (unless it is there), the statistics of two fine-tunes and one
output. Statistics stores are kept next to the family with `--keep` and reused when complete; otherwise they
and the family are deleted at the end. Results: benchmarks/results/xl_statistics_{shape}.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import peak_memory as pm
import xl

MiB = xl.MiB
FISHER_SCALE = 1e-4
GRAM_RANK = 16
GRAM_RIDGE = 1.0
GEN_BLOCK_BYTES = 32 * MiB
STATISTICS_VERSION = 1
FINE_TUNES = ("ft1", "ft2")
KINDS = {"fisher": ("fisher",), "regmean": ("gram_in",), "mats": ("gram_in",)}
SETTINGS = {"fisher": [], "regmean": [], "mats": ["--set", "objective=regmean", "--set", "num_iterations={iterations}"]}
NEEDS_BASE = {"fisher": False, "regmean": False, "mats": True}  # MaTS starts from task arithmetic


def projections(geometry: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection weight of one Llama layer of this geometry."""
    h, m = geometry["hidden_size"], geometry["intermediate_size"]
    kv = h // geometry["num_attention_heads"] * geometry["num_key_value_heads"]
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (m, h),
            "up_proj": (m, h), "down_proj": (h, m)}


def gram_bytes(shape: str) -> dict[str, int]:
    """float32 bytes of one fine-tune's input Grams, and of its largest one, for a shape of xl.py."""
    geometry = xl.SHAPES[shape]
    sizes = [4 * n_in * n_in for _, n_in in projections(geometry).values()]
    return {"total": geometry["num_hidden_layers"] * sum(sizes), "largest": max(sizes)}


def statistic_specs(tensors: dict[str, list[int]], kinds: list[str], fisher_dtype: str) -> dict[tuple[str, str], Any]:
    from blockmerge.engine.tensors import TensorSpec

    out = {}
    for name, shape in tensors.items():
        if "fisher" in kinds:
            out[("fisher", name)] = TensorSpec(tuple(shape), fisher_dtype)
        if "gram_in" in kinds and name.endswith("_proj.weight"):
            out[("gram_in", name)] = TensorSpec((shape[1], shape[1]), "float32")
    return out


def statistics_metadata(shape: str, role: str, kinds: list[str], fisher_dtype: str) -> dict[str, Any]:
    return {"statistics": {"generator": "benchmarks/xl_statistics.py"},
            "xl-statistics": {"version": STATISTICS_VERSION, "shape": shape, "role": role, "kinds": kinds,
                              "fisher_dtype": fisher_dtype, "fisher_scale": FISHER_SCALE, "gram_rank": GRAM_RANK,
                              "gram_ridge": GRAM_RIDGE, "family": xl.identity(shape)}}


def statistics_complete(path: Path, metadata: dict[str, Any]) -> bool:
    from blockmerge.engine.store import is_store, read_manifest

    if not is_store(path):
        return False
    try:
        return read_manifest(path)[1] == metadata
    except Exception:
        return False


def generate_child(request_path: Path) -> None:
    """(child) One fine-tune's statistics store, row block by row block."""
    import torch

    from blockmerge.engine.store import StoreWriter, chunk_rows
    from blockmerge.engine.tensors import tensor_bytes, torch_dtype

    request = json.loads(request_path.read_text())
    specs = statistic_specs(request["tensors"], request["kinds"], request["fisher_dtype"])
    path = Path(request["out"])
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = StoreWriter(tmp, specs)
    checksums = {}
    for key in sorted(specs):
        kind, name = key
        spec = specs[key]
        gen = xl.seeded(f"{kind}:{name}", 0, request["role"])
        factor = (torch.randn(GRAM_RANK, spec.rows, generator=gen, dtype=torch.float64)
                  if kind == "gram_in" else None)
        chunk = chunk_rows(spec)
        step = chunk * max(1, GEN_BLOCK_BYTES // (chunk * spec.row_numel * 4))
        digest = hashlib.sha256()
        for start in range(0, spec.rows, step):
            stop = min(spec.rows, start + step)
            if factor is None:
                rows = torch.randn((stop - start, *spec.shape[1:]), generator=gen).square_().mul_(FISHER_SCALE)
            else:
                rows = (factor[:, start:stop].T @ factor / GRAM_RANK).float()
                rows[:, start:stop].diagonal().add_(GRAM_RIDGE)
            rows = rows.to(torch_dtype(spec.dtype)).contiguous()
            writer.write(kind, name, start, rows)
            digest.update(tensor_bytes(rows))
        checksums[key] = digest.hexdigest()
    writer.seal(checksums, request["metadata"])
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def ensure_statistics(args: argparse.Namespace, root: Path, kinds: list[str], kind: str) -> tuple[dict[str, Path],
                                                                                             list[dict[str, Any]]]:
    """Each fine-tune's statistics store of `kinds` under `root`, generated unless a complete one is there."""
    tensors = json.loads((root / "plan.json").read_text())["tensors"]
    stores, generated = {}, []
    for role in FINE_TUNES:
        path = root / f"stats-{'-'.join(kinds)}-{role}"
        metadata = statistics_metadata(args.shape, role, kinds, args.fisher_dtype)
        stores[role] = path
        if statistics_complete(path, metadata):
            print(f"statistics: reusing {path} ({xl.decimal(pm.directory_bytes(path))})", flush=True)
            continue
        request = root / f"stats-request-{role}.json"
        request.write_text(json.dumps({"tensors": tensors, "kinds": kinds, "fisher_dtype": args.fisher_dtype,
                                       "role": role, "out": str(path), "metadata": metadata}))
        run = xl.measured([sys.executable, __file__, "--generate", str(request)], kind, args.limit,
                          root / "stats-generate.log", env=xl.python_env(), cwd=xl.REPO)
        request.unlink()
        if run["outcome"] != "ok":
            raise SystemExit(f"generating {path}: {xl.describe_outcome(run)}\n{run['log_tail']}")
        (root / "stats-generate.log").unlink(missing_ok=True)
        size = pm.directory_bytes(path)
        generated.append({"role": role, "kinds": kinds, "bytes": size, "wall_s": run["wall_s"],
                          "cpu_s": run["cpu_s"], "maxrss_bytes": run["maxrss_bytes"]})
        print(f"statistics: wrote {path} ({xl.decimal(size)}) in {run['wall_s']:.1f} s, peak RSS "
              f"{run['maxrss_bytes'] / MiB:.0f} MiB", flush=True)
    return stores, generated


def needed_bytes(shape: str, kinds: list[str], fisher_dtype: str, model_bytes: int) -> int:
    per_model = 0
    if "fisher" in kinds:
        per_model += model_bytes // 2 * (2 if fisher_dtype != "float32" else 4)
    if "gram_in" in kinds:
        per_model += gram_bytes(shape)["total"]
    return len(FINE_TUNES) * per_model + model_bytes + xl.DISK_MARGIN


def family(args: argparse.Namespace, root: Path, kind: str) -> dict[str, Any]:
    """The family's stamp; its fine-tunes (and the base where a method needs it) must be there, else it is
    generated."""
    needed = [*FINE_TUNES, *(["base"] if any(NEEDS_BASE[m] for m in args.methods) else [])]
    try:
        stamp = json.loads((root / "family.json").read_text())
    except (OSError, ValueError):
        stamp = {}
    if stamp.get("identity") == xl.identity(args.shape) and all(
            (root / role / name).is_file() and (root / role / name).stat().st_size == size
            for role in needed for name, size in stamp["files"][role].items()):
        print(f"family: reusing {', '.join(needed)} of the {args.shape} family at {root}", flush=True)
        return stamp
    return xl.ensure_family(args, root, kind)[1]


def merge_argv(method: str, dirs: dict[str, Path], stores: dict[str, Path], out: Path, iterations: int) -> list[str]:
    argv = [sys.executable, "-m", "blockmerge", "merge", "--method", method, "-o", str(out), "--format", "hf",
            "--overwrite"]
    if NEEDS_BASE[method]:
        argv += ["--base", str(dirs["base"])]
    for i, role in enumerate(FINE_TUNES):
        argv += ["--model", str(dirs[role]), "--stats", f"{i}={stores[role]}"]
    return argv + [a.format(iterations=iterations) for a in SETTINGS[method]]


def store_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def solver_iterations(out: Path) -> dict[str, int] | None:
    """Fewest, median and most CG iterations per tensor that the output's provenance reports (MaTS), else None."""
    try:
        reports = json.loads((out / "blockmerge-provenance.json").read_text())["reports"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    counts = sorted(r["iterations"] for tensor in reports.values() for r in tensor if "iterations" in r)
    return {"min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1]} if counts else None


def run_method(method: str, args: argparse.Namespace, root: Path, kind: str, model_bytes: int) -> dict[str, Any]:
    kinds = list(KINDS[method])
    stores, generated = ensure_statistics(args, root, kinds, kind)
    dirs = xl.family_dirs(root)
    inputs = [p for role in (["base"] if NEEDS_BASE[method] else []) + list(FINE_TUNES)
              for p in xl.weight_files(dirs[role])]
    inputs += [p for role in FINE_TUNES for p in store_files(stores[role])]
    runs = root.parent / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    print(f"disk floor: {method}'s inputs, {xl.decimal(sum(p.stat().st_size for p in inputs))} read cold + "
          f"{xl.decimal(model_bytes)} written and fsynced ...", flush=True)
    floor = xl.disk_floor(inputs, model_bytes, runs, warm=False)
    out = runs / f"blockmerge-{method}"
    shutil.rmtree(out, ignore_errors=True)
    xl.clear_cache(inputs)
    argv = merge_argv(method, dirs, stores, out, args.mats_iterations)
    log = runs / f"{method}.log"
    r = xl.Launch(argv, kind, args.limit, log, env=xl.python_env(), cwd=xl.REPO).finish(args.run_timeout or None)
    text = log.read_text()
    files = xl.output_files(out)
    row = {"method": method, "kinds": kinds, "command": " ".join(argv[1:]), **r, **xl.blockmerge_figures(text),
           "floor": floor, "statistics_bytes": sum(pm.directory_bytes(stores[role]) for role in FINE_TUNES),
           "statistics_generated": generated, "input_bytes": sum(p.stat().st_size for p in inputs),
           "output_bytes": sum(files.values()),
           "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    row["floor_ratio"] = r["wall_s"] / floor["cold_s"] if r["outcome"] == "ok" else None
    row["iterations"] = solver_iterations(out)
    shutil.rmtree(out, ignore_errors=True)
    log.unlink(missing_ok=True)
    print(f"  blockmerge {method:8s} limit {xl.size_label(args.limit)}: {xl.describe_outcome(r)}  wall "
          f"{r['wall_s']:.1f} s  CPU {r['cpu_s']:.1f} s  peak RSS {(r['maxrss_bytes'] or 0) / MiB:.0f} MiB  "
          f"floor {floor['cold_s']:.1f} s", flush=True)
    if r["outcome"] != "ok":
        print(r["log_tail"], flush=True)
    return row


def markdown(result: dict[str, Any]) -> str:
    mib, gb = xl.mib, xl.gb
    notes: list[str] = []
    lines = [f"# Statistic methods on the {result['shape']} shape ({xl.SHAPE_NAMES[result['shape']]})", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {result['machine'].get('cpu', '?')}, {result['machine'].get('nproc', '?')} cores, "
             f"{result['machine'].get('ram_bytes', 0) / xl.GiB:.0f} GiB RAM. "
             f"Limit: {xl.size_label(result['limit_bytes'])} ({result['limit_kind']}), page cache dropped before "
             "every run. Two fine-tunes merged; statistics generated (see the script's docstring).", "",
             "| method | statistics read | inputs read | outcome | wall s | CPU s | peak RSS MiB | cgroup peak MiB "
             "| disk floor s | time ÷ floor |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        lines.append(f"| {r['method']} ({', '.join(r['kinds'])}) | {gb(r['statistics_bytes'])} GB | "
                     f"{gb(r['input_bytes'])} GB | {xl.describe_outcome(r)} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{mib(r['maxrss_bytes'])} | {mib(r['cgroup_peak_bytes'])} | {r['floor']['cold_s']:.1f} | "
                     f"{xl.fmt(r['floor_ratio'], '.2f')} |")
        if r.get("iterations"):
            notes.append(f"{r['method']}: CG iterations per tensor {r['iterations']['min']}-{r['iterations']['max']} "
                         f"(median {r['iterations']['median']}, at most {result['mats_iterations']}).")
    lines += ["", *notes, "", "Input Grams (float32) of one fine-tune per shape: they grow with hidden² and MLP².", "",
              "| shape | all input Grams | largest |", "| --- | --- | --- |"]
    for shape in xl.SHAPES:
        g = gram_bytes(shape)
        lines.append(f"| {shape} | {gb(g['total'])} GB | {g['largest'] / MiB:.0f} MiB |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b", choices=list(xl.SHAPES))
    parser.add_argument("--methods", nargs="+", default=["fisher"], choices=list(KINDS))
    parser.add_argument("--limit", type=xl.parse_size, default=xl.parse_size("2GiB"),
                        help="memory limit of every process (default 2GiB)")
    parser.add_argument("--generate-limit", type=xl.parse_size, default=xl.parse_size("2GiB"),
                        help="memory limit of the process generating the family, if it is generated")
    parser.add_argument("--limit-kind", choices=["cgroup", "prlimit"])
    parser.add_argument("--fisher-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--mats-iterations", type=int, default=10, help="MaTS's CG iterations at most (default 10)")
    parser.add_argument("--run-timeout", type=float, default=6 * 3600, help="seconds before a merge is stopped")
    parser.add_argument("--keep", action="store_true", help="keep the family and the statistics stores")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/blockmerge-xl"))
    parser.add_argument("--results", type=Path, default=xl.DEFAULT_RESULTS)
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.generate:
        return generate_child(args.generate)
    pm.compile_blockmerge()
    kind = args.limit_kind or ("cgroup" if xl.CGROUPS.usable() else "prlimit")
    for shape in xl.SHAPES:
        g = gram_bytes(shape)
        print(f"{shape}: input Grams {xl.decimal(g['total'])} per fine-tune, largest {g['largest'] / MiB:.0f} MiB",
              flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    root = args.workdir / f"family-{args.shape}"
    stamp = family(args, root, kind)
    kinds = sorted({k for m in args.methods for k in KINDS[m]})
    need = needed_bytes(args.shape, kinds, args.fisher_dtype, stamp["model_bytes"])
    free = shutil.disk_usage(args.workdir).free + sum(
        pm.directory_bytes(p) for p in root.glob("stats-*") if p.is_dir())
    print(f"statistics ({', '.join(kinds)}) of two fine-tunes + one output: {xl.decimal(need)} needed, "
          f"{xl.decimal(free)} free", flush=True)
    if free < need:
        raise SystemExit(f"not enough free disk under {args.workdir}: {xl.decimal(need)} needed, "
                         f"{xl.decimal(free)} free")
    result: dict[str, Any] = {"machine": xl.machine(), "command": " ".join(["python", *sys.argv]),
                              "shape": args.shape, "limit_kind": kind, "limit_bytes": args.limit,
                              "fisher_dtype": args.fisher_dtype, "mats_iterations": args.mats_iterations,
                              "blockmerge": xl.blockmerge_tree(), "gram_bytes": {s: gram_bytes(s) for s in xl.SHAPES},
                              "family": {k: v for k, v in stamp.items() if k != "files"}, "runs": []}
    try:
        for method in args.methods:
            result["runs"].append(run_method(method, args, root, kind, stamp["model_bytes"]))
    finally:
        shutil.rmtree(args.workdir / "runs", ignore_errors=True)
        if not args.keep:
            for p in root.glob("stats-*"):
                shutil.rmtree(p, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
            print(f"removed {root} and its statistics (--keep keeps them)", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    name = f"xl_statistics_{args.shape}"
    (args.results / f"{name}.json").write_text(json.dumps(result, indent=1))
    report = markdown(result)
    (args.results / f"{name}.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
