"""blockmerge against mergekit and against the disk: the same mergekit YAML through both tools, every method.

Builds a base and three fine-tunes (base + N(0, 2e-3²) deltas) of a Llama config in bfloat16, as
sharded Hugging Face directories (`--scale 1`: hidden 1024, 8 layers, 16 heads / 8 KV heads, MLP
4096, vocab 32000, untied head, ~191M parameters; `--scale 4`: hidden 2048, 10 layers, MLP 8192,
~4x the parameters). For each of mergekit 0.1.5's 20 merge methods it writes one mergekit
configuration (`MERGES`; every one computes in float32, `dtype: float32`, and writes bfloat16,
`out_dtype: bfloat16`) and runs that same file through both tools, each run a fresh process:
`python -m blockmerge mergekit-yaml CFG OUT --no-copy-tokenizer --overwrite` and mergekit's own
`mergekit-yaml CFG OUT --no-copy-tokenizer --lazy-unpickle` (from its virtual environment), alternately,
A B A B. Before each blockmerge run it measures the disk's floor for that configuration (the model files
the configuration reads, read once, and the output's bytes written and fsynced, page cache cold and
warm), as the disk's speed drifts. It records wall time, peak RSS (`/usr/bin/time`'s maximum resident
set, and a 10 ms sampling of RssAnon/RssFile), bytes read and written; blockmerge's own figures (merge
time without interpreter start-up, anonymous/file-backed peaks, bytes) come from the summary table it
prints. Every method's two bfloat16 outputs are then compared element by element (DARE and DELLA draw
their masks from different generators in the two tools, so theirs are not expected to agree).
Results: benchmarks/results/mergekit_compare.{md,json,png}, with the targets per method (warm page
cache): where both tools ran, blockmerge at least 2x faster than mergekit (wall time) and at most 0.3 of
its peak RSS; blockmerge's peak RSS within 20% between scale 1 and scale 4.

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5
    python benchmarks/mergekit_compare.py --scales 1 4 --repeats 3 --mergekit /tmp/mkvenv/bin/mergekit-yaml \
        --mergekit-scales 1

`--methods` picks some of the 20 (mergekit's names); `--mergekit-scales 1` skips mergekit at scale 4
(one TIES run of mergekit there takes minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mergekit_parity as mp
import peak_memory as pm

MiB = 1024**2
GB = 1e9
INIT_STD = 0.02
DELTA_STD = 2e-3
NUM_MODELS = 3
SHARD_BYTES = 200 * 10**6
IO_CHUNK = 16 * MiB
MAXRSS_PREFIX = "BENCH-MAXRSS "
FAMILY_VERSION = 2
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
TOOLS = ("blockmerge", "mergekit")

FINE_TUNES = tuple(f"{{m{t}}}" for t in range(NUM_MODELS))
PARITY = {case.label: case.config for case in mp.CASES}


def fine_tunes(**parameters: Any) -> list[dict[str, Any]]:
    """The three fine-tunes as mergekit's `models`, each with these parameters."""
    return [mp.model(m, **parameters) for m in FINE_TUNES]


def configuration(method: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"merge_method": method, **{k: v for k, v in config.items() if k != "merge_method"}}


# mergekit method -> its configuration, with {base}, {m0}.. for the family's directories (written with dtype: float32
# and out_dtype: bfloat16). The first four as this benchmark always ran them; the others as mergekit_parity.py does,
# but slerp (between the base and m0, mergekit's example t by filter and layer) and passthrough (one model, not slices).
MERGES: dict[str, dict[str, Any]] = {method: configuration(method, config) for method, config in {
    "linear": {"models": fine_tunes(weight=1.0), "parameters": {"normalize": True}},
    "task_arithmetic": {"base_model": "{base}", "models": fine_tunes(weight=1.0), "parameters": {"normalize": False}},
    "ties": {"base_model": "{base}", "models": fine_tunes(weight=1.0, density=0.2), "parameters": {"normalize": True}},
    "dare_linear": {"base_model": "{base}", "models": fine_tunes(weight=1.0, density=0.1),
                    "parameters": {"normalize": False}},
    **{m: PARITY[m] for m in ("dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce",
                              "model_stock", "nearswap")},
    "slerp": {"base_model": "{base}", "models": [mp.model("{base}"), mp.model("{m0}")],
              "parameters": {"t": mp.ATTN_MLP}},
    "nuslerp": PARITY["nuslerp of task vectors"],
    **{m: PARITY[m] for m in ("multislerp", "karcher", "arcee_fusion")},
    "passthrough": {"models": [mp.model("{m0}")]},
    **{m: PARITY[m] for m in ("ram", "ramplus_tl")},
}.items()}
RANDOM_METHODS = {case.config["merge_method"] for case in mp.CASES if case.random}  # masks differ between the tools
SCALES = {1: dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=4096),
          4: dict(hidden_size=2048, num_hidden_layers=10, intermediate_size=8192)}


# --------------------------------------------------------------------------------------------- machine


def machine_description() -> dict[str, Any]:
    """CPU, cores, RAM, kernel, library versions and blockmerge commit of this machine, and its load now."""
    return {**pm.machine_description(), "load_average_at_start": os.getloadavg()}


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# --------------------------------------------------------------------------------------------- model family


def llama_config(scale: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                       tie_word_embeddings=False, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"],
                       **SCALES[scale])


def build_family(root: Path, scale: int) -> dict[str, Path]:
    """base/ and m0..m2/ (Hugging Face directories, sharded bfloat16 safetensors); reused when complete."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    stamp = root / "family.json"
    config = llama_config(scale)
    identity = {"version": FAMILY_VERSION, "scale": scale, "init_std": INIT_STD, "delta_std": DELTA_STD,
                "models": NUM_MODELS, "shard_bytes": SHARD_BYTES}
    dirs = {"base": root / "base", **{f"m{t}": root / f"m{t}" for t in range(NUM_MODELS)}}
    if stamp.is_file() and json.loads(stamp.read_text()) == identity:
        return dirs
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(scale)
    shards: list[dict[str, list[torch.Tensor]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        base = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=generator) * INIT_STD
        tensors = [base.to(torch.bfloat16)]
        for _ in range(NUM_MODELS):
            tensors.append((base + torch.randn(shape, generator=generator) * DELTA_STD).to(torch.bfloat16))
        nbytes = tensors[0].numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors
        size += nbytes
    for i, d in enumerate(dirs.values()):
        d.mkdir()
        config.save_pretrained(d)
        weight_map = {}
        for s, shard in enumerate(shards):
            file = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: ts[i] for n, ts in shard.items()}, d / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(ts[i].numel() * 2 for shard in shards for ts in shard.values())
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    stamp.write_text(json.dumps(identity))
    return dirs


def weight_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def parameter_count(d: Path) -> int:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    return index["metadata"]["total_size"] // 2


# --------------------------------------------------------------------------------------------- disk floor


def read_files(paths: list[Path]) -> tuple[int, float]:
    """Bytes read sequentially and seconds taken."""
    buffer = bytearray(IO_CHUNK)
    view = memoryview(buffer)
    total, start = 0, time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            while n := os.readv(fd, [view]):
                total += n
        finally:
            os.close(fd)
    return total, time.perf_counter() - start


def write_file(path: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` (non-zero data) and fsync them."""
    chunk = os.urandom(IO_CHUNK)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < nbytes:
            done += os.write(fd, chunk[:min(IO_CHUNK, nbytes - done)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def disk_floor(inputs: list[Path], out_bytes: int, scratch: Path, cold: bool) -> dict[str, float]:
    """Seconds to read `inputs` once and to write + fsync `out_bytes`, warm and (caches dropped) cold."""
    read_files(inputs)
    floor = {"read_warm_s": read_files(inputs)[1], "write_s": write_file(scratch / "floor-write.bin", out_bytes)}
    floor["warm_s"] = floor["read_warm_s"] + floor["write_s"]
    if cold:
        drop_caches()
        floor["read_cold_s"] = read_files(inputs)[1]
        floor["cold_s"] = floor["read_cold_s"] + floor["write_s"]
    return floor


def median_floors(runs: list[Run]) -> dict[str, dict[str, dict[str, float]]]:
    """Per scale and method, the median of each figure of the floors taken beside its runs."""
    floors: dict[str, dict[str, dict[str, float]]] = {}
    for scale, method in sorted({(r.scale, r.method) for r in runs if r.floor}):
        taken = [r.floor for r in runs if r.floor and (r.scale, r.method) == (scale, method)]
        floors.setdefault(str(scale), {})[method] = {
            key: statistics.median(f[key] for f in taken) for key in taken[0]} | {"measurements": len(taken)}
    return floors


# --------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    tool: str
    method: str
    scale: int
    cache: str
    wall_s: float
    maxrss_bytes: int
    sampled_anon_bytes: int
    sampled_file_bytes: int
    returncode: int
    merge_s: float | None = None  # blockmerge's own time (no interpreter start-up)
    anon_bytes: int | None = None  # blockmerge's own peaks, sampled after each block
    file_bytes: int | None = None
    read_bytes: int | None = None
    written_bytes: int | None = None
    floor: dict[str, float] | None = None  # the disk floor measured just before this run (blockmerge runs)


def sample_rss(pid: int, peaks: dict[str, int], stop: threading.Event) -> None:
    """Peaks of RssAnon/RssFile of the child of `pid` (the merge under /usr/bin/time), every 10 ms."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    while not stop.is_set():
        try:
            child = children.read_text().split()
            if not child:
                stop.wait(0.01)
                continue
            for line in Path(f"/proc/{child[0]}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)
        except (OSError, ValueError):
            pass
        stop.wait(0.01)


def run_child(argv: list[str]) -> tuple[float, int, dict[str, int], int, str]:
    """Wall seconds, peak RSS (bytes), sampled RSS peaks, exit status and stderr+stdout of a fresh process.

    The peak is the maximum resident set `/usr/bin/time` reports: the ru_maxrss this process would
    see from wait4 also counts its own pages, which a forked child holds until it calls exec.
    """
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"mergekit-compare-{os.getpid()}.log"
    with open(log, "w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-f", f"{MAXRSS_PREFIX}%M", *argv], stdout=out,
                                stderr=subprocess.STDOUT)
        peaks: dict[str, int] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, peaks, stop), daemon=True)
        sampler.start()
        _, status = os.waitpid(proc.pid, 0)
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    log.unlink()
    maxrss = [int(line[len(MAXRSS_PREFIX):]) * 1024 for line in text.splitlines() if line.startswith(MAXRSS_PREFIX)]
    return wall, maxrss[-1] if maxrss else 0, peaks, proc.returncode, text


def parse_blockmerge_table(text: str) -> dict[str, float]:
    """The row of the summary table `blockmerge mergekit-yaml` prints, as `blockmerge merge` does (time, anon/file
    MiB, read/written MiB)."""
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) >= 7 and "/" in cells[3] and re.fullmatch(r"[0-9.]+", cells[1]):
            anon, file = (float(x) for x in cells[3].split("/"))
            return {"merge_s": float(cells[1]), "anon": anon * MiB, "file": file * MiB,
                    "read": float(cells[5]) * MiB, "written": float(cells[6]) * MiB}
    raise RuntimeError(f"no summary table in blockmerge's output:\n{text[-2000:]}")


def roles(config: dict[str, Any]) -> list[str]:
    """The family's members a configuration reads (base_model, the models listed, the slices' sources), base first."""
    names = [config.get("base_model"), *(m["model"] for m in config.get("models", [])),
             *(src["model"] for piece in config.get("slices", []) for src in piece["sources"])]
    return list(dict.fromkeys(n.strip("{}") for n in names if n))


def config_inputs(method: str, dirs: dict[str, Path]) -> list[Path]:
    """The weight files the method's configuration reads."""
    return [p for role in roles(MERGES[method]) for p in weight_files(dirs[role])]


def write_config(method: str, dirs: dict[str, Path], path: Path) -> Path:
    """The method's mergekit YAML with the family's directories, float32 arithmetic and bfloat16 output."""
    return mp.write_config(mp.Case(method, MERGES[method]), dirs, "bfloat16", path)


def describe_config(config: dict[str, Any]) -> str:
    """One line: base model, the models with their parameters, the configuration's parameters."""
    def plain(value: Any) -> str:
        return json.dumps(value, separators=(", ", ": ")).replace('"', "")

    parts = [f"base_model {config['base_model'].strip('{}')}"] if "base_model" in config else []
    parts.append("models " + ", ".join(m["model"].strip("{}") + (f" {plain(m['parameters'])}" if m.get("parameters")
                                                                 else "") for m in config.get("models", [])))
    if config.get("parameters"):
        parts.append(f"parameters {plain(config['parameters'])}")
    return "; ".join(parts)


def tool_argv(tool: str, cfg: Path, out: Path, mergekit: str | None) -> list[str]:
    if tool == "blockmerge":
        return [sys.executable, "-m", "blockmerge", "mergekit-yaml", str(cfg), str(out), "--no-copy-tokenizer",
                "--overwrite"]
    return [str(mergekit), str(cfg), str(out), "--no-copy-tokenizer", "--lazy-unpickle"]


def one_run(tool: str, method: str, scale: int, cfg: Path, inputs: list[Path], out: Path, cache: str,
            mergekit: str | None) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    if cache == "cold":
        drop_caches()
    else:
        read_files(inputs)
    wall, maxrss, peaks, rc, text = run_child(tool_argv(tool, cfg, out, mergekit))
    if rc != 0:
        raise SystemExit(f"{tool} {method} failed ({rc}):\n{text[-3000:]}")
    run = Run(tool, method, scale, cache, wall, maxrss, peaks.get("RssAnon", 0), peaks.get("RssFile", 0), rc)
    if tool == "blockmerge":
        own = parse_blockmerge_table(text)
        run.merge_s, run.anon_bytes, run.file_bytes = own["merge_s"], int(own["anon"]), int(own["file"])
        run.read_bytes, run.written_bytes = int(own["read"]), int(own["written"])
    else:
        run.read_bytes = sum(p.stat().st_size for p in inputs)
        run.written_bytes = sum(p.stat().st_size for p in weight_files(out))
    print(f"  {tool:10s} {method:16s} {cache:4s} wall {wall:6.2f} s  maxrss {maxrss / MiB:6.0f} MiB"
          + (f"  merge {run.merge_s:.2f} s" if run.merge_s is not None else ""), flush=True)
    return run


def load_output(d: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for p in weight_files(d):
        tensors.update(load_file(p))
    return tensors


def agreement(a: Path, b: Path) -> dict[str, float]:
    """Max |a - b| over every tensor, and the fraction of bfloat16 elements that differ."""
    ta, tb = load_output(a), load_output(b)
    if set(ta) != set(tb):
        return {"max_abs_diff": float("nan"), "differing_fraction": float("nan"), "names_differ": True}
    worst, differing, total = 0.0, 0, 0
    for name in ta:
        x, y = ta[name].float(), tb[name].float()
        worst = max(worst, float((x - y).abs().max()))
        differing += int((ta[name] != tb[name]).sum())
        total += ta[name].numel()
    return {"max_abs_diff": worst, "differing_fraction": differing / total}


# --------------------------------------------------------------------------------------------- report


def median(runs: list[Run], attr: str) -> float | None:
    values = [getattr(r, attr) for r in runs if getattr(r, attr) is not None]
    return statistics.median(values) if values else None


def paired_ratio(group: list[Run], attr: str, floor_key: str) -> float | None:
    """Median over the runs of the run's figure ÷ the floor taken beside it."""
    ratios = [getattr(r, attr) / r.floor[floor_key] for r in group
              if r.floor and floor_key in r.floor and getattr(r, attr) is not None]
    return statistics.median(ratios) if ratios else None


def summarise(runs: list[Run], floors: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(r.scale, r.cache, r.method) for r in runs}, key=lambda k: (k[0], k[1], list(MERGES).index(k[2])))
    for scale, cache, method in keys:
        floor = floors.get(str(scale), {}).get(method, {}).get(f"{cache}_s")
        mk = [r for r in runs if (r.scale, r.cache, r.method, r.tool) == (scale, cache, method, "mergekit")]
        for tool in TOOLS:
            group = [r for r in runs if (r.scale, r.cache, r.method, r.tool) == (scale, cache, method, tool)]
            if not group:
                continue
            wall = median(group, "wall_s")
            row = {"scale": scale, "cache": cache, "method": method, "tool": tool, "runs": len(group),
                   "wall_s": wall, "walls": [r.wall_s for r in group], "merge_s": median(group, "merge_s"),
                   "maxrss_bytes": median(group, "maxrss_bytes"),
                   "anon_bytes": median(group, "anon_bytes") or median(group, "sampled_anon_bytes"),
                   "file_bytes": median(group, "file_bytes") or median(group, "sampled_file_bytes"),
                   "sampled_anon_bytes": median(group, "sampled_anon_bytes"),
                   "sampled_file_bytes": median(group, "sampled_file_bytes"),
                   "read_bytes": median(group, "read_bytes"), "written_bytes": median(group, "written_bytes"),
                   "floor_s": floor, "disk_floor_s": floors.get(str(scale), {}).get(method, {}).get("cold_s")}
            row["wall_over_floor"] = paired_ratio(group, "wall_s", f"{cache}_s")
            row["merge_over_floor"] = paired_ratio(group, "merge_s", f"{cache}_s")
            row["merge_over_disk_floor"] = paired_ratio(group, "merge_s", "cold_s")
            if tool == "blockmerge" and mk:
                row["time_vs_mergekit"] = wall / median(mk, "wall_s")
                row["rss_vs_mergekit"] = row["maxrss_bytes"] / median(mk, "maxrss_bytes")
            rows.append(row)
    return rows


def fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def gb(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / GB


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# blockmerge vs mergekit: the same mergekit configurations", "",
        f"Machine: {m['cpu']}, {m['nproc']} cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}, torch {m['torch']}, blockmerge {m['blockmerge_commit']}, mergekit "
        f"{result.get('mergekit_version') or 'not run'}; load average at start {m['load_average_at_start']}.", "",
        f"Command: `{result['command']}`", "",
        "Family: a Llama config (bfloat16, untied head), a base and 3 fine-tunes = base + N(0, 2e-3²), sharded "
        "Hugging Face directories. " + "; ".join(
            f"scale {s}: {v['parameters'] / 1e6:.0f}M params, {v['inputs_bytes'] / GB:.2f} GB of inputs with base"
            for s, v in result["families"].items()) + ".", "",
        "Each method's mergekit configuration, one YAML file run by both tools (`python -m blockmerge mergekit-yaml "
        "CFG OUT --no-copy-tokenizer --overwrite`; mergekit's `mergekit-yaml CFG OUT --no-copy-tokenizer "
        "--lazy-unpickle`), every one with `dtype: float32` and `out_dtype: bfloat16`:", "",
        "| method | configuration |", "| --- | --- |",
        *(f"| {method} | {describe_config(config)} |" for method, config in result["configs"].items()), "",
        "Each cell is the median of the runs; each run is a fresh process, tools alternated A B A B. *wall*: the "
        "whole process, interpreter and torch start-up included; *merge*: blockmerge's own time (its summary). "
        "Peak RSS: the maximum resident set size `/usr/bin/time` reports; anon / file: blockmerge's summary "
        "(sampled after each block) and, for mergekit, a 10 ms sampling of RssAnon / RssFile (mergekit maps its "
        "inputs, so their page cache counts as its file-backed RSS). *read GB*: the bytes blockmerge's summary "
        "counts (every pass counts its reads), for mergekit the size of the files its configuration reads.", "",
        "Disk floor = the files the configuration reads, read once, + its output's bytes written and fsynced, "
        "measured on this machine just before each blockmerge run. *merge ÷ floor*: against the floor of the row's "
        "own cache state; *merge ÷ disk floor*: against the disk's floor (inputs read cold), the time a merge bound "
        "by the disk would take; each the median over the runs of the run's time ÷ the floor taken just before it.",
        "",
        "| scale | cache | method | tool | wall s | merge s | peak RSS MiB | anon / file MiB | read GB | written GB "
        "| wall ÷ floor | merge ÷ floor | merge ÷ disk floor | time ÷ mergekit | RSS ÷ mergekit |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['scale']} | {r['cache']} | {r['method']} | {r['tool']} | {fmt(r['wall_s'], '.2f')} "
            f"| {fmt(r['merge_s'], '.2f')} | {r['maxrss_bytes'] / MiB:.0f} "
            f"| {r['anon_bytes'] / MiB:.0f} / {r['file_bytes'] / MiB:.0f} | {fmt(gb(r['read_bytes']), '.2f')} "
            f"| {fmt(gb(r['written_bytes']), '.2f')} | {fmt(r['wall_over_floor'], '.1f')} "
            f"| {fmt(r['merge_over_floor'], '.2f')} | {fmt(r.get('merge_over_disk_floor'), '.2f')} "
            f"| {fmt(r.get('time_vs_mergekit'), '.2f')} "
            f"| {fmt(r.get('rss_vs_mergekit'), '.2f')} |")
    lines += ["", "Disk floors (medians of those measured beside the runs):", "",
              "| scale | method | inputs read warm s | written + fsync s | floor warm s | floor cold s | measured |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for scale, per in result["floors"].items():
        for method, fl in per.items():
            lines.append(f"| {scale} | {method} | {fl['read_warm_s']:.2f} | {fl['write_s']:.2f} | {fl['warm_s']:.2f} "
                         f"| {fmt(fl.get('cold_s'), '.2f')} | {fl['measurements']:.0f} |")
    if result["agreement"]:
        lines += ["", "Agreement of the two tools' outputs (bfloat16, every tensor; DARE and DELLA draw their masks "
                  "from different generators, so their outputs are not expected to agree):", "",
                  "| scale | method | max abs difference | elements that differ |", "| ---: | --- | ---: | ---: |"]
        for key, a in result["agreement"].items():
            scale, method = key.split()[1:]
            note = " (random masks)" if method in RANDOM_METHODS else ""
            lines.append(f"| {scale} | {method}{note} | {a['max_abs_diff']:.3g} | "
                         f"{100 * a['differing_fraction']:.4f} % |")
    if result["targets"]:
        lines += ["", "Targets:", ""] + [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in result["targets"]]
    lines += ["", "Plot: `mergekit_compare.png`.", ""]
    return "\n".join(lines)


SPEEDUP_TARGET = 2.0  # blockmerge's wall time at most half mergekit's
RSS_TARGET = 0.3  # blockmerge's peak RSS at most this fraction of mergekit's
FLAT_TARGET = 0.2  # blockmerge's peak RSS between the smallest and largest scale, relative change


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """Per method (warm page cache): blockmerge >= 2x faster than mergekit and <= 0.3 of its peak RSS where both
    ran; blockmerge's peak RSS within 20% between the smallest and the largest scale."""
    out = []
    bm = [r for r in rows if r["tool"] == "blockmerge" and r["cache"] == "warm"]
    for r in bm:
        tag = f"scale {r['scale']} {r['method']}"
        if r.get("time_vs_mergekit") is not None:
            out.append((f"{tag}: {1 / r['time_vs_mergekit']:.1f}x faster than mergekit (>= {SPEEDUP_TARGET:g})",
                        1 / r["time_vs_mergekit"] >= SPEEDUP_TARGET))
            out.append((f"{tag}: peak RSS {r['rss_vs_mergekit']:.2f} of mergekit's (<= {RSS_TARGET:g})",
                        r["rss_vs_mergekit"] <= RSS_TARGET))
    scales = sorted({r["scale"] for r in bm})
    if len(scales) > 1:
        for method in MERGES:
            small = [r for r in bm if r["method"] == method and r["scale"] == scales[0]]
            large = [r for r in bm if r["method"] == method and r["scale"] == scales[-1]]
            if small and large:
                ratio = large[0]["maxrss_bytes"] / small[0]["maxrss_bytes"]
                out.append((f"{method}: peak RSS at scale {scales[-1]} is {ratio:.2f}x that at scale {scales[0]} "
                            f"(within {FLAT_TARGET:.0%})", abs(ratio - 1) <= FLAT_TARGET))
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars, one pair per (scale, method): wall time (log scale, with the warm floor) and peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rows = [r for r in result["rows"] if r["cache"] == "warm"] or result["rows"]
    labels = sorted({(r["scale"], r["method"]) for r in rows}, key=lambda k: (k[0], list(MERGES).index(k[1])))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 1.6 + 0.34 * len(labels)), sharey=True)
    height = 0.4
    for i, tool in enumerate(TOOLS):
        ys, walls, rss = [], [], []
        for j, key in enumerate(labels):
            r = next((r for r in rows if (r["scale"], r["method"], r["tool"]) == (*key, tool)), None)
            if r:
                ys.append(j + (i - 0.5) * height)
                walls.append(r["wall_s"])
                rss.append(r["maxrss_bytes"] / MiB)
        for ax, values, spec in ((ax_t, walls, "%.1f"), (ax_m, rss, "%.0f")):
            ax.bar_label(ax.barh(ys, values, height, label=tool), fmt=spec, fontsize=6, padding=2)
    floors = [(result["floors"][str(s)][m]["warm_s"], j) for j, (s, m) in enumerate(labels)
              if m in result["floors"].get(str(s), {})]
    if floors:
        ax_t.scatter(*zip(*floors), marker="|", s=120, color="black", zorder=3, label="I/O floor (warm)")
    ax_t.set_yticks(range(len(labels)), [f"{m} x{s}" for s, m in labels], fontsize=8)
    ax_t.set_ylim(len(labels) - 0.4, -0.6)  # first method on top
    ax_t.set_xscale("log")
    ax_t.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax_t.xaxis.set_minor_formatter(ticker.NullFormatter())
    for ax, title in ((ax_t, "wall time, fresh process (s, median, log scale)"), (ax_m, "peak RSS (MiB, median)")):
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.08)
    fig.legend(*ax_t.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"blockmerge vs mergekit, same mergekit YAML, warm page cache ({result['machine']['nproc']} cores)")
    fig.tight_layout(rect=(0, 0.45 / (1.6 + 0.34 * len(labels)), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1], choices=sorted(SCALES))
    parser.add_argument("--methods", nargs="+", default=list(MERGES), choices=list(MERGES), metavar="METHOD",
                        help=f"mergekit methods to run (default: all): {', '.join(MERGES)}")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool per merge and cache state")
    parser.add_argument("--mergekit", help="path of mergekit-yaml (its own virtual environment); omit to skip")
    parser.add_argument("--mergekit-scales", type=int, nargs="+", help="scales mergekit runs at (default: all)")
    parser.add_argument("--cache", nargs="+", default=["warm", "cold"], choices=["warm", "cold"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/blockmerge-mkcompare"))
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args()

    pm.compile_blockmerge()
    caches = [c for c in args.cache if c == "warm" or can_drop_caches()]
    if caches != args.cache:
        print("cannot drop the page cache here (needs root): warm runs only")
    mergekit = args.mergekit
    if mergekit and not Path(mergekit).is_file():
        raise SystemExit(f"--mergekit {mergekit}: no such file")
    mk_version = None
    if mergekit:
        pip = Path(mergekit).parent / "pip"
        shown = subprocess.run([str(pip), "show", "mergekit"], capture_output=True, text=True).stdout
        mk_version = next((line.split()[-1] for line in shown.splitlines() if line.startswith("Version:")), "unknown")
    tools = [t for t in TOOLS if t == "blockmerge" or mergekit]
    result: dict[str, Any] = {"machine": machine_description(), "mergekit_version": mk_version,
                              "command": " ".join(["python", *sys.argv]), "families": {}, "floors": {}, "runs": [],
                              "agreement": {}, "configs": {m: MERGES[m] for m in args.methods}}
    runs: list[Run] = []
    for scale in args.scales:
        root = args.workdir / f"x{scale}"
        print(f"family x{scale}: building / checking {root}", flush=True)
        dirs = build_family(root / "family", scale)
        outs = root / "out"
        outs.mkdir(parents=True, exist_ok=True)
        with_base = [p for d in dirs.values() for p in weight_files(d)]
        result["families"][str(scale)] = {"parameters": parameter_count(dirs["base"]),
                                          "inputs_bytes": sum(p.stat().st_size for p in with_base)}
        out_bytes = sum(p.stat().st_size for p in weight_files(dirs["base"]))
        mergekit_here = bool(mergekit) and (not args.mergekit_scales or scale in args.mergekit_scales)
        configs = {m: write_config(m, dirs, outs / f"{m}.yaml") for m in args.methods}
        for cache in caches:
            for method in args.methods:
                inputs = config_inputs(method, dirs)
                for _ in range(args.repeats):
                    for tool in tools:
                        if tool == "mergekit" and not mergekit_here:
                            continue
                        # the disk's speed drifts over minutes here: each run is compared with a floor taken beside it
                        floor = disk_floor(inputs, out_bytes, outs, "cold" in caches) if tool == "blockmerge" else None
                        runs.append(one_run(tool, method, scale, configs[method], inputs, outs / f"{tool}-{method}",
                                            cache, mergekit))
                        runs[-1].floor = floor
        if mergekit_here:
            for method in args.methods:
                a = agreement(outs / f"blockmerge-{method}", outs / f"mergekit-{method}")
                result["agreement"][f"scale {scale} {method}"] = a
                print(f"  agreement {method}: {a}", flush=True)
    result["runs"] = [asdict(r) for r in runs]
    result["floors"] = median_floors(runs)
    result["rows"] = summarise(runs, result["floors"])
    result["targets"] = targets(result["rows"])
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "mergekit_compare.json").write_text(json.dumps(result, indent=1))
    report = markdown(result)
    (args.results / "mergekit_compare.md").write_text(report)
    plot(result, args.results / "mergekit_compare.png")
    print(report)


if __name__ == "__main__":
    main()
