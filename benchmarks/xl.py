"""A 7B-shape family merged on a small machine: blockmerge and mergekit under a hard memory limit.

Builds a family with the geometry of a real model (`--shape 7b`: Llama-2-7B, hidden 4096, 32 layers, MLP
11008, 32 heads, vocab 32000, untied head, 6.74B parameters, 13.5 GB per model in bfloat16): a base,
N(0, 0.02²) (norm weights 1), and two fine-tunes, base + N(0, s²) with s = 1e-3 × a factor in [0.5, 2)
taken from the tensor's name × 1 for ft1 and × 2 for ft2. Tensor names and shapes come from
`transformers.LlamaForCausalLM` built on the meta device; each model is a Hugging Face directory
(config.json, shards of at most 2 GB, model.safetensors.index.json). Every tensor is written row block by
row block (at most 32 MiB of float32 per block) from generators seeded by (tensor, block, model), so
generating the family holds one block at a time, never a tensor: it runs in a child process under the
same kind of memory limit as the merges (`--generate-limit`, 2 GiB) and its peak RSS is reported.

Then, per method, one mergekit YAML (`dtype: bfloat16`, `MERGES`) run by both tools, each run a fresh
process with the inputs' page cache dropped first (`--warm`: pre-read instead):
`python -m blockmerge mergekit-yaml CFG OUT --no-copy-tokenizer --overwrite --random-seed 0` under
`--limit` (2 GiB), and mergekit's `mergekit-yaml CFG OUT --no-copy-tokenizer --lazy-unpickle
--random-seed 0` under each of `--mergekit-limits` (2 GiB and 16 GiB). Recorded per run: wall time, CPU
time (user + system of the process tree), peak RSS (`/usr/bin/time`'s maximum resident set), peak
RssAnon / RssFile (10 ms sampling of /proc/PID/status), the cgroup's peak charge (page cache included),
bytes read and written (blockmerge's summary; for mergekit the files its configuration reads and its
output; for both the block I/O the kernel counted, `ru_inblock` / `ru_oublock`), the exit status and
whether the limit killed it (a result, not an error), and time ÷ the disk floor: the run's input files read
once (cold) + its output's bytes written and fsynced, measured per input set at the start and again at
the end (the mean is used; at 7B each floor reads 27-40 GB, so the floors alone take several minutes).
Outputs are deleted after each run. With `--dask`, task_arithmetic and ties (or those named) run again through
blockmerge's own `python -m blockmerge merge --method ... --base BASE --model FT1 --model FT2 -o OUT` (TIES
with mergekit's settings, `DASK_MERGES`: `merge -c` of a mergekit YAML merges locally whatever `--executor`
says), locally and with `--executor dask` on a scheduler and 2 single-threaded worker processes (`dask
worker --no-nanny`), each worker under the same limit in a group of its own; the sha256 of every output file
is compared, and each worker's peak RSS reported.

How the limit is applied (`--limit-kind`):

- `cgroup` (default when running as root with a writable memory cgroup): what a container does. One fresh
  group per run, created under this process's own memory cgroup and removed after it; cgroup v1:
  `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes`, so swap cannot extend it), peak
  `memory.max_usage_in_bytes`, kills `oom_kill` of `memory.oom_control`; cgroup v2: `memory.max`
  (`memory.swap.max` 0), `memory.peak`, `oom_kill` of `memory.events`. The child enters the group before it
  execs (`sh -c 'echo $$ > GROUP/cgroup.procs && exec ...'`). A cgroup charges the page cache its processes
  read or write as well; that part is reclaimed under pressure, so only memory that cannot be reclaimed
  (anonymous memory, dirty pages not yet written) gets a process killed.
- `prlimit`: RLIMIT_DATA (no root needed), as `prlimit --data=BYTES -- COMMAND`: it counts private writable
  memory (heap and anonymous mappings), not the page cache or read-only file mappings; an allocation
  beyond it fails (MemoryError) instead of being killed.

The same limit by hand: `systemd-run --scope -p MemoryMax=2G -p MemorySwapMax=0 python -m blockmerge
mergekit-yaml CFG OUT`, `docker run --memory 2g --memory-swap 2g ...`, or `prlimit --data=2147483648 python
-m blockmerge mergekit-yaml CFG OUT`.

The 7B run (one run of each tool per method and limit). On 2 cores, scaled from the 1b shape (generation
~9 s per GB written; blockmerge's average ~6 s and TIES ~23 s of merge per GB of the inputs it reads, cold,
under 2 GiB), expect about 6 minutes to generate, 10 for the floors, 45-50 for blockmerge's six methods, 40 for
`--dask`, and mergekit's runs on top (at 16 GiB its TIES alone may take half an hour): 3-4 hours in all.
`--run-timeout` (6 h) stops a run that hangs; at 7B give it 1800: under a 2 GiB limit mergekit does not fail, it
thrashes (its resident set at the limit, its inputs read again and again at the disk's speed) and would take hours,
so the table records it as not finished in 30 minutes. A run that is interrupted resumes with `--resume` (give
`--keep` both times so the family survives): every floor, merge and Dask comparison is journaled in `--workdir` as
it is measured, and a journal of the same settings and the same blockmerge code (its git tree, no uncommitted
edits) is continued.

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5
    python benchmarks/xl.py --shape 7b --mergekit /tmp/mkvenv/bin/mergekit-yaml --dask --keep --run-timeout 1800
    # the warm-cache ratios, on the family kept above (deleted after this run)
    python benchmarks/xl.py --shape 7b --mergekit /tmp/mkvenv/bin/mergekit-yaml --warm \\
        --methods average task_arithmetic --results /tmp/xl-warm

At 7B the inputs of a merge (27-40 GB) are larger than a 24 GiB machine's RAM, so `--warm` runs are only
partly warm; the warm floor is measured the same way (the inputs read again right after a cold read).

Free disk it needs under `--workdir` (the 3 models, one output at a time, 2 GB margin): 7b 56 GB, 3b 30 GB,
1b 11 GB, tiny 2 GB (the margin: it writes 30 MB); it checks before generating and stops if there is not
enough. The family is deleted at the end unless `--keep`; a later run reuses a complete family (family.json
names its shape, version and seeds). Quick checks: `--shape tiny` (a few minutes with mergekit and `--dask`:
every run is a fresh interpreter), `--shape 1b` (about 10 minutes for blockmerge's average and TIES).
Results: benchmarks/results/xl.{md,json} (`--results DIR`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import mergekit_compare as mc
import peak_memory as pm

MiB = 1024**2
GiB = 1024**3
GB = 1e9
REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
FAMILY_VERSION = 1
INIT_STD = 0.02
DELTA_STD = 1e-3
GEN_BLOCK_BYTES = 32 * MiB  # float32 bytes of one generated block
SHARD_BYTES = 2 * 10**9
DISK_MARGIN = 2 * 10**9
ROLES = ("base", "ft1", "ft2")
TIME = "/usr/bin/time"
TIME_MARK = "XL-TIME "
RSS_TARGET = GiB  # blockmerge's peak RSS, every statistic-free method
FLOOR_TARGET = 1.5  # warm average and task_arithmetic: merge time ÷ floor
TOOLS = ("blockmerge", "mergekit")
DASK_WORKERS = 2
# The Dask comparison runs blockmerge's own `merge` command (a mergekit YAML given to `merge -c` is merged here,
# whatever --executor says), with the models, base and output dtype of the mergekit configurations, and TIES as
# mergekit computes it (a density per tensor, exactly int(d·K) entries, ties of the sign vote to +).
DASK_MERGES: dict[str, list[str]] = {
    "task_arithmetic": ["--method", "task_arithmetic"],
    "ties": ["--method", "ties", "--set", "density=0.2", "--set", "trim=block", "--set", "exact_count=true",
             "--set", "majority_sign=plus"],
}

SHAPES: dict[str, dict[str, Any]] = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "3b": dict(hidden_size=3200, num_hidden_layers=26, intermediate_size=8640, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=688, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=4096, max_position_embeddings=2048, rms_norm_eps=1e-5),
}
SHAPE_NAMES = {"7b": "Llama-2-7B", "3b": "open_llama_3b", "1b": "TinyLlama-1.1B", "tiny": "tiny, for development"}


def model(name: str, **parameters: Any) -> dict[str, Any]:
    return {"model": name, "parameters": parameters} if parameters else {"model": name}


def fine_tunes(**parameters: Any) -> list[dict[str, Any]]:
    return [model("{ft1}", **parameters), model("{ft2}", **parameters)]


# method -> its mergekit configuration ({base}, {ft1}, {ft2}: the family's directories); written with dtype: bfloat16
MERGES: dict[str, dict[str, Any]] = {
    "average": {"merge_method": "linear", "models": fine_tunes(weight=1.0)},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "{base}", "models": fine_tunes(weight=1.0)},
    "ties": {"merge_method": "ties", "base_model": "{base}", "models": fine_tunes(weight=1.0, density=0.2)},
    "dare_linear": {"merge_method": "dare_linear", "base_model": "{base}",
                    "models": fine_tunes(weight=1.0, density=0.1)},
    "slerp": {"merge_method": "slerp", "base_model": "{base}", "models": [model("{base}"), model("{ft1}")],
              "parameters": {"t": 0.5}},
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "{base}",
                    "models": fine_tunes(weight=1.0, density=0.9, gamma=0.01)},
}


# --------------------------------------------------------------------------------------------- sizes


SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
              "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_size(text: str) -> int:
    """Bytes of '2GiB', '150MiB', '2G' (binary, as docker and systemd read it), '2GB' (decimal) or '1234'."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MiB, 2000000000)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def decimal(n: float, unit: str = "B") -> str:
    """13.48 GB, 7.4 MB; 6.74B, 3.7M (unit "")."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            if not unit:
                prefix = {"G": "B"}.get(prefix, prefix)
            return f"{n / scale:.3g} {prefix}{unit}" if unit else f"{n / scale:.3g}{prefix}"
    return f"{n:.0f} {unit}".strip()


def size_label(nbytes: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB)):
        if nbytes >= scale and nbytes % (scale // 16) == 0:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


# --------------------------------------------------------------------------------------------- memory limits


class Cgroups:
    """Memory cgroups (v1 or v2) made under this process's own group, one per run, with a hard limit."""

    def __init__(self) -> None:
        self.version, self.parent, self.count = 0, None, 0
        own = {}
        try:
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                number, controllers, path = line.split(":", 2)
                own["v2" if number == "0" else ",".join(sorted(controllers.split(",")))] = path
        except OSError:
            return
        v1 = Path("/sys/fs/cgroup/memory")
        v2 = Path("/sys/fs/cgroup")
        if (v1 / "memory.limit_in_bytes").is_file():
            path = next((p for c, p in own.items() if "memory" in c.split(",")), "/")
            self.version, self.parent = 1, self._writable(v1, path)
        elif (v2 / "cgroup.controllers").is_file() and "memory" in (v2 / "cgroup.controllers").read_text().split():
            self.version, self.parent = 2, self._writable(v2, own.get("v2", "/"))

    @staticmethod
    def _writable(mount: Path, path: str) -> Path | None:
        for candidate in (mount / path.lstrip("/"), mount):
            if candidate.is_dir() and os.access(candidate, os.W_OK):
                return candidate
        return None

    def usable(self) -> bool:
        return self.parent is not None and os.geteuid() == 0

    def describe(self) -> str:
        return f"cgroup v{self.version} under {self.parent}" if self.usable() else "no writable memory cgroup"

    def create(self, nbytes: int) -> Path:
        assert self.parent is not None
        self.count += 1
        group = self.parent / f"blockmerge-xl-{os.getpid()}-{self.count}"
        if group.exists():
            group.rmdir()
        if self.version == 2:
            try:  # the parent must hand the memory controller down to its children
                (self.parent / "cgroup.subtree_control").write_text("+memory")
            except OSError as err:
                raise SystemExit(f"cannot enable the memory controller below {self.parent} ({err.strerror}): "
                                 "run this under a delegated cgroup, or use --limit-kind prlimit") from None
        group.mkdir()
        try:
            if self.version == 1:
                (group / "memory.limit_in_bytes").write_text(str(nbytes))
                if (group / "memory.memsw.limit_in_bytes").exists():
                    (group / "memory.memsw.limit_in_bytes").write_text(str(nbytes))
            else:
                (group / "memory.max").write_text(str(nbytes))
                if (group / "memory.swap.max").exists():
                    (group / "memory.swap.max").write_text("0")
        except OSError:
            group.rmdir()
            raise
        return group

    def stats(self, group: Path) -> dict[str, int]:
        """Peak charge (page cache included), times the limit was hit, processes the OOM killer killed."""
        def read(name: str) -> str:
            try:
                return (group / name).read_text()
            except OSError:
                return ""

        def field(text: str, key: str) -> int:
            return next((int(line.split()[1]) for line in text.splitlines() if line.split()[:1] == [key]), 0)

        if self.version == 1:
            return {"peak_bytes": int(read("memory.max_usage_in_bytes") or 0),
                    "failcnt": int(read("memory.failcnt") or 0),
                    "oom_kills": field(read("memory.oom_control"), "oom_kill")}
        events = read("memory.events")
        return {"peak_bytes": int(read("memory.peak") or 0), "failcnt": field(events, "max"),
                "oom_kills": field(events, "oom_kill")}

    @staticmethod
    def remove(group: Path) -> None:
        for _ in range(50):
            try:
                group.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        print(f"warning: could not remove {group}", flush=True)


CGROUPS = Cgroups()


def set_data_limit(nbytes: int) -> Any:
    return lambda: resource.setrlimit(resource.RLIMIT_DATA, (nbytes, nbytes))


# --------------------------------------------------------------------------------------------- measured children


def child_of(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def sample(pid: int, peaks: dict[str, int], io: dict[str, int], stop: threading.Event) -> None:
    """Every 10 ms: peaks of RssAnon / RssFile / VmHWM and the last I/O counters of the process under
    /usr/bin/time (`pid`)."""
    while not stop.is_set():
        child = child_of(pid)
        if child:
            try:
                for line in Path(f"/proc/{child}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in ("RssAnon", "RssFile", "VmHWM"):
                        peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)
                for line in Path(f"/proc/{child}/io").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in ("rchar", "wchar", "read_bytes", "write_bytes"):
                        io[key] = max(io.get(key, 0), int(value))
            except (OSError, ValueError):
                pass
        stop.wait(0.01)


OOM_TEXT = ("MemoryError", "Cannot allocate memory", "can't allocate memory", "std::bad_alloc", "out of memory")


class Launch:
    """One fresh process under a memory limit and /usr/bin/time, its memory sampled, measured when it ends."""

    def __init__(self, argv: list[str], kind: str, limit: int, log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.kind, self.limit, self.log_path = kind, limit, log
        self.group = CGROUPS.create(limit) if kind == "cgroup" else None
        prefix: list[str] = []
        preexec = None
        if self.group is not None:
            prefix = ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh", str(self.group / "cgroup.procs")]
        elif shutil.which("prlimit"):
            prefix = [shutil.which("prlimit") or "prlimit", f"--data={limit}", "--"]
        else:
            preexec = set_data_limit(limit)
        self.argv = argv
        self.log = open(log, "w+")
        self.start = time.perf_counter()
        try:
            self.proc = subprocess.Popen([*prefix, TIME, "-f", TIME_MARK + "%e %U %S %M", *argv], stdout=self.log,
                                         stderr=subprocess.STDOUT, env=env, cwd=cwd, preexec_fn=preexec)
        except BaseException:
            self.log.close()
            if self.group is not None:
                CGROUPS.remove(self.group)
            raise
        self.peaks: dict[str, int] = {}
        self.io: dict[str, int] = {}
        self.stop = threading.Event()
        self.sampler = threading.Thread(target=sample, args=(self.proc.pid, self.peaks, self.io, self.stop),
                                        daemon=True)
        self.sampler.start()
        self.result: dict[str, Any] | None = None
        self.ended: tuple[int, Any, float] | None = None

    def signal(self, sig: int) -> None:
        """Signal the measured process (SIGKILL: /usr/bin/time above it too)."""
        for pid in (child_of(self.proc.pid), self.proc.pid if sig == signal.SIGKILL else None):
            if pid:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    def poll(self) -> bool:
        """Whether the process has ended (reaped here, measured by `finish`)."""
        if self.ended is None:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.ended = (status, usage, time.perf_counter())
        return self.ended is not None

    def finish(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the process (past `timeout` seconds: SIGTERM, 10 s later SIGKILL) and measure it."""
        if self.result is not None:
            return self.result
        deadline = None if timeout is None else time.monotonic() + timeout
        escalation = [signal.SIGTERM, signal.SIGKILL]
        timed_out = False
        while self.ended is None:
            if deadline is None:
                _, status, usage = os.wait4(self.proc.pid, 0)
                self.ended = (status, usage, time.perf_counter())
            elif not self.poll():
                if time.monotonic() > deadline:
                    timed_out = True
                    self.signal(escalation.pop(0))
                    deadline = time.monotonic() + 10 if escalation else None
                time.sleep(0.05)
        status, usage, end = self.ended
        wall = end - self.start
        self.stop.set()
        self.sampler.join()
        self.proc.returncode = rc = os.waitstatus_to_exitcode(status)
        self.log.seek(0)
        text = self.log.read()
        self.log.close()
        timed = [line[len(TIME_MARK):].split() for line in text.splitlines() if line.startswith(TIME_MARK)]
        group = CGROUPS.stats(self.group) if self.group else {}
        if self.group:
            CGROUPS.remove(self.group)
        signalled = rc in (137, -9) or "terminated by signal 9" in text
        if rc == 0:
            outcome = "ok"
        elif timed_out:
            outcome = f"timed out after {wall:.0f} s"
        elif group.get("oom_kills") or (self.group and signalled):
            outcome = "killed"
        elif self.kind == "prlimit" and any(s in text for s in OOM_TEXT):
            outcome = "out of memory"
        else:
            outcome = f"failed (exit {rc})"
        self.result = {
            "outcome": outcome, "returncode": rc, "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "maxrss_bytes": int(timed[-1][3]) * 1024 if timed else None,
            "sampled_anon_bytes": self.peaks.get("RssAnon"), "sampled_file_bytes": self.peaks.get("RssFile"),
            "block_read_bytes": usage.ru_inblock * 512, "block_written_bytes": usage.ru_oublock * 512,
            "io_sampled": dict(self.io), "limit_kind": self.kind, "limit_bytes": self.limit,
            "cgroup_peak_bytes": group.get("peak_bytes"), "cgroup_failcnt": group.get("failcnt"),
            "oom_kills": group.get("oom_kills"), "log_tail": None if rc == 0 else text[-3000:],
        }
        return self.result


def python_env() -> dict[str, str]:
    """This interpreter's environment with the repository first on the path (blockmerge, and Dask workers)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


def measured(argv: list[str], kind: str, limit: int, log: Path, **kwargs: Any) -> dict[str, Any]:
    return Launch(argv, kind, limit, log, **kwargs).finish()


def describe_outcome(r: dict[str, Any]) -> str:
    if r["outcome"] == "killed":
        return f"killed at {size_label(r['limit_bytes'])}"
    if r["outcome"] == "out of memory":
        return f"out of memory at {size_label(r['limit_bytes'])}"
    return r["outcome"]


# --------------------------------------------------------------------------------------------- the family


def identity(shape: str) -> dict[str, Any]:
    return {"version": FAMILY_VERSION, "shape": shape, "geometry": SHAPES[shape], "dtype": "bfloat16",
            "init_std": INIT_STD, "delta_std": DELTA_STD, "delta_factor": "2^(2u-1) × k, u = crc32(name) / 2^32",
            "seed": "crc32(name|block|role)", "gen_block_bytes": GEN_BLOCK_BYTES, "shard_bytes": SHARD_BYTES,
            "roles": list(ROLES)}


def family_dirs(root: Path) -> dict[str, Path]:
    return {role: root / role for role in ROLES}


def family_complete(root: Path, shape: str) -> dict[str, Any] | None:
    """The stamp of a complete family of this shape at `root` (every file there with its recorded size), else None."""
    try:
        stamp = json.loads((root / "family.json").read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("identity") != identity(shape):
        return None
    for role, files in stamp.get("files", {}).items():
        for name, size in files.items():
            path = root / role / name
            if not path.is_file() or path.stat().st_size != size:
                return None
    return stamp


def describe_child(shape: str, out: Path) -> None:
    """(child) Tensor names and shapes of LlamaForCausalLM with this geometry, their shards, and config.json."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from blockmerge.engine.sinks import shard_names
    from blockmerge.engine.tensors import TensorSpec

    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        state = LlamaForCausalLM(config).state_dict()
    specs = {name: TensorSpec(tuple(t.shape), "bfloat16") for name, t in state.items()}
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        saved = json.loads((Path(tmp) / "config.json").read_text())
    saved["architectures"] = ["LlamaForCausalLM"]
    saved["torch_dtype"] = "bfloat16"
    if "dtype" in saved:
        saved["dtype"] = "bfloat16"
    out.write_text(json.dumps({"config": saved, "tensors": {n: list(s.shape) for n, s in specs.items()},
                               "files": shard_names(specs, SHARD_BYTES)}))


def seeded(name: str, block: int, role: str) -> Any:
    import torch

    return torch.Generator().manual_seed(zlib.crc32(f"{name}|{block}|{role}".encode()))


def delta_std(name: str, k: int) -> float:
    """The scale of fine-tune k's task vector on tensor `name`: 1e-3 × a factor in [0.5, 2) from the name × k."""
    return DELTA_STD * 2 ** (2 * zlib.crc32(name.encode()) / 2**32 - 1) * k


def generate_child(plan_path: Path, root: Path) -> None:
    """(child) Write base/, ft1/, ft2/ shard by shard, each tensor block by block (one block in memory)."""
    import torch

    from blockmerge.engine.safetensors_io import SafetensorsWriter
    from blockmerge.engine.tensors import TensorSpec

    plan = json.loads(plan_path.read_text())
    specs = {name: TensorSpec(tuple(shape), "bfloat16") for name, shape in plan["tensors"].items()}
    files: dict[str, list[str]] = {}
    for name in sorted(specs):
        files.setdefault(plan["files"][name], []).append(name)
    dirs = family_dirs(root)
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(plan["config"], indent=2) + "\n")
    start, done = time.perf_counter(), 0
    total = sum(s.nbytes for s in specs.values()) * len(ROLES)
    for file, names in files.items():
        parts = {role: d / (file + ".part") for role, d in dirs.items()}
        for p in parts.values():
            p.unlink(missing_ok=True)
        writers = {role: SafetensorsWriter(p, {n: specs[n] for n in names}, {"format": "pt"})
                   for role, p in parts.items()}
        try:
            for name in names:
                spec = specs[name]
                step = max(1, GEN_BLOCK_BYTES // (spec.row_numel * 4))
                for block, first in enumerate(range(0, spec.rows, step)):
                    shape = (min(spec.rows, first + step) - first, *spec.shape[1:])
                    if name.endswith("norm.weight"):
                        base = torch.ones(shape)
                    else:
                        base = torch.randn(shape, generator=seeded(name, block, "base")).mul_(INIT_STD)
                    writers["base"].write(name, first, base.to(torch.bfloat16))
                    for k, role in enumerate(ROLES[1:], start=1):
                        tuned = torch.randn(shape, generator=seeded(name, block, role))
                        tuned.mul_(delta_std(name, k)).add_(base)
                        writers[role].write(name, first, tuned.to(torch.bfloat16))
                        del tuned
                    del base
                done += spec.nbytes * len(ROLES)
        finally:
            for w in writers.values():
                w.close(sync=True)
        for role, p in parts.items():
            os.replace(p, dirs[role] / file)
        print(f"  {file}: {decimal(done)} of {decimal(total)}, {time.perf_counter() - start:.0f} s", flush=True)
    for d in dirs.values():
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs.values())}, "weight_map": plan["files"]}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")


def ensure_family(args: argparse.Namespace, root: Path, kind: str) -> tuple[dict[str, Path], dict[str, Any]]:
    """The family at `root`, generated (in a child process, under `--generate-limit`) unless a complete one is
    there; with what generating it cost."""
    stamp = family_complete(root, args.shape)
    if stamp:
        model_bytes = stamp["model_bytes"]
        need = model_bytes + DISK_MARGIN
        free = shutil.disk_usage(root).free
        print(f"family: reusing the complete {args.shape} family at {root}; needs {decimal(need)} free for an "
              f"output, {decimal(free)} free", flush=True)
        if free < need:
            raise SystemExit(f"not enough free disk under {root}: {decimal(need)} needed, {decimal(free)} free")
        return family_dirs(root), {**stamp, "reused": True}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    plan_path = root / "plan.json"
    done = subprocess.run([sys.executable, __file__, "--describe", args.shape, str(plan_path)], env=python_env(),
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"describing the {args.shape} shape failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    plan = json.loads(plan_path.read_text())
    parameters = sum(_numel(s) for s in plan["tensors"].values())
    model_bytes = 2 * parameters
    need = len(ROLES) * model_bytes + model_bytes + DISK_MARGIN
    free = shutil.disk_usage(root).free
    print(f"family: {args.shape} ({SHAPE_NAMES[args.shape]}): {decimal(parameters, '')} parameters, "
          f"{decimal(model_bytes)} per model; needs {decimal(need)} free under {root} (3 models, one output, "
          f"{decimal(DISK_MARGIN)} margin); {decimal(free)} free", flush=True)
    if free < need:
        shutil.rmtree(root, ignore_errors=True)
        raise SystemExit(f"not enough free disk under {root}: {decimal(need)} needed, {decimal(free)} free "
                         "(--workdir elsewhere, or a smaller --shape)")
    print(f"family: generating base, ft1, ft2 ({decimal(len(ROLES) * model_bytes)}) under a {kind} limit of "
          f"{size_label(args.generate_limit)}", flush=True)
    run = measured([sys.executable, __file__, "--generate", str(plan_path), str(root)], kind, args.generate_limit,
                   root / "generate.log", env=python_env(), cwd=REPO)
    if run["outcome"] != "ok":
        shutil.rmtree(root, ignore_errors=True)
        raise SystemExit(f"generating the family: {describe_outcome(run)}\n{run['log_tail']}")
    files = {role: {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.is_file()}
             for role, d in family_dirs(root).items()}
    stamp = {"identity": identity(args.shape), "parameters": parameters, "model_bytes": model_bytes,
             "shards": len(set(plan["files"].values())), "files": files,
             "generation": {k: run[k] for k in ("wall_s", "cpu_s", "maxrss_bytes", "sampled_anon_bytes",
                                                "sampled_file_bytes", "block_written_bytes", "cgroup_peak_bytes",
                                                "limit_kind", "limit_bytes")}}
    (root / "family.json").write_text(json.dumps(stamp, indent=1))
    (root / "generate.log").unlink(missing_ok=True)
    g = stamp["generation"]
    print(f"family: generated in {g['wall_s']:.1f} s (CPU {g['cpu_s']:.1f} s), peak RSS "
          f"{g['maxrss_bytes'] / MiB:.0f} MiB, {decimal(len(ROLES) * model_bytes / g['wall_s'])}/s", flush=True)
    return family_dirs(root), {**stamp, "reused": False}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def weight_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


# --------------------------------------------------------------------------------------------- merges


def roles(config: dict[str, Any]) -> list[str]:
    names = [config.get("base_model"), *(m["model"] for m in config.get("models", []))]
    return list(dict.fromkeys(n.strip("{}") for n in names if n))


def write_config(method: str, dirs: dict[str, Path], path: Path) -> Path:
    import yaml

    text = json.dumps(MERGES[method])
    for role, d in dirs.items():
        text = text.replace("{" + role + "}", str(d))
    path.write_text(yaml.safe_dump({**json.loads(text), "dtype": "bfloat16"}, sort_keys=False))
    return path


def tool_argv(tool: str, cfg: Path, out: Path, mergekit: str | None) -> list[str]:
    if tool == "blockmerge":
        return [sys.executable, "-m", "blockmerge", "mergekit-yaml", str(cfg), str(out), "--no-copy-tokenizer",
                "--overwrite", "--random-seed", "0"]
    return [str(mergekit), str(cfg), str(out), "--no-copy-tokenizer", "--lazy-unpickle", "--random-seed", "0"]


def clear_cache(paths: list[Path]) -> None:
    """The inputs' page cache dropped: all of it as root, else each file's clean pages (fadvise)."""
    if mc.can_drop_caches():
        mc.drop_caches()
    else:
        for p in paths:
            pm.drop_cache(p)


def prepare_cache(inputs: list[Path], warm: bool) -> None:
    if warm:
        mc.read_files(inputs)
    else:
        clear_cache(inputs)


def disk_floor(inputs: list[Path], out_bytes: int, scratch: Path, warm: bool) -> dict[str, float]:
    """Seconds to read `inputs` once with the page cache dropped, to write + fsync `out_bytes`, and (warm) to read
    the inputs again right after."""
    clear_cache(inputs)
    nbytes, cold = mc.read_files(inputs)
    floor = {"read_bytes": nbytes, "read_cold_s": cold, "write_s": mc.write_file(scratch / "floor-write.bin",
                                                                                  out_bytes)}
    floor["cold_s"] = floor["read_cold_s"] + floor["write_s"]
    if warm:
        floor["read_warm_s"] = mc.read_files(inputs)[1]
        floor["warm_s"] = floor["read_warm_s"] + floor["write_s"]
    return floor


def output_files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()} \
        if out.is_dir() else {}


def digests(out: Path) -> dict[str, str]:
    """sha256 of every file of an output directory."""
    result = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(16 * MiB):
                    h.update(chunk)
            result[str(p.relative_to(out))] = h.hexdigest()
    return result


def blockmerge_figures(text: str) -> dict[str, Any]:
    try:
        own = mc.parse_blockmerge_table(text)
    except RuntimeError:
        return {}
    return {"merge_s": own["merge_s"], "summary_anon_bytes": int(own["anon"]),
            "summary_file_bytes": int(own["file"]), "read_bytes": int(own["read"]),
            "written_bytes": int(own["written"])}


def one_run(tool: str, method: str, cfg: Path, inputs: list[Path], out: Path, kind: str, limit: int,
            args: argparse.Namespace, log: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    prepare_cache(inputs, args.warm)
    env = python_env() if tool == "blockmerge" else None
    r = Launch(tool_argv(tool, cfg, out, args.mergekit), kind, limit, log, env=env, cwd=REPO).finish(
        args.run_timeout or None)
    text = log.read_text()
    files = output_files(out)
    row = {"method": method, "tool": tool, "cache": "warm" if args.warm else "cold", "inputs": inputs_key(inputs),
           **r, "output_bytes": sum(files.values()),
           "output_weight_bytes": sum(s for n, s in files.items() if n.endswith(".safetensors")),
           "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if tool == "blockmerge":
        row.update(blockmerge_figures(text))
    else:
        row["read_bytes"] = sum(p.stat().st_size for p in inputs) if r["outcome"] == "ok" else None
        row["written_bytes"] = row["output_weight_bytes"] if r["outcome"] == "ok" else None
    shutil.rmtree(out, ignore_errors=True)
    log.unlink(missing_ok=True)
    print(f"  {tool:10s} {method:16s} limit {size_label(limit):>8s}: {describe_outcome(r):22s} "
          f"wall {r['wall_s']:7.1f} s  CPU {r['cpu_s']:7.1f} s  peak RSS {(r['maxrss_bytes'] or 0) / MiB:6.0f} MiB"
          + (f"  merge {row['merge_s']:.1f} s" if row.get("merge_s") is not None else ""), flush=True)
    return row


def inputs_key(inputs: list[Path]) -> str:
    return "+".join(dict.fromkeys(p.parent.name for p in inputs))


# --------------------------------------------------------------------------------------------- Dask


WAIT_WORKERS = """
import importlib, json, sys
from distributed import Client
def rss(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
client = Client(scheduler_file=sys.argv[1], timeout=60)
client.wait_for_workers(int(sys.argv[2]), timeout=300)
client.run(importlib.import_module, "blockmerge.engine.cluster")  # torch and blockmerge imported before the clock
print(json.dumps(client.run(rss, "VmRSS")))
client.close()
"""

SHUTDOWN = """
import json, sys
from distributed import Client
def rss(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
client = Client(scheduler_file=sys.argv[1], timeout=60)
print(json.dumps(client.run(rss, "VmHWM")))
client.shutdown()
"""


def helper(code: str, args: list[str], workers: list[Launch], timeout: float) -> str | None:
    """Run a Dask client snippet; None if a worker ends (or `timeout` passes) before it does."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=python_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if any(w.poll() for w in workers) or time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            return None
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"Dask client snippet failed ({proc.returncode}):\n{err[-3000:]}")
    return out.strip().splitlines()[-1]


def native_argv(method: str, dirs: dict[str, Path], out: Path) -> list[str]:
    """`blockmerge merge` of the method on the base and both fine-tunes into `out` (bfloat16)."""
    return [sys.executable, "-m", "blockmerge", "merge", *DASK_MERGES[method], "--base", str(dirs["base"]),
            "--model", str(dirs["ft1"]), "--model", str(dirs["ft2"]), "--dtype", "bfloat16", "-o", str(out),
            "--overwrite"]


def dask_merge(argv: list[str], out: Path, inputs: list[Path], kind: str, limit: int, args: argparse.Namespace,
               logs: Path) -> dict[str, Any]:
    """`argv` (a `blockmerge merge`) with `--executor dask` on a fresh scheduler and 2 worker processes, each
    worker under the limit in a group of its own (the client too); the client's and the workers' figures. A worker
    the limit kills makes the run's outcome `killed`."""
    space = logs / "dask-space"
    space.mkdir(exist_ok=True)
    scheduler_file = logs / "scheduler.json"
    scheduler_file.unlink(missing_ok=True)
    scheduler_log = open(logs / "scheduler.log", "w")
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                                 stdout=scheduler_log, stderr=subprocess.STDOUT, env=python_env(), cwd=REPO)
    workers: list[Launch] = []
    result: dict[str, Any] = {}
    shut_down = False
    try:
        deadline = time.monotonic() + 120
        while not scheduler_file.is_file() or not scheduler_file.read_text().strip():
            if time.monotonic() > deadline or scheduler.poll() is not None:
                raise RuntimeError(f"the Dask scheduler did not start: {(logs / 'scheduler.log').read_text()[-2000:]}")
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for i in range(DASK_WORKERS):
            workers.append(Launch([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                   str(scheduler_file), "--nthreads", "1", "--nworkers", "1", "--no-nanny",
                                   "--memory-limit", "0", "--no-dashboard", "--local-directory", str(space),
                                   "--name", f"worker-{i}"], kind, limit, logs / f"worker-{i}.log",
                                  env=python_env(), cwd=REPO))
        idle = helper(WAIT_WORKERS, [str(scheduler_file), str(DASK_WORKERS)], workers, 600)
        if idle is not None:
            result["worker_idle_rss_bytes"] = [v for _, v in sorted(json.loads(idle).items())]
            prepare_cache(inputs, args.warm)
            client = Launch([*argv, "--executor", "dask", "--scheduler", address], kind, limit,
                            logs / "dask-client.log", env=python_env(), cwd=REPO)
            grace = None
            while not client.poll():
                if all(w.poll() for w in workers):  # nothing left to run its tasks: it would wait for ever
                    client.signal(signal.SIGTERM)
                    grace = 30.0
                    break
                if args.run_timeout and time.perf_counter() - client.start > args.run_timeout:
                    grace = 0.01
                    break
                time.sleep(0.5)
            result.update(client.finish(timeout=grace))
            result.update(blockmerge_figures((logs / "dask-client.log").read_text()))
            hwm = helper(SHUTDOWN, [str(scheduler_file)], [], 120)
            shut_down = hwm is not None
            if hwm is not None:
                result["worker_vmhwm_bytes"] = [v for _, v in sorted(json.loads(hwm).items())]
    finally:
        if not shut_down:
            scheduler.terminate()
        result["worker_runs"] = [{k: v for k, v in w.finish(timeout=60 if shut_down else 5).items()
                                  if k != "io_sampled"} for w in workers]
        try:
            scheduler.wait(timeout=30)
        except subprocess.TimeoutExpired:
            scheduler.kill()
            scheduler.wait()
        scheduler_log.close()
    killed = [w for w in result["worker_runs"] if w["outcome"] == "killed"]
    if "outcome" not in result and result["worker_runs"]:  # a worker ended before the merge could start
        bad = killed[0] if killed else next((w for w in result["worker_runs"] if w["outcome"] != "ok"),
                                            result["worker_runs"][0])
        result.update({k: v for k, v in bad.items() if k != "log_tail"}, log_tail=bad["log_tail"],
                      wall_s=0.0, cpu_s=0.0, maxrss_bytes=None)
        result["outcome"] = bad["outcome"] if bad["outcome"] != "ok" else "failed (a worker ended)"
    elif result.get("outcome") != "ok" and killed:
        result["outcome"] = "killed"
    if killed:
        result["killed_in"] = "worker"
    return result


def dask_compare(method: str, dirs: dict[str, Path], inputs: list[Path], outs: Path, kind: str, limit: int,
                 args: argparse.Namespace) -> list[dict[str, Any]]:
    """The same `blockmerge merge` locally and on Dask; their outputs' sha256 compared."""
    rows = []
    reference = None
    for executor in ("local", "dask"):
        out = outs / f"dask-compare-{method}-{executor}"
        shutil.rmtree(out, ignore_errors=True)
        log = outs / f"{executor}.log"
        if executor == "local":
            prepare_cache(inputs, args.warm)
            r = Launch(native_argv(method, dirs, out), kind, limit, log, env=python_env(), cwd=REPO).finish(
                args.run_timeout or None)
            r.update(blockmerge_figures(log.read_text()))
            log.unlink(missing_ok=True)
        else:
            r = dask_merge(native_argv(method, dirs, out), out, inputs, kind, limit, args, outs)
        r.pop("io_sampled", None)
        files = digests(out) if r["outcome"] == "ok" else {}
        shutil.rmtree(out, ignore_errors=True)
        reference = files if reference is None else reference
        row = {"method": method, "executor": executor, "worker_count": DASK_WORKERS if executor == "dask" else 0, **r,
               "sha256": files, "identical_to_local": bool(files) and files == reference,
               "weights_identical_to_local": bool(files) and all(
                   reference.get(n) == h for n, h in files.items() if n.endswith(".safetensors"))}
        rows.append(row)
        workers = ", ".join(f"{(w['maxrss_bytes'] or 0) / MiB:.0f}" for w in r.get("worker_runs", []))
        print(f"  blockmerge merge {method:16s} {executor:5s}: {describe_outcome(r):22s} wall {r['wall_s']:7.1f} s  "
              f"peak RSS {(r['maxrss_bytes'] or 0) / MiB:6.0f} MiB" + (f" (workers {workers} MiB)" if workers else "")
              + (f"  identical to local: {row['identical_to_local']}" if executor == "dask" and files else ""),
              flush=True)
    return rows


# --------------------------------------------------------------------------------------------- report


def fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def mib(nbytes: float | None) -> str:
    return fmt(None if nbytes is None else nbytes / MiB, ".0f")


def gb(nbytes: float | None) -> str:
    return fmt(None if nbytes is None else nbytes / GB, ".2f")


def floor_of(result: dict[str, Any], inputs: str, cache: str) -> float | None:
    """The floor a run is compared with: the mean of those measured at the start and at the end."""
    taken = [f[f"{cache}_s"] for f in result["floors"].get(inputs, {}).values() if f and f"{cache}_s" in f]
    return sum(taken) / len(taken) if taken else None


def add_ratios(result: dict[str, Any]) -> None:
    for r in [*result["runs"], *result["dask"]]:
        cache = r.get("cache", "warm" if result["warm"] else "cold")
        floor = floor_of(result, r["inputs"], cache)
        ok = r["outcome"] == "ok" and floor
        r["floor_s"] = floor
        r["wall_over_floor"] = r["wall_s"] / floor if ok else None
        r["merge_over_floor"] = r["merge_s"] / floor if ok and r.get("merge_s") is not None else None
        cold = floor_of(result, r["inputs"], "cold")
        r["merge_over_cold_floor"] = r["merge_s"] / cold if ok and cold and r.get("merge_s") is not None else None


def targets(result: dict[str, Any]) -> list[tuple[str, bool | None]]:
    out: list[tuple[str, bool | None]] = []
    bm = [r for r in result["runs"] if r["tool"] == "blockmerge"]
    for r in bm:
        out.append((f"{r['method']}: blockmerge completes under the {size_label(r['limit_bytes'])} limit "
                    f"({describe_outcome(r)})", r["outcome"] == "ok"))
        rss = r["maxrss_bytes"]
        out.append((f"{r['method']}: blockmerge's peak RSS {mib(rss)} MiB <= {RSS_TARGET / MiB:.0f} MiB"
                    + ("" if r["outcome"] == "ok" else " (it did not complete)"),
                    rss is not None and r["outcome"] == "ok" and rss <= RSS_TARGET))
    for r in bm:
        if r["method"] in ("average", "task_arithmetic"):
            if result["warm"]:
                ratio = r.get("merge_over_floor")
                out.append((f"{r['method']}: warm-cache merge time {fmt(ratio, '.2f')}x the warm disk floor "
                            f"(<= {FLOOR_TARGET:g}; {fmt(r.get('merge_over_cold_floor'), '.2f')}x the cold floor)",
                            ratio is not None and ratio <= FLOOR_TARGET))
            else:
                out.append((f"{r['method']}: warm-cache merge time <= {FLOOR_TARGET:g}x the floor: not measured "
                            f"(cold run: {fmt(r.get('merge_over_floor'), '.2f')}x the cold floor; run with --warm)",
                            None))
    for r in result["dask"]:
        if r["executor"] == "dask":
            out.append((f"{r['method']}: Dask's output ({DASK_WORKERS} workers) byte-identical to the local "
                        "`blockmerge merge`", r["identical_to_local"]))
    return out


def mergekit_cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "not run"
    if r["outcome"] != "ok":
        return f"**{describe_outcome(r)}** after {r['wall_s']:.0f} s, peak RSS {mib(r['maxrss_bytes'])} MiB"
    return f"{r['wall_s']:.1f} s, {mib(r['maxrss_bytes'])} MiB, {fmt(r.get('wall_over_floor'), '.2f')}x"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    fam = result["family"]
    g = fam["generation"]
    geometry = SHAPES[result["shape"]]
    cache = "warm" if result["warm"] else "cold"
    lines = [
        f"# blockmerge and mergekit on a {result['shape']}-shape family under a hard memory limit", "",
        f"Machine: {m['cpu']}, {m['nproc']} cores, {m['ram_bytes'] / GiB:.0f} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}, torch {m['torch']}, blockmerge {m['blockmerge_commit']}, mergekit "
        f"{result.get('mergekit_version') or 'not run'}; load average at start {m['load_average_at_start']}; "
        f"{result['disk_free_bytes'] / GB:.0f} GB free under the work directory at start.", "",
        f"Command: `{result['command']}`"
        + (f" (resuming the run started {result['resumed_from']}: rows measured before the interruption were kept; "
           "each row's `finished` time is in xl.json)" if result.get("resumed_from") else ""), "",
        f"Family: shape {result['shape']} ({SHAPE_NAMES[result['shape']]}: hidden {geometry['hidden_size']}, "
        f"{geometry['num_hidden_layers']} layers, MLP {geometry['intermediate_size']}, "
        f"{geometry['num_attention_heads']} heads / {geometry['num_key_value_heads']} KV heads, vocab "
        f"{geometry['vocab_size']}, untied head), {decimal(fam['parameters'], '')} parameters, "
        f"{decimal(fam['model_bytes'])} per model in bfloat16 ({fam['shards']} shard(s) of at most "
        f"{SHARD_BYTES / GB:.0f} GB); a base N(0, {INIT_STD}²) (norm weights 1) and two fine-tunes ft1, ft2 = base "
        f"+ N(0, s²), s = {DELTA_STD:g} × a per-tensor factor in [0.5, 2) × 1 and × 2. "
        + (f"Generated block by block in a child process: {g['wall_s']:.1f} s (CPU {g['cpu_s']:.1f} s), peak RSS "
           f"{mib(g['maxrss_bytes'])} MiB under a {g['limit_kind']} limit of {size_label(g['limit_bytes'])}, "
           f"{decimal(len(ROLES) * fam['model_bytes'])} written"
           + (" (by an earlier run, reused)." if fam["reused"] else "."))
        + f" Models: {', '.join(f'{k} ({v})' for k, v in result['family_dirs'].items())}.", "",
        f"Memory limit: {result['limit_description']}", "",
        f"Page cache: {result['cache_description']}", "",
        "Each method's mergekit configuration (`dtype: bfloat16`), the same file run by both tools: blockmerge "
        "`python -m blockmerge mergekit-yaml CFG OUT --no-copy-tokenizer --overwrite --random-seed 0`, mergekit "
        "`mergekit-yaml CFG OUT --no-copy-tokenizer --lazy-unpickle --random-seed 0`:", "",
        "| method | configuration |", "| --- | --- |",
        *(f"| {method} | {mc.describe_config(config)} |" for method, config in result["configs"].items()), "",
        "## Per method", "",
        f"One run each, a fresh process, {cache} page cache. blockmerge: wall time, peak RSS (`/usr/bin/time`'s "
        "maximum resident set), wall ÷ disk floor and its own merge time (no interpreter start-up) ÷ disk floor; "
        "mergekit: wall s, peak RSS MiB, wall ÷ disk floor, under each limit.", "",
        "| method | blockmerge limit | blockmerge wall s | peak RSS MiB | wall ÷ floor | merge ÷ floor |"
        + "".join(f" mergekit at {size_label(x)} |" for x in result["mergekit_limits"]),
        "| --- | --- | ---: | ---: | ---: | ---: |" + " --- |" * len(result["mergekit_limits"]),
    ]
    for method in result["configs"]:
        bm = next((r for r in result["runs"] if (r["method"], r["tool"]) == (method, "blockmerge")), None)
        if bm is None:
            continue
        cells = [mergekit_cell(next((r for r in result["runs"] if (r["method"], r["tool"], r["limit_bytes"])
                                     == (method, "mergekit", x)), None)) for x in result["mergekit_limits"]]
        status = "" if bm["outcome"] == "ok" else f" ({describe_outcome(bm)})"
        lines.append(f"| {method} | {size_label(bm['limit_bytes'])}{status} | {bm['wall_s']:.1f} "
                     f"| {mib(bm['maxrss_bytes'])} | {fmt(bm.get('wall_over_floor'), '.2f')} "
                     f"| {fmt(bm.get('merge_over_floor'), '.2f')} |" + "".join(f" {c} |" for c in cells))
    lines += [
        "", "## Every run", "",
        "*CPU*: user + system time of the process tree. *anon / file*: peaks of a 10 ms sampling of RssAnon / "
        "RssFile (mergekit maps its inputs, so their pages count as its file-backed RSS). *cgroup peak*: the "
        "group's highest charge, page cache included (reclaimable). *read / written GB*: blockmerge's summary "
        "(every pass counts its reads), for mergekit the files its configuration reads and the output it wrote. "
        "*disk read / written GB*: block I/O the kernel counted for the process (`ru_inblock` / `ru_oublock`).",
        "",
        "| method | tool | limit | result | wall s | merge s | CPU s | peak RSS MiB | anon / file MiB "
        "| cgroup peak MiB | read GB | written GB | disk read / written GB | wall ÷ floor | merge ÷ floor |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['method']} | {r['tool']} | {size_label(r['limit_bytes'])} ({r['limit_kind']}) "
            f"| {describe_outcome(r)} | {r['wall_s']:.1f} | {fmt(r.get('merge_s'), '.1f')} | {r['cpu_s']:.1f} "
            f"| {mib(r['maxrss_bytes'])} | {mib(r['sampled_anon_bytes'])} / {mib(r['sampled_file_bytes'])} "
            f"| {mib(r['cgroup_peak_bytes'])} | {gb(r.get('read_bytes'))} | {gb(r.get('written_bytes'))} "
            f"| {gb(r['block_read_bytes'])} / {gb(r['block_written_bytes'])} "
            f"| {fmt(r.get('wall_over_floor'), '.2f')} | {fmt(r.get('merge_over_floor'), '.2f')} |")
    lines += [
        "", "## Disk floors", "",
        "The files a configuration reads, read once sequentially with the page cache dropped (*read cold*), and "
        "its output's bytes written and fsynced (*write*); *read warm*: read again right after (with --warm; "
        "inputs larger than the free RAM are partly read from the disk again). Measured at the start and at the "
        "end of the runs; the ratios use their mean.", "",
        "| inputs | GB read | when | read cold s | write + fsync s | read warm s | floor cold s | floor warm s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for inputs, taken in result["floors"].items():
        for when, f in taken.items():
            if f:
                lines.append(f"| {inputs} | {gb(f['read_bytes'])} | {when} | {f['read_cold_s']:.2f} "
                             f"| {f['write_s']:.2f} | {fmt(f.get('read_warm_s'), '.2f')} | {f['cold_s']:.2f} "
                             f"| {fmt(f.get('warm_s'), '.2f')} |")
    if result["dask"]:
        lines += [
            "", "## Dask executor", "",
            "blockmerge's own command, `python -m blockmerge merge --method M --base base --model ft1 --model ft2 "
            "--dtype bfloat16 -o OUT --overwrite` (ties: `--set density=0.2 trim=block exact_count=true "
            "majority_sign=plus`, mergekit's TIES; a mergekit YAML given to `merge -c` is merged in the client "
            "process whatever `--executor` says), locally and with `--executor dask --scheduler "
            f"ADDR` on a fresh scheduler and {DASK_WORKERS} single-threaded worker processes (`dask worker "
            "--no-nanny --nthreads 1 --memory-limit 0`), each worker under the limit in a cgroup of its own (the "
            "client too); blockmerge and torch are imported into the workers before the clock starts. Worker peak "
            "RSS: `/usr/bin/time`'s maximum resident set of each worker process (idle RSS before the merge in "
            "brackets); *workers' disk I/O*: block I/O the kernel counted for the workers, read / written (the "
            "workers write the output); *identical*: the sha256 of every output file equals the local run's.", "",
            "| method | executor | limit | result | wall s | merge s | CPU s (client + workers) | client peak RSS MiB "
            "| per-worker peak RSS MiB | workers' disk I/O GB | identical to local |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
        ]
        for r in result["dask"]:
            workers = r.get("worker_runs", [])
            idle = r.get("worker_idle_rss_bytes", [])
            per = ", ".join(f"{mib(w['maxrss_bytes'])} ({mib(idle[i]) if i < len(idle) else '–'})"
                            for i, w in enumerate(workers)) or "–"
            cpu = r["cpu_s"] + sum(w["cpu_s"] for w in workers)
            same = "–" if r["executor"] == "local" or r["outcome"] != "ok" else ("yes" if r["identical_to_local"] else (
                "weights only" if r["weights_identical_to_local"] else "NO"))
            io = (f"{gb(sum(w['block_read_bytes'] for w in workers))} / "
                  f"{gb(sum(w['block_written_bytes'] for w in workers))}" if workers else "–")
            lines.append(f"| {r['method']} | {r['executor']} | {size_label(r['limit_bytes'])} "
                         f"| {describe_outcome(r)} | {r['wall_s']:.1f} | {fmt(r.get('merge_s'), '.1f')} | {cpu:.1f} "
                         f"| {mib(r['maxrss_bytes'])} | {per} | {io} | {same} |")
    lines += ["", "## Targets", ""]
    for text, ok in result["targets"]:
        lines.append(f"- {'PASS' if ok else 'n/a' if ok is None else 'FAIL'}: {text}")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    """mergekit_compare's description of this machine, taken in a child: torch stays out of this process, so its
    libraries are not held in the page cache for the runs."""
    code = "import json, mergekit_compare as mc; print(json.dumps(mc.machine_description()))"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent, env=python_env(),
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def blockmerge_tree() -> str:
    """The git tree of the blockmerge package (the code measured), with '+dirty' when it has uncommitted edits."""
    repo = Path(__file__).resolve().parents[1]
    tree = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD:blockmerge"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "blockmerge"], capture_output=True,
                           text=True)
    return tree.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if tree.returncode == 0 else "unknown"


class Journal:
    """What a run has measured so far, written after each measurement, so an interrupted run resumes (`--resume`)
    where it stopped; only a journal of the same settings and blockmerge code (`key`) is resumed."""

    def __init__(self, path: Path, key: dict[str, Any], resume: bool):
        self.path, self.key = path, key
        self.data: dict[str, Any] = {"key": key, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "floors": {},
                                     "runs": [], "dask": {}}
        self.resumed: str | None = None
        if resume and path.is_file():
            found = json.loads(path.read_text())
            if found.get("key") == key and not str(key["blockmerge"]).endswith("+dirty"):
                self.data, self.resumed = found, found["started"]
                print(f"resuming the run started {found['started']}: {len(found['runs'])} runs measured", flush=True)
            else:
                print(f"{path}: another run's journal (other settings or code): starting afresh", flush=True)

    def floor(self, key: str, when: str) -> dict | None:
        return self.data["floors"].get(key, {}).get(when)

    def run(self, tool: str, method: str, limit: int) -> dict | None:
        return next((r for r in self.data["runs"] if (r["tool"], r["method"], r["limit_bytes"]) ==
                     (tool, method, limit)), None)

    def dask(self, method: str) -> list[dict] | None:
        return self.data["dask"].get(method)

    def add_floor(self, key: str, when: str, floor: dict) -> None:
        self.data["floors"].setdefault(key, {})[when] = floor
        self._save()

    def add_run(self, row: dict) -> None:
        if row not in self.data["runs"]:
            self.data["runs"].append(row)
            self._save()

    def add_dask(self, method: str, rows: list[dict]) -> None:
        self.data["dask"][method] = rows
        self._save()

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b", choices=list(SHAPES), help="geometry of the family (default 7b)")
    parser.add_argument("--methods", nargs="+", default=list(MERGES), choices=list(MERGES), metavar="METHOD",
                        help=f"methods to run (default: all): {', '.join(MERGES)}")
    parser.add_argument("--mergekit", help="path of mergekit-yaml (in its own virtual environment); omit to run "
                        "blockmerge only")
    parser.add_argument("--limit", type=parse_size, default=parse_size("2GiB"),
                        help="memory limit of every blockmerge process (default 2GiB)")
    parser.add_argument("--mergekit-limits", type=parse_size, nargs="+", default=[2 * GiB, 16 * GiB],
                        help="limits mergekit runs under, one run each (default 2GiB 16GiB)")
    parser.add_argument("--generate-limit", type=parse_size, default=parse_size("2GiB"),
                        help="memory limit of the process generating the family (default 2GiB)")
    parser.add_argument("--limit-kind", choices=["cgroup", "prlimit"],
                        help="cgroup (a container's limit; needs root) or prlimit (RLIMIT_DATA); default cgroup "
                        "where usable")
    parser.add_argument("--warm", action="store_true", help="pre-read the inputs before each run instead of "
                        "dropping their page cache (the warm-cache ratios)")
    parser.add_argument("--dask", nargs="*", choices=list(DASK_MERGES), metavar="METHOD",
                        help=f"also these ({', '.join(DASK_MERGES)} if none are named) through `blockmerge merge`, "
                        f"locally and on Dask ({DASK_WORKERS} local workers); outputs compared")
    parser.add_argument("--run-timeout", type=float, default=6 * 3600,
                        help="seconds after which a merge is stopped and recorded as timed out (default 6 h; 0: none)")
    parser.add_argument("--keep", action="store_true", help="keep the generated family for a later run")
    parser.add_argument("--resume", action="store_true", help="keep what an interrupted run of the same settings "
                        "and the same blockmerge code measured (its journal in --workdir) and run only the rest; "
                        "give --keep to both, so the family survives the interruption")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/blockmerge-xl"))
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--describe", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--generate", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.describe:
        return describe_child(args.describe[0], Path(args.describe[1]))
    if args.generate:
        return generate_child(Path(args.generate[0]), Path(args.generate[1]))

    pm.compile_blockmerge()
    kind = args.limit_kind or ("cgroup" if CGROUPS.usable() else "prlimit")
    if kind == "cgroup" and not CGROUPS.usable():
        raise SystemExit(f"--limit-kind cgroup: {CGROUPS.describe()} (needs root); use --limit-kind prlimit")
    if not Path(TIME).is_file():
        raise SystemExit(f"{TIME} is needed (GNU time) for each run's peak RSS")
    mergekit = args.mergekit
    if mergekit and not Path(mergekit).is_file():
        raise SystemExit(f"--mergekit {mergekit}: no such file")
    mk_version = None
    if mergekit:
        shown = subprocess.run([str(Path(mergekit).parent / "pip"), "show", "mergekit"], capture_output=True,
                               text=True).stdout
        mk_version = next((line.split()[-1] for line in shown.splitlines() if line.startswith("Version:")), "unknown")
    if kind == "cgroup":
        limit_description = (
            f"a {CGROUPS.describe()}: one fresh group per process (`memory.limit_in_bytes`"
            + (" and `memory.memsw.limit_in_bytes`" if CGROUPS.version == 1 else "") + " set to the limit)"
            if CGROUPS.version == 1 else
            f"a {CGROUPS.describe()}: one fresh group per process (`memory.max` set to the limit, `memory.swap.max` 0)")
        limit_description += (", entered before exec; it charges the page cache its processes touch too "
                              "(reclaimable), as a container's limit does. A process the OOM killer ends is "
                              "*killed at* the limit. By hand: `systemd-run --scope -p MemoryMax=2G -p "
                              "MemorySwapMax=0 CMD` or `docker run --memory 2g --memory-swap 2g`.")
    else:
        limit_description = ("RLIMIT_DATA (`prlimit --data=BYTES -- CMD`): private writable memory only, not the "
                             "page cache or file mappings; an allocation beyond it fails (*out of memory at*).")
    can_drop = mc.can_drop_caches()
    cache_description = (
        "warm: the inputs read once just before each run (inputs larger than the free RAM cannot all stay cached)."
        if args.warm else
        "cold: dropped before each run" + (" (`echo 3 > /proc/sys/vm/drop_caches`)." if can_drop else
                                           " (not root: each input file's clean pages, `posix_fadvise DONTNEED`)."))
    print(f"limits: {kind}; blockmerge {size_label(args.limit)}, mergekit "
          f"{', '.join(size_label(x) for x in args.mergekit_limits) if mergekit else 'not run'}; "
          f"{'warm' if args.warm else 'cold'} page cache", flush=True)

    args.workdir.mkdir(parents=True, exist_ok=True)
    root = args.workdir / f"family-{args.shape}"
    outs = args.workdir / "runs"
    result: dict[str, Any] = {
        "machine": machine(), "mergekit_version": mk_version,
        "command": " ".join(["python", *sys.argv]), "shape": args.shape, "geometry": SHAPES[args.shape],
        "warm": args.warm, "limit_kind": kind, "limit_bytes": args.limit,
        "mergekit_limits": args.mergekit_limits if mergekit else [],
        "limit_description": limit_description, "cache_description": cache_description,
        "disk_free_bytes": shutil.disk_usage(args.workdir).free, "can_drop_caches": can_drop,
        "configs": {m: MERGES[m] for m in args.methods}, "floors": {}, "runs": [], "dask": []}
    journal = Journal(args.workdir / f"journal-{args.shape}{'-warm' if args.warm else ''}.json", {
        "shape": args.shape, "warm": args.warm, "limit_kind": kind, "limit": args.limit,
        "mergekit_limits": result["mergekit_limits"], "mergekit_version": mk_version, "dask": args.dask,
        "blockmerge": blockmerge_tree()}, args.resume)
    try:
        dirs, family = ensure_family(args, root, kind)
        result["family"] = {k: v for k, v in family.items() if k != "files"}
        result["family_dirs"] = {role: str(d) for role, d in dirs.items()}
        outs.mkdir(parents=True, exist_ok=True)
        out_bytes = family["model_bytes"]
        configs = {m: write_config(m, dirs, outs / f"{m}.yaml") for m in MERGES}
        dask_methods = [] if args.dask is None else (args.dask or list(DASK_MERGES))
        inputs = {m: [p for role in roles(MERGES[m]) for p in weight_files(dirs[role])]
                  for m in dict.fromkeys([*args.methods, *dask_methods])}  # the Dask merges read what these read
        sets = {inputs_key(files): files for files in inputs.values()}

        def floors(when: str) -> None:
            for key, files in sets.items():
                if journal.floor(key, when) is not None:
                    result["floors"].setdefault(key, {})[when] = journal.floor(key, when)
                    continue
                print(f"disk floor ({when}): {key}, {decimal(sum(p.stat().st_size for p in files))} read cold + "
                      f"{decimal(out_bytes)} written and fsynced ...", flush=True)
                f = disk_floor(files, out_bytes, outs, args.warm)
                result["floors"].setdefault(key, {})[when] = f
                journal.add_floor(key, when, f)
                print(f"  read cold {f['read_cold_s']:.2f} s, write {f['write_s']:.2f} s, floor {f['cold_s']:.2f} s"
                      + (f", warm {f['warm_s']:.2f} s" if "warm_s" in f else ""), flush=True)

        floors("start")
        for method in args.methods:
            for tool in TOOLS:
                if tool == "mergekit" and not mergekit:
                    continue
                for limit in [args.limit] if tool == "blockmerge" else args.mergekit_limits:
                    row = journal.run(tool, method, limit) or one_run(
                        tool, method, configs[method], inputs[method], outs / f"{tool}-{method}", kind, limit, args,
                        outs / f"{tool}-{method}.log")
                    journal.add_run(row)
                    result["runs"].append(row)
        for method in dask_methods:
            rows = journal.dask(method)
            if rows is None:
                rows = dask_compare(method, dirs, inputs[method], outs, kind, args.limit, args)
                for row in rows:
                    row["inputs"] = inputs_key(inputs[method])
                    row["cache"] = "warm" if args.warm else "cold"
                journal.add_dask(method, rows)
            result["dask"].extend(rows)
        floors("end")
    finally:
        shutil.rmtree(outs, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            print(f"removed {root} (--keep keeps it)", flush=True)
        try:
            args.workdir.rmdir()
        except OSError:
            pass
    journal.finish()
    result["resumed_from"] = journal.resumed
    add_ratios(result)
    result["targets"] = targets(result)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "xl.json").write_text(json.dumps(result, indent=1))
    report = markdown(result)
    (args.results / "xl.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
