"""A full disk, as a matrix: file-size limits (RLIMIT_FSIZE on the merging process: every write past the limit
fails with EFBIG) from 1 byte to one byte short of the largest file the merge writes, for every output format
and store codec; and a real small filesystem (a tmpfs of a few hundred KiB, ENOSPC) where mounting is allowed.

Every case: exit status 2 and one line saying there is no space; nothing left in the output's directory (no
OUT, no work directory, no lock); nothing changed anywhere else, inputs included; then the same command with
space succeeds and writes exactly the reference bytes. (tests/test_disk_full.py covers one limit per format.)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultkit import (
    Family,
    RunAhead,
    Scenario,
    changed,
    cli_in_process,
    count,
    fault_figures,  # noqa: F401  (session fixture: prints the figures)
    one_torch_thread,
    read_tree,
    tree_diff,
    write_family,
)

import blockmerge

SHAPES = {"w": (512, 256), "b": (256,)}
BLOCK = "64KiB"
FORMATS = {  # name: (output name, CLI options, API options)
    "safetensors": ("out.safetensors", [], {}),
    "store": ("out.store", [], {}),
    "store-zstd": ("out.store", ["--codec", "zstd"], {"codec": "zstd"}),
    "hf": ("out-hf", ["--format", "hf"], {"format": "hf"}),
}
LIMITS = ["1", "4096", "1/4", "1/2", "max-1"]  # max: the largest file the merge writes
CASES = [(f, limit) for f in FORMATS for limit in LIMITS]


@dataclass
class World:
    family: Family
    root: Path
    references: dict[str, dict[str, bytes]]
    largest: dict[str, int]


WORLD: World | None = None


def merge_args(family: Family, fmt: str, out: Path) -> list[str]:
    return ["merge", "-q", "--method", "average", *family.model_args(), "--out", str(out), "--block-size", BLOCK,
            *FORMATS[fmt][1]]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    global WORLD
    root = tmp_path_factory.mktemp("disk-full")
    family = write_family(root / "inputs", SHAPES, num_models=2, seed=5)
    references, largest = {}, {}
    for fmt, (name, _, options) in FORMATS.items():
        out = root / f"reference-{fmt}" / name
        out.parent.mkdir()
        with one_torch_thread():
            blockmerge.merge("average", [str(m) for m in family.models], base=str(family.base), out=out,
                             block_size=BLOCK, **options)
        references[fmt] = read_tree(out)
        largest[fmt] = max(len(v) for v in references[fmt].values())
        assert largest[fmt] > 4 * 4096  # every limit (4096 bytes, a quarter, ...) cuts the largest file short
    WORLD = World(family, root, references, largest)
    return WORLD


def resolve(limit: str, largest: int) -> int:
    if limit == "max-1":
        return largest - 1
    if "/" in limit:
        num, den = limit.split("/")
        return largest * int(num) // int(den)
    return int(limit)


@dataclass
class Full:
    scenario: Scenario
    limit: int
    result: subprocess.CompletedProcess
    before: dict[str, str]
    after: dict[str, str]


def _full(case: tuple[str, str]) -> Full:
    fmt, limit = case
    assert WORLD is not None
    scenario = Scenario(WORLD.root / f"limit-{fmt}-{limit.replace('/', 'over')}", WORLD.family, FORMATS[fmt][0])
    nbytes = resolve(limit, WORLD.largest[fmt])
    before = scenario.snapshot()
    result = scenario.run(merge_args(WORLD.family, fmt, scenario.out), fsize=nbytes)
    return Full(scenario, nbytes, result, before, scenario.snapshot())


FULLS = RunAhead(_full, "case")


def check_refused(result: subprocess.CompletedProcess, scenario: Scenario, before: dict[str, str],
                  after: dict[str, str]) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockmerge: error: ") and "no space left" in lines[0], \
        result.stderr
    assert sorted(p.name for p in scenario.out_dir.iterdir()) == [], "left behind in the output's directory"
    assert not changed(before, after), f"changed by a refused run: {changed(before, after)}"


@pytest.mark.parametrize("case", CASES, ids=[f"{f}-limit-{limit}" for f, limit in CASES])
def test_file_size_limit_is_a_one_line_error_and_a_rerun_succeeds(case, world, request, monkeypatch):
    fmt, _ = case
    full: Full = FULLS.get(request)
    count("disk-full cases (RLIMIT_FSIZE)")
    check_refused(full.result, full.scenario, full.before, full.after)
    rerun = cli_in_process(merge_args(world.family, fmt, full.scenario.out), full.scenario.root / "cwd", monkeypatch)
    assert rerun.exit_code == 0, rerun.output
    assert not tree_diff(read_tree(full.scenario.out), world.references[fmt])


# ------------------------------------------------------------------------------------------------ tmpfs


def _mount(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextlib.contextmanager
def small_filesystem(point: Path, size: str) -> Iterator[Callable[[str], None]]:
    """A tmpfs of `size` mounted on `point`; yields remount(size); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the RLIMIT_FSIZE matrix covers a full disk")
    mounted = _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)])
    if mounted.returncode != 0:
        pytest.skip(f"mount is not permitted here ({mounted.stderr.strip()}); the RLIMIT_FSIZE matrix covers it")

    def remount(new_size: str) -> None:
        result = _mount(["-o", f"remount,size={new_size}", str(point)])
        assert result.returncode == 0, result.stderr

    try:
        yield remount
    finally:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.parametrize("size", ["64k", "448k"])
@pytest.mark.parametrize("fmt", ["safetensors", "store", "hf"])
def test_small_filesystem_is_a_one_line_error_and_a_rerun_with_space_succeeds(world, tmp_path, fmt, size,
                                                                             monkeypatch):
    scenario = Scenario(tmp_path / "scenario", world.family, FORMATS[fmt][0])
    with small_filesystem(scenario.out_dir, size) as remount:
        before = scenario.snapshot()
        result = scenario.run(merge_args(world.family, fmt, scenario.out))
        count("disk-full cases (tmpfs)")
        check_refused(result, scenario, before, scenario.snapshot())
        remount("16m")
        rerun = cli_in_process(merge_args(world.family, fmt, scenario.out), scenario.root / "cwd", monkeypatch)
        assert rerun.exit_code == 0, rerun.output
        assert not tree_diff(read_tree(scenario.out), world.references[fmt])
