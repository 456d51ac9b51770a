"""Helpers shared by the fault suite: scenario directories, filesystem snapshots, the CLI as a real process,
the CLI in-process, work run ahead on two threads, and the figures printed at the end of the session.

Imported by the test modules of this folder as `faultkit` (pytest puts this folder on sys.path; there is
no __init__.py, like tests/).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_family
from safetensors.torch import save_file

from blockmerge.cli import main
from blockmerge.engine import faults

# The test process itself must never carry a fault spec (it would SIGKILL pytest).
os.environ.pop(faults.ENV, None)

# ------------------------------------------------------------------------------------------------ figures

FIGURES: Counter[str] = Counter()
_FIGURES_LOCK = threading.Lock()
FIGURE_ORDER = [
    "kills at named fault points",
    "reruns after a kill (resume / fresh)",
    "random-time kills that landed",
    "random-time kills that came after the end",
    "concurrent races",
    "disk-full cases (RLIMIT_FSIZE)",
    "disk-full cases (tmpfs)",
    "malformed safetensors files (hypothesis)",
    "adversarial safetensors headers",
    "malformed store manifests (hypothesis)",
    "adversarial store manifests",
    "tensor-name merges (names as data)",
    "atheris executions (safetensors header)",
    "bytes compared against references",
    "filesystem snapshots compared",
]


def count(key: str, n: int = 1) -> None:
    with _FIGURES_LOCK:
        FIGURES[key] += n


class _FiguresReport:
    """Prints FIGURES in the terminal summary (the numbers quoted in the README's Reliability section)."""

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not FIGURES:
            return
        terminalreporter.section("blockmerge fault-suite figures")
        for key in [*FIGURE_ORDER, *sorted(set(FIGURES) - set(FIGURE_ORDER))]:
            if FIGURES.get(key):
                terminalreporter.write_line(f"{key}: {FIGURES[key]}")
        ours = {outcome: len(_in_this_folder(terminalreporter, outcome)) for outcome in ("passed", "failed", "error")}
        verdict = ("every check passed" if not ours["failed"] and not ours["error"]
                   else f"{ours['failed']} failed, {ours['error']} errors")
        terminalreporter.write_line(f"wrong output bytes / writes outside OUT asserted zero in every case of the "
                                    f"{sum(ours.values())} fault-suite tests run: {verdict}")


def _in_this_folder(terminalreporter, outcome: str) -> list:
    """The session's test reports of `outcome` that come from this folder's tests (not others run with them)."""
    folder = Path(__file__).resolve().parent
    root = terminalreporter.config.rootpath
    return [r for r in terminalreporter.stats.get(outcome, [])
            if getattr(r, "when", "call") in ("call", "setup") and (root / r.location[0]).resolve().parent == folder
            and (outcome != "passed" or r.when == "call")]


@pytest.fixture(scope="session", autouse=True)
def fault_figures(request):
    """Registers the figures report once per session (imported by every module of this folder)."""
    name = "blockmerge-fault-figures"
    if request.config.pluginmanager.get_plugin(name) is None:
        request.config.pluginmanager.register(_FiguresReport(), name)
    yield


# ------------------------------------------------------------------------------------------------ files


def snapshot(*roots: Path) -> dict[str, str]:
    """Every directory, link and file (sha256 of its bytes) under the roots, hidden ones included."""
    out: dict[str, str] = {}
    for root in roots:
        out[str(root)] = "dir"
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                if os.path.islink(p):
                    out[p] = "link:" + os.readlink(p)
                elif os.path.isdir(p):
                    out[p] = "dir"
                else:
                    with open(p, "rb") as f:
                        out[p] = hashlib.sha256(f.read()).hexdigest()
    count("filesystem snapshots compared")
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Paths added, removed or modified between two snapshots."""
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))


def outside(paths: Iterable[str], allowed: Path) -> list[str]:
    """The paths that are not `allowed` itself or under it."""
    prefix = str(allowed)
    return [p for p in paths if p != prefix and not p.startswith(prefix + os.sep)]


def read_tree(path: Path) -> dict[str, bytes]:
    """A file's bytes ({'': bytes}) or every file and directory of a directory ({relpath: bytes | b'<dir>'})."""
    if path.is_file():
        return {"": path.read_bytes()}
    out = {}
    for p in sorted(path.rglob("*")):
        out[str(p.relative_to(path))] = b"<dir>" if p.is_dir() else p.read_bytes()
    return out


def tree_diff(got: dict[str, bytes], want: dict[str, bytes]) -> list[str]:
    """Names whose bytes differ (or that only one side has); counts the bytes compared."""
    count("bytes compared against references", sum(len(v) for v in want.values()))
    return sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))


def write_previous(out: Path) -> dict[str, bytes]:
    """A previous blockmerge output at OUT, for --overwrite cases (which replace nothing else), written by hand:
    a .safetensors file with provenance in its header, a store (`*.store`) or a safetensors directory."""
    note = "previous output, must survive until the new one is complete"
    if out.name.endswith(".safetensors"):
        save_file({"previous": torch.zeros(3)}, out, metadata={"format": "pt", "blockmerge": json.dumps(note)})
    else:
        out.mkdir()
        (out / "previous.txt").write_text(note)
        if out.name.endswith(".store"):
            manifest = {"format": "blockmerge-store", "version": 1, "tensors": [], "metadata": {"note": note}}
            (out / "blockmerge.json").write_text(json.dumps(manifest))
        else:
            (out / "blockmerge-provenance.json").write_text(json.dumps({"blockmerge": note}))
    return read_tree(out)


def journal_lines(work: Path) -> int:
    """Complete block entries of a work directory's journal (up to a torn line, as blockmerge reads it)."""
    p = work / "journal.jsonl"
    n = 0
    for line in p.read_text().splitlines() if p.is_file() else []:
        try:
            item = json.loads(line)
            if "passes" in item:
                continue
            item["name"], item["start"], item["stop"], int(item["crc32"])
        except (ValueError, KeyError, TypeError):
            break
        n += 1
    return n


def digest_files(paths: Iterable[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


# ------------------------------------------------------------------------------------------------ models


@dataclass
class Family:
    """Inputs written once per session: a base as a Hugging Face directory (weights, config, tokenizer) and
    fine-tunes as .safetensors files. Every run names them by the same absolute paths, so provenance (which
    records input paths) is the same in every output."""

    root: Path
    base: Path
    models: list[Path]
    files: list[Path] = field(default_factory=list)

    def model_args(self) -> list[str]:
        return ["--base", str(self.base), *[x for m in self.models for x in ("--model", str(m))]]


def write_family(root: Path, shapes: dict[str, tuple[int, ...]], num_models: int, seed: int = 0) -> Family:
    """conftest's family (base + Gaussian noise; `position_ids` an int64 buffer) written as real files."""
    base, models = make_family(num_models, seed=seed, shapes=shapes)
    (root / "base").mkdir(parents=True)
    save_file(base, root / "base" / "model.safetensors")
    (root / "base" / "config.json").write_text('{"model_type": "llama", "hidden_size": 16}\n')
    (root / "base" / "tokenizer.json").write_text('{"version": "1.0"}\n')
    paths = []
    for i, m in enumerate(models):
        save_file(m, root / f"model{i}.safetensors")
        paths.append(root / f"model{i}.safetensors")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return Family(root, root / "base", paths, files)


# ------------------------------------------------------------------------------------------------ fork server

# `python -m blockmerge` spends ~1.5 s importing torch before it does anything; the fault matrices run a few
# hundred CLI processes. A fork server imports what the CLI imports once, then forks one child per run; the
# child sets the run's environment, working directory, stdio and file-size limit and runs the `blockmerge`
# module as `__main__` (runpy, exactly as `python -m blockmerge` does), so it exits through click's
# sys.exit and normal interpreter shutdown. It is a real process: fault points SIGKILL it, limits apply
# to it. BLOCKMERGE_FAULTS_EXEC=1 starts every run with `python -m blockmerge` instead (slower, same checks).
SERVER = r"""
import json, os, resource, runpy, select, sys, time
import blockmerge.cli  # what a CLI run imports, once

def serve():
    for line in sys.stdin:
        req = json.loads(line)
        out_r, out_w = os.pipe()  # the child's stdout and stderr are pipes, as under subprocess.run
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(out_r)
            os.close(err_r)
            return req, out_w, err_w
        os.close(out_w)
        os.close(err_w)
        chunks = {out_r: [], err_r: []}
        pending = [out_r, err_r]
        deadline = time.monotonic() + req["timeout"]
        timed_out = False
        while pending:
            ready, _, _ = select.select(pending, [], [], 0.5)
            for fd in ready:
                data = os.read(fd, 1 << 16)
                if data:
                    chunks[fd].append(data)
                else:
                    pending.remove(fd)
                    os.close(fd)
            if time.monotonic() > deadline and not timed_out:
                os.kill(pid, 9)
                timed_out = True
        _, status = os.waitpid(pid, 0)
        reply = {"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
                 "stdout": b"".join(chunks[out_r]).decode(errors="replace"),
                 "stderr": b"".join(chunks[err_r]).decode(errors="replace")}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    raise SystemExit(0)

req, out_w, err_w = serve()
os.chdir(req["cwd"])
os.environ.clear()
os.environ.update(req["env"])
null = os.open(os.devnull, os.O_RDONLY)
for fd, new in ((0, null), (1, out_w), (2, err_w)):
    os.dup2(new, fd)
    os.close(new)
if req["fsize"] is not None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
if req["memory"] is not None:  # address space: what is mapped now plus the headroom
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + req["memory"], vm + req["memory"]))
sys.argv = ["blockmerge", *req["args"]]
runpy.run_module("blockmerge", run_name="__main__", alter_sys=True)
"""

EXEC = os.environ.get("BLOCKMERGE_FAULTS_EXEC") == "1"
_SERVERS = threading.local()
_ALL_SERVERS: list[subprocess.Popen] = []


def _server() -> subprocess.Popen:
    server = getattr(_SERVERS, "proc", None)
    if server is None or server.poll() is not None:
        env = {k: v for k, v in os.environ.items() if k != faults.ENV}
        server = subprocess.Popen([sys.executable, "-B", "-c", SERVER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env, cwd="/")
        _SERVERS.proc = server
        _ALL_SERVERS.append(server)
    return server


@atexit.register
def _stop_servers() -> None:
    for server in _ALL_SERVERS:
        if server.poll() is None:
            server.stdin.close()
            server.wait(timeout=30)


def run_cli(args: list[str], *, env: dict[str, str], cwd: Path, timeout: float = 300, fsize: int | None = None,
            memory: int | None = None) -> subprocess.CompletedProcess:
    """One CLI run as a separate process (forked from the server, or `python -m blockmerge` with EXEC), with
    optional limits: `fsize` bytes per file written (RLIMIT_FSIZE), `memory` bytes of address space beyond
    what the imported interpreter maps (RLIMIT_AS)."""
    if EXEC:
        def limit() -> None:
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            if memory is not None:  # an interpreter with torch imported maps about 0.7 GiB
                resource.setrlimit(resource.RLIMIT_AS, (memory + 2**30, memory + 2**30))

        return subprocess.run([sys.executable, "-m", "blockmerge", *args], capture_output=True, text=True,
                              env=env, cwd=cwd, timeout=timeout, preexec_fn=limit)
    server = _server()
    request = {"args": args, "env": env, "cwd": str(cwd), "fsize": fsize, "memory": memory, "timeout": timeout}
    server.stdin.write(json.dumps(request) + "\n")
    server.stdin.flush()
    reply = json.loads(server.stdout.readline())
    if reply["timed_out"]:
        raise subprocess.TimeoutExpired(args, timeout)
    return subprocess.CompletedProcess(args, reply["returncode"], reply["stdout"], reply["stderr"])


# ------------------------------------------------------------------------------------------------ scenarios


class Scenario:
    """One run's world: out/ (the output's parent, the only place a run may write), and cwd/, tmp/ and home/
    given to the process as its working directory, TMPDIR and HOME, so that a stray write lands where the
    snapshot sees it."""

    def __init__(self, root: Path, family: Family, out_name: str):
        self.root, self.family = root, family
        root.mkdir(parents=True)
        for d in ("out", "cwd", "tmp", "home"):
            (root / d).mkdir()
        self.out_dir = root / "out"
        self.out = self.out_dir / out_name

    def env(self, fault: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != faults.ENV}
        env.update(TMPDIR=str(self.root / "tmp"), HOME=str(self.root / "home"), PYTHONDONTWRITEBYTECODE="1")
        if fault:
            env[faults.ENV] = fault
        return env

    def snapshot(self) -> dict[str, str]:
        return snapshot(self.root, self.family.root)

    def work(self, out_dir: Path | None = None) -> Path:
        return (out_dir or self.out_dir) / f".{self.out.name}.blockmerge-partial"

    def lock(self, out_dir: Path | None = None) -> Path:
        return (out_dir or self.out_dir) / f".{self.out.name}.blockmerge-lock"

    def run(self, args: list[str], fault: str | None = None, timeout: float = 300, fsize: int | None = None,
            memory: int | None = None) -> subprocess.CompletedProcess:
        """A CLI run through the fork server (see SERVER)."""
        return run_cli(args, env=self.env(fault), cwd=self.root / "cwd", timeout=timeout, fsize=fsize,
                       memory=memory)

    def exec(self, args: list[str], fault: str | None = None, timeout: float = 300,
             preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
        """`python -m blockmerge ARGS`, a fresh interpreter."""
        return subprocess.run([sys.executable, "-m", "blockmerge", *args], capture_output=True, text=True,
                              env=self.env(fault), cwd=self.root / "cwd", timeout=timeout, preexec_fn=preexec_fn)

    def popen(self, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "blockmerge", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env(), cwd=self.root / "cwd")


@dataclass
class InProcess:
    exit_code: int
    output: str
    writes: int  # blocks written (the `write` fault point reached)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """In-process merges use one intra-op thread while the run-ahead processes use the cores (two OpenMP
    pools spinning on two cores slow everything down ten times); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cli_in_process(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> InProcess:
    """The CLI run in this process (no interpreter start-up), counting the blocks it writes."""
    reached: Counter[str] = Counter()
    with monkeypatch.context() as m, one_torch_thread():
        m.setattr(faults, "point", lambda name: reached.update([name]))
        m.chdir(cwd)
        m.delenv(faults.ENV, raising=False)
        result = CliRunner().invoke(main, args)
    text = result.output + ("" if result.exception is None or isinstance(result.exception, SystemExit)
                            else f"\n{type(result.exception).__name__}: {result.exception}")
    return InProcess(result.exit_code, text, reached["write"])


def copy_out_dir(src: Path, dst: Path) -> None:
    """A second copy of a killed run's state (work directory, journal, lock file) for a second rerun."""
    shutil.copytree(src, dst, symlinks=True)


# ------------------------------------------------------------------------------------------------ run ahead

_POOL: ThreadPoolExecutor | None = None


def pool() -> ThreadPoolExecutor:
    """Two workers: the slow part of parametrized cases (real processes) runs ahead, two at a time (2 cores)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="faults")
    return _POOL


class RunAhead:
    """Starts `job(param)` for every collected case of one test function on the first request, in collection
    order, so the cases' processes run two at a time while earlier cases are being checked."""

    def __init__(self, job: Callable[[object], object], argname: str):
        self.job, self.argname = job, argname
        self.futures: dict[str, Future] = {}

    def get(self, request: pytest.FixtureRequest) -> object:
        node = request.node
        key = node.callspec.id
        if key not in self.futures:
            for item in request.session.items:
                if (getattr(item, "originalname", None) == node.originalname and item.path == node.path
                        and item.callspec.id not in self.futures):
                    self.futures[item.callspec.id] = pool().submit(self.job, item.callspec.params[self.argname])
        return self.futures[key].result()
