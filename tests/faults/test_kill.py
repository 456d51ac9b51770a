"""Kill matrix: the CLI (`blockmerge merge`, a separate process forked from faultkit's server, or
`python -m blockmerge` with BLOCKMERGE_FAULTS_EXEC=1) SIGKILLed at every named fault point, then rerun with
--resume and without; plus `python -m blockmerge` processes SIGKILLed at random times.

Every case checks: the process died by SIGKILL; nothing partial is visible at OUT (absent, or the previous
output intact under --overwrite); after the rerun OUT is byte-identical to an uninterrupted run, and the
work directory and lock are gone; no run (the killed one or the reruns) changed anything outside the
output's parent directory (snapshot of paths + sha256 of the inputs and of the run's cwd, TMPDIR and HOME).

Outputs carry no timestamps (the module's fixture checks that an uninterrupted CLI run and an in-process run
give identical bytes, provenance included), so every byte of every file is compared; nothing is excluded.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultkit import (
    Family,
    InProcess,
    RunAhead,
    Scenario,
    changed,
    cli_in_process,
    copy_out_dir,
    count,
    fault_figures,  # noqa: F401  (session fixture: prints the figures)
    journal_lines,
    one_torch_thread,
    outside,
    pool,
    read_tree,
    tree_diff,
    write_family,
    write_previous,
)

import blockmerge
from blockmerge.engine import faults

SHAPES = {"embed.weight": (24, 16), "layer.0.attn.weight": (16, 16), "layer.0.norm": (16,),
          "layer.1.mlp.weight": (16, 16), "head.bias": (), "position_ids": (12,)}
BLOCK = "512"
FORMATS = {"safetensors": ("out.safetensors", []), "store": ("out.store", []),
           "hf": ("out-hf", ["--format", "hf", "--max-shard-size", "2KiB"])}
COMMON_POINTS = ["write:1", "write:mid", "block:1", "block:mid", "block:last", "commit:1", "commit:1+overwrite",
                 "swap:1+overwrite"]
POINTS = {"average": COMMON_POINTS,  # no reduction pass
          "ties": ["pass:1", "pass:mid", "pass:last", *COMMON_POINTS]}  # 3 reduction passes, then the merge
# a single file replaces the previous one in one rename: no `swap` point
CASES = [(m, f, p) for m in POINTS for f in FORMATS for p in POINTS[m] if not (f == "safetensors" and "swap" in p)]


@dataclass
class World:
    family: Family
    root: Path
    counts: dict[tuple[str, str], Counter]  # fault points reached by an uninterrupted run
    seconds: dict[tuple[str, str], float]  # its duration in-process
    references: dict[tuple[str, str], dict[str, bytes]]  # bytes of an uninterrupted CLI run


WORLD: World | None = None


def merge_args(family: Family, method: str, fmt: str, out: Path, *extra: str) -> list[str]:
    return ["merge", "-q", "--method", method, *family.model_args(), "--out", str(out), "--block-size", BLOCK,
            *FORMATS[fmt][1], *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    global WORLD
    root = tmp_path_factory.mktemp("kill")
    family = write_family(root / "inputs", SHAPES, num_models=3)

    def reference(key: tuple[str, str]) -> dict[str, bytes]:
        method, fmt = key
        ref = Scenario(root / f"reference-{method}-{fmt}", family, FORMATS[fmt][0])
        result = ref.exec(merge_args(family, method, fmt, ref.out))
        assert result.returncode == 0, result.stderr
        return read_tree(ref.out)

    keys = [(m, f) for m in POINTS for f in FORMATS]
    futures = {key: pool().submit(reference, key) for key in keys}  # uninterrupted CLI runs, two at a time
    counts, seconds = {}, {}
    for method, fmt in keys:  # the same merges in-process, counting the fault points they pass, timed
        reached: Counter[str] = Counter()
        out = root / f"counted-{method}-{fmt}" / FORMATS[fmt][0]
        out.parent.mkdir()
        kwargs = {"format": "hf", "max_shard_size": "2KiB"} if fmt == "hf" else {}
        with pytest.MonkeyPatch.context() as m, one_torch_thread():
            m.setattr(faults, "point", lambda name, reached=reached: reached.update([name]))
            start = time.perf_counter()
            blockmerge.merge(method, [str(p) for p in family.models], base=str(family.base), out=out,
                             block_size=int(BLOCK), **kwargs)
            seconds[(method, fmt)] = time.perf_counter() - start
        counts[(method, fmt)] = reached
        assert reached["write"] == reached["block"] > 8 and reached["commit"] == 1
        assert (reached["pass"] > 0) == (method == "ties")
    references = {key: f.result() for key, f in futures.items()}
    for method, fmt in keys:
        out = root / f"counted-{method}-{fmt}" / FORMATS[fmt][0]
        assert not tree_diff(read_tree(out), references[(method, fmt)]), "in-process and CLI merges differ"
    WORLD = World(family, root, counts, seconds, references)
    return WORLD


def resolve(point: str, reached: Counter) -> tuple[str, int, bool]:
    """'block:mid+overwrite' -> ('block', N // 2, True), N the number of times an uninterrupted run passes it."""
    spec, _, flag = point.partition("+")
    name, _, which = spec.partition(":")
    total = reached[name]
    n = {"1": 1, "mid": max(1, total // 2), "last": total}[which]
    return name, n, flag == "overwrite"


def expected_journal(name: str, n: int, blocks: int) -> int:
    """Blocks journaled when the run was killed at the n-th `name`."""
    return {"pass": 0, "write": n - 1, "block": n, "commit": blocks, "swap": blocks}[name]


@dataclass
class Killed:
    scenario: Scenario
    returncode: int
    stderr: str
    previous: dict[str, bytes] | None
    before: dict[str, str]
    after: dict[str, str]


def _kill(case: tuple[str, str, str]) -> Killed:
    method, fmt, point = case
    assert WORLD is not None
    name, n, overwrite = resolve(point, WORLD.counts[(method, fmt)])
    scenario = Scenario(WORLD.root / f"kill-{method}-{fmt}-{point.replace(':', '-').replace('+', '-')}",
                        WORLD.family, FORMATS[fmt][0])
    previous = write_previous(scenario.out) if overwrite else None
    before = scenario.snapshot()
    extra = ["--overwrite"] if overwrite else []
    result = scenario.run(merge_args(WORLD.family, method, fmt, scenario.out, *extra), fault=f"{name}:{n}")
    return Killed(scenario, result.returncode, result.stderr, previous, before, scenario.snapshot())


KILLS = RunAhead(_kill, "case")


def check_rerun(scenario: Scenario, out_dir: Path, result: InProcess, reference: dict[str, bytes],
                before: dict[str, str], expected_writes: int, what: str) -> None:
    out = out_dir / scenario.out.name
    assert result.exit_code == 0, f"{what}: {result.output}"
    assert result.writes == expected_writes, f"{what}: wrote {result.writes} blocks, expected {expected_writes}"
    assert not tree_diff(read_tree(out), reference), f"{what}: output differs from the uninterrupted run"
    assert sorted(p.name for p in out_dir.iterdir()) == [out.name], f"{what}: work directory or lock left behind"
    leaked = outside(changed(before, scenario.snapshot()), out_dir)
    assert not leaked, f"{what}: wrote outside the output's directory: {leaked}"


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_kill_at_a_fault_point_then_rerun(case, world, request, monkeypatch):
    method, fmt, point = case
    killed: Killed = KILLS.get(request)
    scenario = killed.scenario
    name, n, overwrite = resolve(point, world.counts[(method, fmt)])
    blocks = world.counts[(method, fmt)]["write"]
    reference = world.references[(method, fmt)]
    count("kills at named fault points")

    # the kill: SIGKILL at the point, nothing partial visible, nothing written elsewhere
    assert killed.returncode == -signal.SIGKILL, f"not killed at {name}:{n}: {killed.stderr}"
    leaked = outside(changed(killed.before, killed.after), scenario.out_dir)
    assert not leaked, f"the killed run wrote outside the output's directory: {leaked}"
    work, lock = scenario.work(), scenario.lock()
    names = {p.name for p in scenario.out_dir.iterdir()}
    if name == "swap":
        # killed between the two renames: OUT is briefly absent, the previous output is intact in the work dir
        assert names <= {work.name, lock.name}
        assert read_tree(work / "replaced") == killed.previous, "the previous output was damaged"
    elif overwrite:
        assert names <= {scenario.out.name, work.name, lock.name}
        assert read_tree(scenario.out) == killed.previous, "the previous output was damaged"
    else:
        assert names <= {work.name, lock.name}, f"partial output visible at OUT: {sorted(names)}"
    assert journal_lines(work) == expected_journal(name, n, blocks)

    # (b)'s starting point: an exact copy of the killed run's state next to it
    out_b = scenario.root / "out-b"
    copy_out_dir(scenario.out_dir, out_b)
    extra = ["--overwrite"] if overwrite else []

    # (a) rerun with --resume: only the blocks not journaled are written again
    before = scenario.snapshot()
    resumed = cli_in_process(merge_args(world.family, method, fmt, scenario.out, "--resume", *extra),
                             scenario.root / "cwd", monkeypatch)
    journaled = expected_journal(name, n, blocks)
    check_rerun(scenario, scenario.out_dir, resumed, reference, before, blocks - journaled, "rerun with --resume")

    # (b) rerun without --resume: starts over, same bytes
    before = scenario.snapshot()
    fresh = cli_in_process(merge_args(world.family, method, fmt, out_b / scenario.out.name, *extra),
                           scenario.root / "cwd", monkeypatch)
    check_rerun(scenario, out_b, fresh, reference, before, blocks, "rerun without --resume")
    count("reruns after a kill (resume / fresh)", 2)


# ------------------------------------------------------------------------------------------------ random times

RANDOM_CASES = [(seed, ["ties", "average"][seed % 2], list(FORMATS)[seed % 3]) for seed in range(10)]


@dataclass
class RandomKill:
    scenario: Scenario
    returncode: int
    stderr: str
    delay: float
    before: dict[str, str]
    after: dict[str, str]


def _random_kill(case: tuple[int, str, str]) -> RandomKill:
    """Start the merge, wait until it holds its lock (the output phase began), SIGKILL it after a random delay
    within the time an uninterrupted merge takes."""
    seed, method, fmt = case
    assert WORLD is not None
    scenario = Scenario(WORLD.root / f"random-{seed}", WORLD.family, FORMATS[fmt][0])
    before = scenario.snapshot()
    delay = random.Random(seed).uniform(0.0, 0.9 * WORLD.seconds[(method, fmt)])
    proc = scenario.popen(merge_args(WORLD.family, method, fmt, scenario.out))
    deadline = time.monotonic() + 120
    while not scenario.lock().exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    return RandomKill(scenario, proc.returncode, stderr, delay, before, scenario.snapshot())


RANDOM_KILLS = RunAhead(_random_kill, "case")


@pytest.mark.parametrize("case", RANDOM_CASES, ids=[f"seed{s}-{m}-{f}" for s, m, f in RANDOM_CASES])
def test_kill_at_a_random_time_then_resume(case, world, request, monkeypatch):
    seed, method, fmt = case
    killed: RandomKill = RANDOM_KILLS.get(request)
    scenario = killed.scenario
    reference = world.references[(method, fmt)]
    assert killed.returncode in (0, -signal.SIGKILL), killed.stderr
    leaked = outside(changed(killed.before, killed.after), scenario.out_dir)
    assert not leaked, f"the killed run wrote outside the output's directory: {leaked}"
    if killed.returncode == 0:  # finished before the signal: a complete, correct output
        count("random-time kills that came after the end")
        assert not tree_diff(read_tree(scenario.out), reference)
        return
    count("random-time kills that landed")
    names = {p.name for p in scenario.out_dir.iterdir()}
    if scenario.out.name in names:  # killed after the final rename, while cleaning up: the output is complete
        assert not tree_diff(read_tree(scenario.out), reference), "a partial output is visible at OUT"
        return
    assert names <= {scenario.work().name, scenario.lock().name}, f"partial output visible: {sorted(names)}"
    journaled = journal_lines(scenario.work())
    before = scenario.snapshot()
    resumed = cli_in_process(merge_args(world.family, method, fmt, scenario.out, "--resume"),
                             scenario.root / "cwd", monkeypatch)
    blocks = world.counts[(method, fmt)]["write"]
    check_rerun(scenario, scenario.out_dir, resumed, reference, before, blocks - journaled, "rerun with --resume")
    count("reruns after a kill (resume / fresh)")
