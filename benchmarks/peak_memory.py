"""Peak memory and wall time of `blockmerge.merge` on generated transformer-shaped checkpoints.

For each model size S (GiB) this script generates a base and N fine-tunes (single float32
`.safetensors` files, written block by block), measures the disk, then runs every method in a
fresh child process and records what the OS says the merge cost: the resident-set high-water
mark above the child's idle (post-import) RSS, wall time against an I/O floor, and the
Summary blockmerge returns. Results go to benchmarks/results/peak_memory.{md,json,png}.

    python benchmarks/peak_memory.py --sizes 0.5 1 --models 4 --methods average task_arithmetic dare ties

The two targets checked (reported, never asserted): at the largest size every method's RSS delta
is below 25% of one model's size, and the delta at size S is within 20% of the delta at S/2.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MiB = 1024**2
GiB = 1024**3
VOCAB = 32000
MAX_POSITIONS = 2048
INIT_STD = 0.02
NOISE_STD = 2e-3
GEN_CHUNK_BYTES = 16 * MiB
IO_CHUNK_BYTES = 16 * MiB
RESULT_PREFIX = "BENCH-RESULT "
FAMILY_VERSION = 1
DEFAULT_METHODS = ["average", "task_arithmetic", "dare", "ties"]
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------- /proc helpers


def proc_status() -> dict[str, int]:
    """Memory lines of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile, RssShmem) in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmPeak", "VmSize"):
                out[key] = int(value.split()[0]) * 1024
    return out


def machine_description() -> dict[str, Any]:
    """CPU model, core count, RAM, kernel, Python and torch versions of this machine."""
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    return {"cpu": cpu, "nproc": os.cpu_count(), "ram_bytes": ram, "kernel": platform.release(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "blockmerge_commit": blockmerge_commit()}


def blockmerge_commit() -> str:
    """The repository's HEAD commit, with '+dirty' when blockmerge/ has uncommitted changes ('unknown' without git)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "blockmerge"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


# --------------------------------------------------------------------------------------------- model family


@dataclass(frozen=True)
class Family:
    """Shape of a generated transformer-like checkpoint of about `size_gib` GiB of float32."""

    size_gib: float
    hidden: int
    layers: int
    lm_head_rows: int

    def specs(self) -> dict[str, Any]:
        """Tensor name -> TensorSpec, in the shapes of a Llama-style decoder."""
        from blockmerge.engine.tensors import TensorSpec

        h = self.hidden
        specs = {"model.embed_tokens.weight": TensorSpec((VOCAB, h), "float32"),
                 "model.norm.weight": TensorSpec((h,), "float32"),
                 "model.position_ids": TensorSpec((1, MAX_POSITIONS), "int64")}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            for proj in "qkvo":
                specs[f"{p}self_attn.{proj}_proj.weight"] = TensorSpec((h, h), "float32")
            specs[f"{p}mlp.up_proj.weight"] = TensorSpec((4 * h, h), "float32")
            specs[f"{p}mlp.down_proj.weight"] = TensorSpec((h, 4 * h), "float32")
            specs[f"{p}input_layernorm.weight"] = TensorSpec((h,), "float32")
            specs[f"{p}post_attention_layernorm.weight"] = TensorSpec((h,), "float32")
        if self.lm_head_rows:
            specs["lm_head.weight"] = TensorSpec((self.lm_head_rows, h), "float32")
        return specs

    def nbytes(self) -> int:
        """Bytes of tensor data in one checkpoint."""
        return sum(s.nbytes for s in self.specs().values())

    def metadata(self, role: str) -> dict[str, str]:
        """Safetensors metadata identifying how a file was generated (checked before reuse)."""
        return {"format": "pt", "blockmerge-bench": json.dumps(
            {"version": FAMILY_VERSION, "role": role, "init_std": INIT_STD, "noise_std": NOISE_STD,
             **asdict(self)}, sort_keys=True)}


def family_for(size_gib: float) -> Family:
    """The widest hidden size (<= 1024) whose embedding and two layers fit in the size; lm_head fills the rest."""
    target = int(size_gib * GiB)
    for h in (1024, 512, 256, 128, 64):
        fixed = VOCAB * h * 4 + h * 4 + MAX_POSITIONS * 8
        layer = (12 * h * h + 2 * h) * 4
        if fixed + 2 * layer <= target:
            layers = (target - fixed) // layer
            rest = target - fixed - layers * layer
            return Family(size_gib, h, layers, rest // (h * 4))
    raise SystemExit(f"size {size_gib} GiB is too small for a transformer-shaped model")


def _base_rows(gen: Any, name: str, spec: Any, start: int, stop: int) -> Any:
    """Rows start..stop of the base tensor `name` (a deterministic function of the generator's seed)."""
    import torch

    shape = (stop - start, *spec.shape[1:])
    if spec.dtype == "int64":
        return torch.arange(spec.numel, dtype=torch.int64).view(spec.shape)[start:stop].clone()
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.randn(shape, generator=gen) * INIT_STD


def generate_checkpoint(path: Path, family: Family, index: int) -> None:
    """Write the base (index 0) or fine-tune `index` (base + N(0, NOISE_STD²) noise) block by block."""
    import torch

    from blockmerge.engine.safetensors_io import SafetensorsWriter

    role = "base" if index == 0 else f"finetune-{index}"
    specs = family.specs()
    tmp = path.with_name(path.name + ".tmp")
    writer = SafetensorsWriter(tmp, specs, family.metadata(role))
    try:
        for t, name in enumerate(sorted(specs)):
            spec = specs[name]
            base_gen = torch.Generator().manual_seed(1_000_003 * t + 17)
            noise_gen = torch.Generator().manual_seed(1_000_003 * t + 7919 * index + 1)
            row_bytes = max(1, spec.row_numel * 4)
            step = max(1, GEN_CHUNK_BYTES // row_bytes)
            for start in range(0, spec.rows, step):
                stop = min(spec.rows, start + step)
                rows = _base_rows(base_gen, name, spec, start, stop)
                if index and rows.is_floating_point():
                    rows += torch.randn(rows.shape, generator=noise_gen) * NOISE_STD
                writer.write(name, start, rows.contiguous())
    finally:
        writer.close(sync=True)
    os.replace(tmp, path)


def checkpoint_ok(path: Path, family: Family, role: str) -> bool:
    """Whether `path` is a complete file generated for this family and role (same header and size)."""
    from blockmerge.engine.safetensors_io import SafetensorsFile, header_bytes

    if not path.is_file():
        return False
    header, _ = header_bytes(family.specs(), family.metadata(role))
    if path.stat().st_size != len(header) + family.nbytes():
        return False
    try:
        f = SafetensorsFile(path)
    except Exception:
        return False
    try:
        return f.metadata == family.metadata(role)
    finally:
        f.close()


def ensure_family(workdir: Path, family: Family, n_models: int, regenerate: bool) -> tuple[Path, list[Path], float]:
    """Base and fine-tune paths for a family, generating the missing ones; returns seconds spent generating."""
    folder = workdir / f"size-{family.size_gib:g}GiB"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "base.safetensors"] + [folder / f"finetune-{i}.safetensors" for i in range(1, n_models + 1)]
    spent = 0.0
    for i, path in enumerate(paths):
        role = "base" if i == 0 else f"finetune-{i}"
        if not regenerate and checkpoint_ok(path, family, role):
            print(f"  reuse {path} ({path.stat().st_size / MiB:.0f} MiB)", flush=True)
            continue
        t0 = time.perf_counter()
        generate_checkpoint(path, family, i)
        spent += time.perf_counter() - t0
        print(f"  wrote {path} ({path.stat().st_size / MiB:.0f} MiB) in {time.perf_counter() - t0:.1f} s", flush=True)
    return paths[0], paths[1:], spent


# --------------------------------------------------------------------------------------------- page cache and disk


def drop_cache(path: Path) -> None:
    """Ask the kernel to evict a file's pages from the page cache (written back first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: Path, samples: int = 256) -> float | None:
    """Fraction of evenly spaced 4 KiB pages of a file already in the page cache (preadv RWF_NOWAIT probe).

    None when the kernel or file system does not support non-blocking buffered reads.
    """
    size = path.stat().st_size
    if size == 0:
        return 1.0
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(4096)
    hits = 0
    try:
        for i in range(samples):
            offset = (size * i // samples) & ~4095
            try:
                n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
                hits += n > 0
            except BlockingIOError:
                pass
            except OSError as err:
                if err.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    return None
                raise
    finally:
        os.close(fd)
    return hits / samples


def measure_read(path: Path) -> dict[str, Any]:
    """Sequential read throughput of a file after dropping its cache, and warm (second read) for reference."""
    drop_cache(path)
    before = resident_fraction(path)
    buf = bytearray(IO_CHUNK_BYTES)
    view = memoryview(buf)

    def read_all() -> tuple[int, float]:
        fd = os.open(path, os.O_RDONLY)
        total, t0 = 0, time.perf_counter()
        try:
            while n := os.readv(fd, [view]):
                total += n
        finally:
            os.close(fd)
        return total, time.perf_counter() - t0

    total, cold_s = read_all()
    _, warm_s = read_all()
    cold = before is not None and before < 0.05
    return {"path": str(path), "bytes": total, "seconds": cold_s, "bytes_per_s": total / cold_s,
            "warm_seconds": warm_s, "warm_bytes_per_s": total / warm_s,
            "resident_before": before, "looks_cold": cold if before is not None else cold_s > 2 * warm_s}


def measure_write(folder: Path, nbytes: int = GiB) -> dict[str, Any]:
    """Sequential write + fsync throughput of a fresh `nbytes` file (deleted afterwards)."""
    import torch

    path = folder / "write-test.bin"
    chunk = torch.randint(0, 256, (IO_CHUNK_BYTES,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = memoryview(chunk.numpy())
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        while written < nbytes:
            written += os.write(fd, data[: min(len(data), nbytes - written)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return {"bytes": written, "seconds": seconds, "bytes_per_s": written / seconds}


# --------------------------------------------------------------------------------------------- the child


class RssSampler(threading.Thread):
    """Samples VmRSS / RssAnon / RssFile every `interval` seconds and keeps the maxima."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak: dict[str, int] = {}
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for key, value in proc_status().items():
                self.peak[key] = max(self.peak.get(key, 0), value)
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> dict[str, int]:
        """Stop sampling; the peak of each field."""
        self._stop_event.set()
        self.join()
        return self.peak


def child_main(spec_json: str) -> None:
    """Run one merge in this (fresh) process and print its measurements as one JSON line."""
    spec = json.loads(spec_json)
    t0 = time.perf_counter()
    import torch

    import blockmerge
    from blockmerge.engine.plan import DEFAULT_BLOCK_BYTES
    from blockmerge.engine.sinks import parse_size

    import_s = time.perf_counter() - t0
    idle = proc_status()
    hwm_reset = False
    try:  # reset VmHWM to the current RSS so the import spike is not counted (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_reset = True
    except OSError:
        pass
    after_reset = proc_status()
    kwargs = dict(spec.get("hyperparameters") or {})
    if spec.get("block_size"):
        kwargs["block_size"] = spec["block_size"]
    sampler = RssSampler()
    sampler.start()
    t1 = time.perf_counter()
    summary = blockmerge.merge(spec["method"], spec["models"], base=spec["base"], out=spec["out"],
                               overwrite=True, **kwargs)
    wall = time.perf_counter() - t1
    sampled = sampler.stop()
    end = proc_status()
    result = {
        "method": spec["method"], "wall_s": wall, "import_s": import_s,
        "block_bytes": parse_size(spec.get("block_size") or DEFAULT_BLOCK_BYTES),
        "summary": asdict(summary),
        "idle_rss_bytes": idle["VmRSS"], "idle_anon_bytes": idle.get("RssAnon", 0),
        "idle_file_bytes": idle.get("RssFile", 0),
        "hwm_reset": hwm_reset, "hwm_after_reset_bytes": after_reset["VmHWM"],
        "vmhwm_bytes": end["VmHWM"], "end_rss_bytes": end["VmRSS"],
        "delta_bytes": end["VmHWM"] - idle["VmRSS"],
        "sampled_peak": {"rss": sampled.get("VmRSS", 0), "anon": sampled.get("RssAnon", 0),
                         "file": sampled.get("RssFile", 0), "samples": sampler.samples},
        "torch_threads": torch.get_num_threads(),
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one merge in a fresh Python process; add the child's max RSS as its parent sees it (wait4).

    RUSAGE_CHILDREN's ru_maxrss is the largest of all children waited for so far, so it is kept only
    as a before/after cross-check; the per-child figure comes from wait4's rusage of this child.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                stdout=out, stderr=err, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)  # per-child rusage, what `/usr/bin/time -v` reports
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child for {spec['method']} failed (exit {proc.returncode}):\n{stdout}\n{stderr}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["child_maxrss_bytes"] = usage.ru_maxrss * 1024
    result["children_maxrss_bytes"] = {"before": before, "after": after}
    result["child_cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


# --------------------------------------------------------------------------------------------- report


def within(a: float, b: float, tolerance: float) -> bool:
    """|a - b| <= tolerance * b."""
    return abs(a - b) <= tolerance * b


def check_targets(rows: list[dict[str, Any]], methods: list[str], sizes: list[float]) -> list[str]:
    """PASS/FAIL lines: delta < 25% of a model at the largest size; delta(S) within 20% of delta(S/2)."""
    by = {(r["size_gib"], r["method"]): r for r in rows}
    largest = max(sizes)
    pairs = [(s, h) for s in sizes for h in sizes if abs(h * 2 - s) < 1e-9]
    lines = []
    for m in methods:
        r = by.get((largest, m))
        if r is not None:
            ok = r["delta_bytes"] < 0.25 * r["model_bytes"]
            lines.append(f"{'PASS' if ok else 'FAIL'} {m}: delta {r['delta_bytes'] / MiB:.0f} MiB = "
                         f"{100 * r['delta_bytes'] / r['model_bytes']:.1f}% of one model at {largest:g} GiB "
                         "(target < 25%)")
        if not pairs:
            lines.append(f"n/a  {m}: no size S with S/2 also measured, scaling target not checked")
        for s, h in pairs:
            a, b = by.get((s, m)), by.get((h, m))
            if a is None or b is None:
                continue
            ok = within(a["delta_bytes"], b["delta_bytes"], 0.20)
            change = 100 * (a["delta_bytes"] - b["delta_bytes"]) / b["delta_bytes"]
            lines.append(f"{'PASS' if ok else 'FAIL'} {m}: delta {a['delta_bytes'] / MiB:.0f} MiB at {s:g} GiB vs "
                         f"{b['delta_bytes'] / MiB:.0f} MiB at {h:g} GiB ({change:+.1f}%, target within ±20%)")
    return lines


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per size × method."""
    head = ["size GiB", "method", "wall s", "I/O floor s", "wall/floor", "peak RSS MiB", "idle MiB", "delta MiB",
            "delta % model", "anon/file MiB", "wait4 maxrss MiB", "read/written MiB", "blocks", "passes"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i != 1 else ":---" for i in range(len(head))) + "|"]
    for r in rows:
        s = r["summary"]
        cells = [f"{r['size_gib']:g}", r["method"], f"{r['wall_s']:.1f}", f"{r['io_floor_s']:.1f}",
                 f"{r['wall_s'] / r['io_floor_s']:.2f}", f"{r['vmhwm_bytes'] / MiB:.0f}",
                 f"{r['idle_rss_bytes'] / MiB:.0f}", f"{r['delta_bytes'] / MiB:.0f}",
                 f"{100 * r['delta_bytes'] / r['model_bytes']:.1f}",
                 f"{s['peak_rss_anon_bytes'] / MiB:.0f}/{s['peak_rss_file_bytes'] / MiB:.0f}",
                 f"{r['child_maxrss_bytes'] / MiB:.0f}",
                 f"{s['bytes_read'] / MiB:.0f}/{s['bytes_written'] / MiB:.0f}", str(s["blocks"]), str(s["passes"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], methods: list[str], sizes: list[float], path: Path) -> None:
    """Bars of delta RSS per method at each size (with the 25% line) and of wall time vs I/O floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["size_gib"], r["method"]): r for r in rows}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.2))
    width = 0.8 / max(1, len(sizes))
    xs = range(len(methods))
    for j, size in enumerate(sizes):
        deltas = [by[(size, m)]["delta_bytes"] / MiB if (size, m) in by else 0 for m in methods]
        pos = [x + (j - (len(sizes) - 1) / 2) * width for x in xs]
        bars = ax1.bar(pos, deltas, width, label=f"{size:g} GiB models")
        ax1.bar_label(bars, fmt="%.0f", fontsize=7)
        model = next((by[(size, m)]["model_bytes"] for m in methods if (size, m) in by), None)
        if model:
            ax1.axhline(0.25 * model / MiB, color=bars.patches[0].get_facecolor(), ls="--", lw=1,
                        label=f"25% of a {size:g} GiB model")
    ax1.set_xticks(list(xs), methods)
    ax1.set_ylabel("peak RSS above idle (MiB)")
    ax1.set_title("Memory: VmHWM − idle RSS of the merge process")
    ax1.legend(fontsize=7)

    labels, walls, floors = [], [], []
    for m in methods:
        for size in sizes:
            if (size, m) in by:
                labels.append(f"{m} {size:g} GiB")
                walls.append(by[(size, m)]["wall_s"])
                floors.append(by[(size, m)]["io_floor_s"])
    xs2 = range(len(labels))
    ax2.bar([x - 0.2 for x in xs2], walls, 0.4, label="wall time")
    ax2.bar([x + 0.2 for x in xs2], floors, 0.4, label="I/O floor (read/disk read + written/disk write)")
    ax2.set_xticks(list(xs2), labels, fontsize=7, rotation=35, ha="right")
    ax2.set_ylabel("seconds")
    ax2.set_title("Time: merge wall time vs I/O floor")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results_dir: Path, report: dict[str, Any], methods: list[str], sizes: list[float]) -> str:
    """Write peak_memory.{json,md,png}; return the markdown."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "peak_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    m, d = report["machine"], report["disk"]
    fams = "\n".join(f"- {f['size_gib']:g} GiB: hidden {f['hidden']}, {f['layers']} layers, vocab {VOCAB}, "
                     f"lm_head {f['lm_head_rows']} rows, {f['tensors']} tensors, "
                     f"{f['model_bytes'] / MiB:.0f} MiB of tensor data per checkpoint; largest tensor "
                     f"{f['largest_tensor_bytes'] / MiB:.0f} MiB" for f in report["families"])
    rd = d["read"]
    env = report.get("child_env") or {}
    env_note = ", child environment " + " ".join(f"{k}={v}" for k, v in env.items()) if env else ""
    gen = (f"{report['generation_s']:.0f} s of it generating models" if report["generation_s"]
           else "models reused from an earlier run")
    md = f"""# blockmerge peak memory and wall time

Generated by `benchmarks/peak_memory.py` on {report['date']}.

Command: `{report['command']}`

Runtime: {report['total_s']:.0f} s, {gen}.

Machine: {m['cpu']}, {m['nproc']} cores, {m['ram_bytes'] / GiB:.1f} GiB RAM, Linux {m['kernel']}, \
Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads).

Merges: blockmerge at commit {m.get('blockmerge_commit', 'unknown')}, block budget \
{report['block_bytes'] / MiB:.0f} MiB, {report['n_models']} fine-tunes + base, inputs' page cache \
{'kept (warm)' if report['warm'] else 'dropped before each merge'}{env_note}.

Disk: sequential read {rd['bytes_per_s'] / MiB:.0f} MiB/s ({'cold' if rd['looks_cold'] else 'NOT cold'}: \
{'n/a' if rd['resident_before'] is None else f"{100 * rd['resident_before']:.0f}%"} of pages resident before; \
warm re-read {rd['warm_bytes_per_s'] / MiB:.0f} MiB/s), sequential write + fsync \
{d['write']['bytes_per_s'] / MiB:.0f} MiB/s.
I/O floor = bytes read / read throughput + bytes written / write throughput.

Models (float32, Llama-shaped, fine-tune = base + N(0, {NOISE_STD:g}²)):
{fams}

{markdown_table(report['rows'])}

- peak RSS = the child's VmHWM at the end, reset to the post-import RSS via /proc/self/clear_refs \
({'done' if all(r['hwm_reset'] for r in report['rows']) else 'NOT available: includes the import'}); \
idle = VmRSS after `import torch, blockmerge`; delta = peak − idle.
- anon/file = the Summary's peak anonymous / file-backed resident bytes (sampled after each block).
- wait4 maxrss = the child's ru_maxrss as its parent sees it (what `/usr/bin/time -v` prints; includes imports).
- read/written = the Summary's bytes_read / bytes_written (every pass counts its reads).

## Targets

```
{chr(10).join(report['targets'])}
```
"""
    if report.get("notes"):
        md += "\n## Notes\n\n" + "\n".join(f"- {n}" for n in report["notes"]) + "\n"
    (results_dir / "peak_memory.md").write_text(md)
    plot(report["rows"], methods, sizes, results_dir / "peak_memory.png")
    return md


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[0.5, 1.0], help="model sizes in GiB")
    p.add_argument("--models", type=int, default=4, help="fine-tunes merged (plus a base)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--block-size", default=None, help="blockmerge block budget, e.g. 32MiB (default: blockmerge's)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/blockmerge-bench"),
                   help="where models and outputs are written (not in the repository)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="where peak_memory.{md,json,png} go")
    p.add_argument("--regenerate", action="store_true", help="regenerate models even if they exist")
    p.add_argument("--warm", action="store_true", help="do not drop the inputs' page cache before each merge")
    p.add_argument("--keep-outputs", action="store_true", help="keep merged outputs in the work directory")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the merge children, e.g. MALLOC_MMAP_THRESHOLD_=1048576")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rewrite the .md and .png from the JSON already in --results")
    p.add_argument("--notes", type=Path, help="text file of findings (one per line) added to the report's Notes")
    p.add_argument("--child", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Generate models, measure the disk, run each merge in a child and report."""
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    from blockmerge.engine.plan import DEFAULT_BLOCK_BYTES
    from blockmerge.engine.sinks import parse_size

    notes = [line.strip() for line in args.notes.read_text().splitlines() if line.strip()] if args.notes else []
    if args.report_only:
        report = json.loads((args.results / "peak_memory.json").read_text())
        report["notes"] = notes or report.get("notes", [])
        methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
        print(write_reports(args.results, report, methods, sorted({r["size_gib"] for r in report["rows"]})))
        return
    workdir = args.workdir.resolve()
    repo = Path(__file__).resolve().parents[1]
    if workdir == repo or repo in workdir.parents:
        raise SystemExit(f"--workdir {workdir} is inside the repository; use a directory outside it")
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = sorted(set(args.sizes))
    child_env = dict(item.split("=", 1) for item in args.env)
    started = time.perf_counter()
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/peak_memory.py", *sys.argv[1:]])
    machine = machine_description()
    print(f"machine: {machine}", flush=True)

    families, paths = [], {}
    gen_s = 0.0
    for size in sizes:
        fam = family_for(size)
        specs = fam.specs()
        print(f"model family {size:g} GiB: hidden {fam.hidden}, {fam.layers} layers", flush=True)
        base, models, spent = ensure_family(workdir, fam, args.models, args.regenerate)
        gen_s += spent
        paths[size] = (fam, base, models)
        families.append({**asdict(fam), "tensors": len(specs), "model_bytes": fam.nbytes(),
                         "largest_tensor_bytes": max(s.nbytes for s in specs.values())})

    print("measuring the disk", flush=True)
    disk = {"read": measure_read(paths[sizes[-1]][2][0]), "write": measure_write(workdir)}
    print(f"  read {disk['read']['bytes_per_s'] / MiB:.0f} MiB/s (cold: {disk['read']['looks_cold']}, "
          f"resident before {disk['read']['resident_before']}), warm {disk['read']['warm_bytes_per_s'] / MiB:.0f} "
          f"MiB/s; write+fsync {disk['write']['bytes_per_s'] / MiB:.0f} MiB/s", flush=True)

    rows = []
    for size in sizes:
        fam, base, models = paths[size]
        for method in args.methods:
            out = workdir / f"size-{size:g}GiB" / f"out-{method}.safetensors"
            inputs = [base, *models]
            if not args.warm:
                for p in inputs:
                    drop_cache(p)
            resident = [resident_fraction(p) for p in inputs]
            spec = {"method": method, "models": [str(p) for p in models], "base": str(base), "out": str(out),
                    "block_size": args.block_size}
            print(f"merge {method} at {size:g} GiB ...", flush=True)
            r = run_child(spec, child_env)
            s = r["summary"]
            r["size_gib"] = size
            r["model_bytes"] = fam.nbytes()
            r["inputs_resident_before"] = resident
            r["io_floor_s"] = (s["bytes_read"] / disk["read"]["bytes_per_s"]
                               + s["bytes_written"] / disk["write"]["bytes_per_s"])
            rows.append(r)
            print(f"  wall {r['wall_s']:.1f} s (floor {r['io_floor_s']:.1f} s), VmHWM {r['vmhwm_bytes'] / MiB:.0f} MiB,"
                  f" idle {r['idle_rss_bytes'] / MiB:.0f} MiB, delta {r['delta_bytes'] / MiB:.0f} MiB "
                  f"({100 * r['delta_bytes'] / r['model_bytes']:.1f}% of a model), sampled anon/file "
                  f"{r['sampled_peak']['anon'] / MiB:.0f}/{r['sampled_peak']['file'] / MiB:.0f} MiB", flush=True)
            if not args.keep_outputs:
                out.unlink(missing_ok=True)

    targets = check_targets(rows, args.methods, sizes)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command, "machine": machine,
        "block_bytes": parse_size(args.block_size or DEFAULT_BLOCK_BYTES), "n_models": args.models,
        "warm": args.warm, "child_env": child_env, "workdir": str(workdir), "families": families, "disk": disk,
        "rows": rows, "targets": targets, "notes": notes, "generation_s": gen_s,
        "total_s": time.perf_counter() - started,
    }
    md = write_reports(args.results, report, args.methods, sizes)
    print()
    print(md)
    print(f"total {report['total_s']:.0f} s (generation {gen_s:.0f} s); results in {args.results}")


if __name__ == "__main__":
    main()
