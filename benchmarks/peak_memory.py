"""Peak memory and wall time of `blockmerge.merge` on generated transformer-shaped checkpoints.

For each model size S (GiB) this script generates a base and N fine-tunes (single float32
`.safetensors` files, written block by block), measures the disk, then runs every method in a
fresh child process and records what the OS says the merge cost: the resident-set high-water
mark above the child's idle (post-import) RSS, wall time against an I/O floor, and the
Summary blockmerge returns. Results go to benchmarks/results/peak_memory.{md,json,png}.

    python benchmarks/peak_memory.py --sizes 0.5 1 --models 4 --methods average task_arithmetic dare ties

Any registered method that reads no statistics can be named; each merges as many of the N fine-tunes
as it takes (slerp and nuslerp 2, nearswap, arcee_fusion and passthrough 1) and reads the base only
where it needs one (the table's `models` column). `--methods mergekit` runs the methods that merge
like mergekit's (`MERGEKIT_METHODS`, blockmerge's names):

    python benchmarks/peak_memory.py --sizes 0.5 1 --models 4 --methods mergekit

`--methods subspace` runs TSV-M, Iso-C and Iso-CTS, which hold one whole matrix and its task matrices at a time:
their peak follows the largest tensor (the embedding), not the block budget.

The two targets checked (reported, never asserted): at the largest size every method's RSS delta
is below 25% of one model's size, and the delta at size S is within 20% of the delta at S/2.

With --statistics it also writes a statistics store per model (Fisher of every float tensor, input
and output Grams of every projection weight; the base gets a Fisher only) and measures the
statistic methods against the `average` merge of the same models and against a bound: the largest
merged tensor's weights (N models + base + output) + its Grams × N + BOUND_SLACK. Results go to
benchmarks/results/peak_memory_statistics.{md,json,png}.

    python benchmarks/peak_memory.py --statistics --sizes 0.125 0.25 --models 4 --max-hidden 512
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import platform
import resource
import shlex
import shutil
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
STATISTICS_VERSION = 1
DEFAULT_METHODS = ["average", "task_arithmetic", "dare", "ties"]
# blockmerge's methods that merge as mergekit's do (`--methods mergekit`): linear (mergekit's linear), task_arithmetic,
# ties, dare (dare_linear, dare_ties), breadcrumbs (and breadcrumbs_ties), della (and della_linear), sce, model_stock,
# nearswap, slerp, nuslerp, multislerp, karcher, arcee_fusion, passthrough, ram (ram, ramplus_tl).
MERGEKIT_METHODS = ["linear", "task_arithmetic", "ties", "dare", "breadcrumbs", "della", "sce", "model_stock",
                    "nearswap", "slerp", "nuslerp", "multislerp", "karcher", "arcee_fusion", "passthrough", "ram"]
STATISTIC_METHODS = ["fisher", "regmean", "mats", "ubgm"]
SUBSPACE_METHODS = ["tsv_m", "iso_c", "iso_cts"]  # whole matrices at a time: bounded by the largest tensor
REFERENCE_METHOD = "average"  # the same models merged without statistics
STATISTICS_SIZES = [0.125, 0.25]
STATISTICS_MAX_HIDDEN = 512
BOUND_SLACK = 64 * MiB
FISHER_SCALE = 1e-4  # Fisher = (FISHER_SCALE^½ · N(0, 1))²
GRAM_RANK = 16  # Gram = AᵀA / GRAM_RANK + GRAM_RIDGE · I, A: GRAM_RANK random rows
GRAM_RIDGE = 1.0
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


def compile_blockmerge() -> None:
    """Byte-compile the blockmerge package the timed children import, as installing a wheel does: an editable
    install run with PYTHONDONTWRITEBYTECODE=1 would compile it again in every child, and mergekit's is compiled."""
    import compileall

    import blockmerge

    compileall.compile_dir(Path(blockmerge.__file__).parent, quiet=1)


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


def family_for(size_gib: float, max_hidden: int = 1024) -> Family:
    """The widest hidden size (<= max_hidden) whose embedding and two layers fit in the size; lm_head fills the rest."""
    target = int(size_gib * GiB)
    for h in (h for h in (1024, 512, 256, 128, 64) if h <= max_hidden):
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


def family_folder(workdir: Path, family: Family) -> Path:
    return workdir / f"size-{family.size_gib:g}GiB-h{family.hidden}"


def ensure_family(workdir: Path, family: Family, n_models: int, regenerate: bool) -> tuple[Path, list[Path], float]:
    """Base and fine-tune paths for a family, generating the missing ones; returns seconds spent generating."""
    folder = family_folder(workdir, family)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "base.safetensors"] + [folder / f"finetune-{i}.safetensors" for i in range(1, n_models + 1)]
    spent = ensure(paths, family, regenerate, checkpoint_ok, generate_checkpoint, lambda p: p.stat().st_size)
    return paths[0], paths[1:], spent


def ensure(paths: list[Path], family: Family, regenerate: bool, ok: Any, generate: Any, size: Any) -> float:
    """Generate each of `paths` (the base first, then fine-tune i) that `ok` does not accept; seconds spent."""
    spent = 0.0
    for i, path in enumerate(paths):
        role = "base" if i == 0 else f"finetune-{i}"
        if not regenerate and ok(path, family, role):
            print(f"  reuse {path} ({size(path) / MiB:.0f} MiB)", flush=True)
            continue
        t0 = time.perf_counter()
        generate(path, family, i)
        spent += time.perf_counter() - t0
        print(f"  wrote {path} ({size(path) / MiB:.0f} MiB) in {time.perf_counter() - t0:.1f} s", flush=True)
    return spent


# --------------------------------------------------------------------------------------------- statistics


def statistic_specs(family: Family, base: bool) -> dict[tuple[str, str], Any]:
    """(kind, tensor) -> TensorSpec of a model's statistics: a Fisher of every float tensor and, except
    for the base, the input and output Grams of every projection weight (not the embedding or lm_head)."""
    from blockmerge.engine.tensors import TensorSpec

    out = {}
    for name, spec in family.specs().items():
        if spec.floating:
            out[("fisher", name)] = TensorSpec(spec.shape, "float32")
        if not base and name.endswith("_proj.weight"):
            out[("gram_in", name)] = TensorSpec((spec.shape[1], spec.shape[1]), "float32")
            out[("gram_out", name)] = TensorSpec((spec.shape[0], spec.shape[0]), "float32")
    return out


def statistics_metadata(family: Family, role: str) -> dict[str, Any]:
    """Store metadata identifying how a statistics store was generated (checked before reuse)."""
    return {"statistics": {"generator": "benchmarks/peak_memory.py"},
            "blockmerge-bench": {"version": STATISTICS_VERSION, "role": role, "fisher_scale": FISHER_SCALE,
                                 "gram_rank": GRAM_RANK, "gram_ridge": GRAM_RIDGE, **asdict(family)}}


def _statistic_rows(kind: str, spec: Any, gen: Any, start: int, stop: int, gram_rows: Any) -> Any:
    """Rows start..stop of a statistic: non-negative Fisher entries, or rows of AᵀA / k + ridge · I."""
    import torch

    if kind == "fisher":
        return torch.randn((stop - start, *spec.shape[1:]), generator=gen).square_().mul_(FISHER_SCALE)
    rows = (gram_rows[:, start:stop].T @ gram_rows / GRAM_RANK).float()
    rows[:, start:stop].diagonal().add_(GRAM_RIDGE)
    return rows


def generate_statistics(path: Path, family: Family, index: int) -> None:
    """Write the statistics store of the base (index 0) or fine-tune `index`, row block by row block."""
    import torch

    from blockmerge.engine.store import StoreWriter, chunk_rows
    from blockmerge.engine.tensors import tensor_bytes

    role = "base" if index == 0 else f"finetune-{index}"
    specs = statistic_specs(family, base=index == 0)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = StoreWriter(tmp, specs)
    checksums = {}
    for t, key in enumerate(sorted(specs)):
        kind, spec = key[0], specs[key]
        gen = torch.Generator().manual_seed(1_000_003 * t + 7919 * index + 104_729)
        gram_rows = (torch.randn(GRAM_RANK, spec.rows, generator=gen, dtype=torch.float64)
                     if kind != "fisher" else None)
        chunk = chunk_rows(spec)
        step = chunk * max(1, GEN_CHUNK_BYTES // (chunk * spec.row_numel * 4))
        digest = hashlib.sha256()
        for start in range(0, spec.rows, step):
            rows = _statistic_rows(kind, spec, gen, start, min(spec.rows, start + step), gram_rows).contiguous()
            writer.write(kind, key[1], start, rows)
            digest.update(tensor_bytes(rows))
        checksums[key] = digest.hexdigest()
    writer.seal(checksums, statistics_metadata(family, role))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def statistics_ok(path: Path, family: Family, role: str) -> bool:
    """Whether `path` is a complete statistics store generated for this family and role."""
    from blockmerge.engine.store import is_store, read_manifest

    if not is_store(path):
        return False
    try:
        entries, metadata = read_manifest(path)
    except Exception:
        return False
    expected = statistic_specs(family, base=role == "base")
    return (metadata == statistics_metadata(family, role)
            and {(e.kind, e.name): e.spec for e in entries} == expected)


def ensure_statistics(workdir: Path, family: Family, n_models: int, regenerate: bool
                      ) -> tuple[Path, list[Path], float]:
    """Statistics stores of the base and fine-tunes, generating the missing ones; returns seconds spent."""
    folder = family_folder(workdir, family)
    paths = [folder / "stats-base"] + [folder / f"stats-finetune-{i}" for i in range(1, n_models + 1)]
    spent = ensure(paths, family, regenerate, statistics_ok, generate_statistics, directory_bytes)
    return paths[0], paths[1:], spent


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def method_inputs(method: str, hyperparameters: dict[str, Any], family: Family, n_models: int) -> dict[str, Any]:
    """What a merge reads (as the method's plugin declares it) and the memory bound it is held to.

    bound = max over the tensors it merges with statistics of (N + 2) × the tensor's float32 bytes
    (models, base, output) + N × its whole-tensor statistics (Grams) + BOUND_SLACK.
    """
    from blockmerge.engine.kinds import is_elementwise
    from blockmerge.plugins import get
    from blockmerge.plugins.base import parse_hyperparameters

    plugin = get(method)
    hp, _ = parse_hyperparameters(plugin, hyperparameters)
    needs = plugin.needs(hp)
    supplied = statistic_specs(family, base=False)
    supplied_kinds = {kind for kind, _ in supplied}
    kinds = sorted(set(needs.statistics) | {k for k in needs.optional_statistics + needs.one_of_statistics
                                             if k in supplied_kinds})
    base_kinds = list(needs.base_statistics)
    reads_base = needs.base or bool(base_kinds)
    stat_bytes = (n_models * sum(s.nbytes for (k, _), s in supplied.items() if k in kinds)
                  + sum(s.nbytes for (k, _), s in statistic_specs(family, base=True).items() if k in base_kinds))
    bound, bound_tensor = 0, None
    for name, spec in family.specs().items():
        if not kinds or not all((k, name) in supplied for k in kinds):
            continue
        whole = sum(supplied[(k, name)].nbytes for k in kinds if not is_elementwise(k))
        need = (n_models + 2) * spec.numel * 4 + n_models * whole
        if need > bound:
            bound, bound_tensor = need, name
    return {"statistics": kinds, "base_statistics": base_kinds, "reads_base": reads_base,
            "model_bytes": (n_models + reads_base) * family.nbytes(), "statistics_bytes": stat_bytes,
            "bound_bytes": bound + BOUND_SLACK if bound_tensor else None, "bound_tensor": bound_tensor}


def merge_plan(method: str, hyperparameters: dict[str, Any], n_models: int) -> dict[str, Any]:
    """How a method is run on a base + `n_models` fine-tunes, as its plugin declares: the number of fine-tunes it
    merges (all, or the most it takes), whether it reads the base and whether it reads statistics.

    The base is passed only where the method reads it: a merge that needs none accepts one, but then only
    checks it against the models and copies the tensors it does not merge (integer buffers) from it."""
    from blockmerge.plugins import get
    from blockmerge.plugins.base import parse_hyperparameters

    plugin = get(method)
    hp, _ = parse_hyperparameters(plugin, hyperparameters)
    needs = plugin.needs(hp)
    least, most = plugin.model_count
    merged = n_models if most is None else min(n_models, most)
    if merged < least:
        raise SystemExit(f"--methods {method} merges at least {least} models: use --models {least} or more")
    return {"models": merged, "base": needs.base or bool(needs.base_statistics),
            "statistics": bool(needs.statistics or needs.one_of_statistics or needs.base_statistics)}


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
    from blockmerge.engine import memory
    from blockmerge.engine.plan import DEFAULT_BLOCK_BYTES
    from blockmerge.engine.sinks import parse_size

    compile_blockmerge()

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
    memory.return_freed_blocks_to_the_os()  # as the blockmerge command does, once per process
    sampler = RssSampler()
    sampler.start()
    t1 = time.perf_counter()
    summary = blockmerge.merge(spec["method"], spec["models"], base=spec["base"], stats=spec.get("stats"),
                               base_stats=spec.get("base_stats"), out=spec["out"], overwrite=True, **kwargs)
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


def check_targets(rows: list[dict[str, Any]], methods: list[str], sizes: list[float], share: bool = True
                  ) -> list[str]:
    """PASS/FAIL lines: delta < 25% of a model at the largest size (if `share`); delta below the row's
    bound where it has one; delta(S) within 20% of delta(S/2)."""
    by = {(r["size_gib"], r["method"]): r for r in rows}
    largest = max(sizes)
    pairs = [(s, h) for s in sizes for h in sizes if abs(h * 2 - s) < 1e-9]
    lines = []
    for m in methods:
        for size in sizes:
            r = by.get((size, m))
            if r is not None and r.get("bound_bytes"):
                ok = r["delta_bytes"] < r["bound_bytes"]
                lines.append(f"{'PASS' if ok else 'FAIL'} {m}: delta {r['delta_bytes'] / MiB:.0f} MiB at {size:g} GiB "
                             f"vs bound {r['bound_bytes'] / MiB:.0f} MiB ({r['bound_tensor']}; target below)")
                reference = by.get((size, REFERENCE_METHOD))
                if reference is not None:
                    # The constant taken as the engine's own overhead at this block size: the average merge's delta.
                    extra, layer = r["delta_bytes"] - reference["delta_bytes"], r["bound_bytes"] - BOUND_SLACK
                    lines.append(f"{'PASS' if extra < layer else 'FAIL'} {m}: delta − {REFERENCE_METHOD}'s delta = "
                                 f"{extra / MiB:.0f} MiB at {size:g} GiB vs the layer's weights + Grams × N = "
                                 f"{layer / MiB:.0f} MiB (constant = {REFERENCE_METHOD}'s delta, "
                                 f"{reference['delta_bytes'] / MiB:.0f} MiB)")
        r = by.get((largest, m))
        if share and r is not None:
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


def models_cell(r: dict[str, Any], n_models: int) -> str:
    """Fine-tunes merged, `+ base` where the base was read (rows of older reports: every fine-tune and the base)."""
    return f"{r.get('models_merged', n_models)}{' + base' if r.get('base_read', True) else ''}"


def markdown_table(rows: list[dict[str, Any]], n_models: int) -> str:
    """One row per size × method."""
    head = ["size GiB", "method", "models", "wall s", "I/O floor s", "wall/floor", "peak RSS MiB", "idle MiB",
            "delta MiB", "delta % model", "anon/file MiB", "wait4 maxrss MiB", "read/written MiB", "blocks", "passes"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i != 1 else ":---" for i in range(len(head))) + "|"]
    for r in rows:
        s = r["summary"]
        cells = [f"{r['size_gib']:g}", r["method"], models_cell(r, n_models), f"{r['wall_s']:.1f}",
                 f"{r['io_floor_s']:.1f}",
                 f"{r['wall_s'] / r['io_floor_s']:.2f}", f"{r['vmhwm_bytes'] / MiB:.0f}",
                 f"{r['idle_rss_bytes'] / MiB:.0f}", f"{r['delta_bytes'] / MiB:.0f}",
                 f"{100 * r['delta_bytes'] / r['model_bytes']:.1f}",
                 f"{s['peak_rss_anon_bytes'] / MiB:.0f}/{s['peak_rss_file_bytes'] / MiB:.0f}",
                 f"{r['child_maxrss_bytes'] / MiB:.0f}",
                 f"{s['bytes_read'] / MiB:.0f}/{s['bytes_written'] / MiB:.0f}", str(s["blocks"]), str(s["passes"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


READ_LEGEND = {
    False: "- wait4 maxrss = the child's ru_maxrss as its parent sees it (what `/usr/bin/time -v` prints; includes "
           "imports).\n- read/written = the Summary's bytes_read / bytes_written (every pass counts its reads).",
    True: "- read = the Summary's bytes_read (every pass counts its reads, and every row block of a tensor reads "
          "its Grams again).",
}
STATISTICS_LEGEND = f"""\
- statistics read: the kinds the method's plugin declares, of the N fine-tunes (and of the base where \
named). Every fine-tune's store holds a Fisher of each float tensor and `gram_in`/`gram_out` of each \
`*_proj` weight; the base's holds a Fisher only. Tensors without the kinds a method reads (embedding, \
lm_head, norms for RegMean/MaTS) are averaged by the engine.
- inputs: bytes of the checkpoints the merge reads (N fine-tunes, + the whole base where the method reads \
it, though tensors the engine averages do not read it) / bytes of the statistics it reads, each counted once.
- delta without statistics: the delta of `{REFERENCE_METHOD}` of the same models at the same size (no \
statistics, no base: the same merge's model inputs without the statistics bytes); delta − that = \
what the statistics and the method's own arithmetic add.
- bound = max over the tensors the method merges with statistics of (N models + base + output) × \
the tensor's float32 bytes + N × its Grams' bytes (the kinds read whole: `gram_in`, `gram_out`), \
+ {BOUND_SLACK // MiB} MiB; the tensor is named. For Fisher and UBGM (statistics cut to the block's rows) the \
largest tensor is the embedding and the bound is loose: their peak is set by the block budget.
"""


def statistics_table(rows: list[dict[str, Any]]) -> str:
    """One row per size × method of a statistics run, next to the same size's average merge."""
    head = ["size GiB", "method", "statistics read", "inputs MiB (models+base / statistics)", "read MiB",
            "peak RSS MiB", "delta MiB", "delta without statistics MiB", "delta − that MiB", "bound MiB",
            "below bound", "anon/file MiB", "wall s", "blocks"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i not in (1, 2) else ":---"
                                                           for i in range(len(head))) + "|"]
    reference = {r["size_gib"]: r for r in rows if r["method"] == REFERENCE_METHOD}
    for r in rows:
        s, inputs = r["summary"], r["inputs"]
        ref = reference.get(r["size_gib"])
        is_ref = r["method"] == REFERENCE_METHOD
        bound = r.get("bound_bytes")
        cells = [f"{r['size_gib']:g}", r["method"], ", ".join(inputs["statistics"] + [
            f"base {k}" for k in inputs["base_statistics"]]) or "none",
            f"{inputs['model_bytes'] / MiB:.0f} / {inputs['statistics_bytes'] / MiB:.0f}",
            f"{s['bytes_read'] / MiB:.0f}", f"{r['vmhwm_bytes'] / MiB:.0f}", f"{r['delta_bytes'] / MiB:.0f}",
            "(reference)" if is_ref or ref is None else f"{ref['delta_bytes'] / MiB:.0f}",
            "" if is_ref or ref is None else f"{(r['delta_bytes'] - ref['delta_bytes']) / MiB:+.0f}",
            "—" if not bound else f"{bound / MiB:.0f} ({r['bound_tensor'].removeprefix('model.')})",
            "—" if not bound else ("yes" if r["delta_bytes"] < bound else "**no**"),
            f"{s['peak_rss_anon_bytes'] / MiB:.0f}/{s['peak_rss_file_bytes'] / MiB:.0f}", f"{r['wall_s']:.1f}",
            str(s["blocks"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], methods: list[str], sizes: list[float], path: Path) -> None:
    """Bars of delta RSS per method at each size (with the 25% line, or each bar's bound) and of wall
    time vs I/O floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["size_gib"], r["method"]): r for r in rows}
    many = len(methods) > 6  # one panel above the other, as wide as the methods need
    fig, (ax1, ax2) = (plt.subplots(2, 1, figsize=(max(14.0, 0.45 * len(methods) * len(sizes) + 2), 10.5)) if many
                       else plt.subplots(1, 2, figsize=(14, 5.2)))
    width = 0.8 / max(1, len(sizes))
    xs = range(len(methods))
    for j, size in enumerate(sizes):
        deltas = [by[(size, m)]["delta_bytes"] / MiB if (size, m) in by else 0 for m in methods]
        pos = [x + (j - (len(sizes) - 1) / 2) * width for x in xs]
        bars = ax1.bar(pos, deltas, width, label=f"{size:g} GiB models")
        ax1.bar_label(bars, fmt="%.0f", fontsize=7)
        bounds = [(x, by[(size, m)]["bound_bytes"] / MiB) for x, m in zip(pos, methods)
                  if by.get((size, m), {}).get("bound_bytes")]
        if bounds:
            ax1.scatter(*zip(*bounds), marker="_", s=400, color="black", linewidths=2, zorder=3,
                        label="bound" if j == 0 else None)
        model = next((by[(size, m)]["model_bytes"] for m in methods if (size, m) in by), None)
        if model and not bounds:
            ax1.axhline(0.25 * model / MiB, color=bars.patches[0].get_facecolor(), ls="--", lw=1,
                        label=f"25% of a {size:g} GiB model")
    merged = {m: next((models_cell(r, 0) for r in rows if r["method"] == m and "models_merged" in r), None)
              for m in methods}
    ax1.set_xticks(list(xs), [f"{m} ({merged[m]})" if merged[m] else m for m in methods],
                   **({"rotation": 30, "ha": "right", "fontsize": 8} if many else {}))
    ax1.set_xlabel("method (fine-tunes merged)", fontsize=8)
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


def results_stem(statistics: bool) -> str:
    return "peak_memory_statistics" if statistics else "peak_memory"


def write_reports(results_dir: Path, report: dict[str, Any], methods: list[str], sizes: list[float]) -> str:
    """Write peak_memory{,_statistics}.{json,md,png}; return the markdown."""
    statistics = bool(report.get("statistics"))
    stem = results_stem(statistics)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    m, d = report["machine"], report["disk"]
    fams = "\n".join(f"- {f['size_gib']:g} GiB: hidden {f['hidden']}, {f['layers']} layers, vocab {VOCAB}, "
                     f"lm_head {f['lm_head_rows']} rows, {f['tensors']} tensors, "
                     f"{f['model_bytes'] / MiB:.0f} MiB of tensor data per checkpoint; largest tensor "
                     f"{f['largest_tensor_bytes'] / MiB:.0f} MiB" + (
                         "; statistics per fine-tune " + ", ".join(f"{k} {b / MiB:.0f} MiB"
                                                                  for k, b in f["statistics_bytes"].items())
                         + f", largest Gram {f['largest_gram_bytes'] / MiB:.0f} MiB"
                         if statistics else "") for f in report["families"])
    rd = d["read"]
    env = report.get("child_env") or {}
    env_note = ", child environment " + " ".join(f"{k}={v}" for k, v in env.items()) if env else ""
    gen = (f"{report['generation_s']:.0f} s of it generating models" if report["generation_s"]
           else "models reused from an earlier run")
    load = report.get("load_average")
    load_note = (f" Load average (1 min) {load['start']:.1f} at the start and {load['end']:.1f} at the end on "
                 f"{m['nproc']} cores shared with other work: wall times are noisy, memory figures are not."
                 if load else "")
    title = "of the statistic methods" if statistics else "and wall time"
    legend = STATISTICS_LEGEND if statistics else ""
    md = f"""# blockmerge peak memory {title}

Generated by `benchmarks/peak_memory.py` on {report['date']}.

Command: `{report['command']}`

Runtime: {report['total_s']:.0f} s, {gen}.{load_note}

Machine: {m['cpu']}, {m['nproc']} cores, {m['ram_bytes'] / GiB:.1f} GiB RAM, Linux {m['kernel']}, \
Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads).

Merges: blockmerge at commit {m.get('blockmerge_commit', 'unknown')}, block budget \
{report['block_bytes'] / MiB:.0f} MiB, {report['n_models']} fine-tunes + base generated (each method merges as \
many as it takes and reads the base only where it needs one: column *models*), inputs' page cache \
{'kept (warm)' if report['warm'] else 'dropped before each merge'}{env_note}.

Disk: sequential read {rd['bytes_per_s'] / MiB:.0f} MiB/s ({'cold' if rd['looks_cold'] else 'NOT cold'}: \
{'n/a' if rd['resident_before'] is None else f"{100 * rd['resident_before']:.0f}%"} of pages resident before; \
warm re-read {rd['warm_bytes_per_s'] / MiB:.0f} MiB/s), sequential write + fsync \
{d['write']['bytes_per_s'] / MiB:.0f} MiB/s.
I/O floor = bytes read / read throughput + bytes written / write throughput.

Models (float32, Llama-shaped, fine-tune = base + N(0, {NOISE_STD:g}²)):
{fams}

{statistics_table(report['rows']) if statistics else markdown_table(report['rows'], report['n_models'])}

{legend}- peak RSS = the child's VmHWM at the end, reset to the post-import RSS via /proc/self/clear_refs \
({'done' if all(r['hwm_reset'] for r in report['rows']) else 'NOT available: includes the import'}); \
idle = VmRSS after `import torch, blockmerge`; delta = peak − idle.
- anon/file = the Summary's peak anonymous / file-backed resident bytes (sampled after each block).
{READ_LEGEND[statistics]}

## Targets

```
{chr(10).join(report['targets'])}
```
"""
    if report.get("notes"):
        md += "\n## Notes\n\n" + "\n".join(f"- {n}" for n in report["notes"]) + "\n"
    (results_dir / f"{stem}.md").write_text(md)
    plot(report["rows"], methods, sizes, results_dir / f"{stem}.png")
    return md


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=None,
                   help=f"model sizes in GiB (default: 0.5 1; with --statistics {' '.join(map(str, STATISTICS_SIZES))}"
                        ")")
    p.add_argument("--models", type=int, default=4,
                   help="fine-tunes generated (plus a base); a method merges as many as it takes")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"any registered method (`blockmerge methods`), `mergekit` for "
                        f"{' '.join(MERGEKIT_METHODS)}, or `subspace` for {' '.join(SUBSPACE_METHODS)}; "
                        f"default: {' '.join(DEFAULT_METHODS)}; with --statistics {' '.join(STATISTIC_METHODS)} "
                        f"(plus {REFERENCE_METHOD}, always run as the reference)")
    p.add_argument("--statistics", action="store_true",
                   help="generate statistics stores and measure the statistic methods "
                        "(results in peak_memory_statistics.{md,json,png})")
    p.add_argument("--max-hidden", type=int, default=None,
                   help=f"largest hidden size of the generated models (default: 1024; with --statistics "
                        f"{STATISTICS_MAX_HIDDEN}, so MaTS's K-FAC solves stay affordable on a few cores)")
    p.add_argument("--mats-iterations", type=int, default=10, help="MaTS conjugate-gradient iterations per tensor")
    p.add_argument("--block-size", default=None, help="blockmerge block budget, e.g. 32MiB (default: blockmerge's)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/blockmerge-bench"),
                   help="where models and outputs are written (not in the repository)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                   help="where peak_memory{,_statistics}.{md,json,png} go")
    p.add_argument("--regenerate", action="store_true", help="regenerate models (and statistics) even if they exist")
    p.add_argument("--warm", action="store_true", help="do not drop the inputs' page cache before each merge")
    p.add_argument("--keep-outputs", action="store_true", help="keep merged outputs in the work directory")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the merge children, e.g. MALLOC_MMAP_THRESHOLD_=1048576")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rewrite the .md and .png from the JSON already in --results")
    p.add_argument("--notes", type=Path, help="text file of findings (one per line) added to the report's Notes")
    p.add_argument("--child", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.methods is not None:
        args.methods = list(dict.fromkeys(name for m in args.methods
                                          for name in {"mergekit": MERGEKIT_METHODS,
                                                       "subspace": SUBSPACE_METHODS}.get(m, [m])))
    if args.methods is None:
        args.methods = [REFERENCE_METHOD, *STATISTIC_METHODS] if args.statistics else DEFAULT_METHODS
    elif args.statistics and REFERENCE_METHOD not in args.methods:
        args.methods = [REFERENCE_METHOD, *args.methods]
    needing = [m for m in args.methods if m in STATISTIC_METHODS]
    if needing and not args.statistics:
        p.error(f"--methods {needing[0]} reads statistics: add --statistics")
    args.sizes = args.sizes or (STATISTICS_SIZES if args.statistics else [0.5, 1.0])
    args.max_hidden = args.max_hidden or (STATISTICS_MAX_HIDDEN if args.statistics else 1024)
    return args


def hyperparameters_of(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Hyperparameters a merge is run with (the defaults, but MaTS's iterations)."""
    return {"num_iterations": args.mats_iterations} if method == "mats" else {}


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
        report = json.loads((args.results / f"{results_stem(args.statistics)}.json").read_text())
        report["notes"] = notes or report.get("notes", [])
        methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
        print(write_reports(args.results, report, methods, sorted({r["size_gib"] for r in report["rows"]})))
        return
    from blockmerge.errors import BlockmergeError

    try:
        plans = {m: merge_plan(m, hyperparameters_of(m, args), args.models) for m in args.methods}
    except BlockmergeError as err:
        raise SystemExit(f"--methods: {err}") from None
    reading = [m for m, plan in plans.items() if plan["statistics"]]
    if reading and not args.statistics:
        raise SystemExit(f"--methods {reading[0]} reads statistics: add --statistics")
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

    families, paths, stat_paths = [], {}, {}
    gen_s = 0.0
    for size in sizes:
        fam = family_for(size, args.max_hidden)
        specs = fam.specs()
        print(f"model family {size:g} GiB: hidden {fam.hidden}, {fam.layers} layers", flush=True)
        base, models, spent = ensure_family(workdir, fam, args.models, args.regenerate)
        gen_s += spent
        paths[size] = (fam, base, models)
        families.append({**asdict(fam), "tensors": len(specs), "model_bytes": fam.nbytes(),
                         "largest_tensor_bytes": max(s.nbytes for s in specs.values())})
        if args.statistics:
            stat_paths[size] = ensure_statistics(workdir, fam, args.models, args.regenerate)
            gen_s += stat_paths[size][2]
            by_kind: dict[str, int] = {}
            for (kind, _), spec in statistic_specs(fam, base=False).items():
                by_kind[kind] = by_kind.get(kind, 0) + spec.nbytes
            families[-1]["statistics_bytes"] = by_kind
            families[-1]["largest_gram_bytes"] = max(spec.nbytes for (kind, _), spec in
                                                     statistic_specs(fam, base=False).items() if kind != "fisher")

    print("measuring the disk", flush=True)
    disk = {"read": measure_read(paths[sizes[-1]][2][0]), "write": measure_write(workdir)}
    print(f"  read {disk['read']['bytes_per_s'] / MiB:.0f} MiB/s (cold: {disk['read']['looks_cold']}, "
          f"resident before {disk['read']['resident_before']}), warm {disk['read']['warm_bytes_per_s'] / MiB:.0f} "
          f"MiB/s; write+fsync {disk['write']['bytes_per_s'] / MiB:.0f} MiB/s", flush=True)

    rows = []
    load_start = os.getloadavg()[0]
    for size in sizes:
        fam, base, models = paths[size]
        for method in args.methods:
            out = family_folder(workdir, fam) / f"out-{method}.safetensors"
            hyperparameters = hyperparameters_of(method, args)
            plan = plans[method]
            merged = models[:plan["models"]]
            spec = {"method": method, "models": [str(p) for p in merged], "base": str(base) if plan["base"] else None,
                    "out": str(out), "block_size": args.block_size, "hyperparameters": hyperparameters}
            inputs = [base, *merged] if plan["base"] else merged
            stores = []
            if args.statistics:
                described = method_inputs(method, hyperparameters, fam, plan["models"])
                base_stats, model_stats, _ = stat_paths[size]
                if described["statistics"]:
                    spec["stats"] = [str(p) for p in model_stats[:plan["models"]]]
                    stores += model_stats[:plan["models"]]
                if described["base_statistics"]:
                    spec["base_stats"] = str(base_stats)
                    stores.append(base_stats)
            if not args.warm:
                for p in [*inputs, *(f for store in stores for f in store.rglob("*") if f.is_file())]:
                    drop_cache(p)
            resident = [resident_fraction(p) for p in inputs]
            print(f"merge {method} of {plan['models']} fine-tunes{' and the base' if plan['base'] else ''} at "
                  f"{size:g} GiB ...", flush=True)
            r = run_child(spec, child_env)
            s = r["summary"]
            r["size_gib"] = size
            r["model_bytes"] = fam.nbytes()
            r["hyperparameters"] = hyperparameters
            r["models_merged"], r["base_read"] = plan["models"], plan["base"]
            if args.statistics:
                r["inputs"] = described
                r["bound_bytes"], r["bound_tensor"] = described["bound_bytes"], described["bound_tensor"]
            r["inputs_resident_before"] = resident
            r["io_floor_s"] = (s["bytes_read"] / disk["read"]["bytes_per_s"]
                               + s["bytes_written"] / disk["write"]["bytes_per_s"])
            rows.append(r)
            bound = f", bound {r['bound_bytes'] / MiB:.0f} MiB" if r.get("bound_bytes") else ""
            print(f"  wall {r['wall_s']:.1f} s (floor {r['io_floor_s']:.1f} s), VmHWM {r['vmhwm_bytes'] / MiB:.0f} MiB,"
                  f" idle {r['idle_rss_bytes'] / MiB:.0f} MiB, delta {r['delta_bytes'] / MiB:.0f} MiB "
                  f"({100 * r['delta_bytes'] / r['model_bytes']:.1f}% of a model{bound}), sampled anon/file "
                  f"{r['sampled_peak']['anon'] / MiB:.0f}/{r['sampled_peak']['file'] / MiB:.0f} MiB", flush=True)
            if not args.keep_outputs:
                out.unlink(missing_ok=True)

    targets = check_targets(rows, args.methods, sizes, share=not args.statistics)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command, "machine": machine,
        "statistics": args.statistics, "max_hidden": args.max_hidden,
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
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
