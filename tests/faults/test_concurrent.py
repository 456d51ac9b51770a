"""Two real `python -m blockmerge merge` processes writing the same OUT at once: exactly one succeeds, the
other exits 2 with "another blockmerge run is writing this output", and OUT is exactly the merge.

Both processes are started together; the merge (TIES, 1 row per block, ~800 blocks, 3 reduction passes)
takes over a second after the lock is taken, far longer than the difference in their start-up, so the
second always meets the first's lock (a loser that came after the end would say "already exists" and
fail the test).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from faultkit import (
    Family,
    Scenario,
    changed,
    count,
    fault_figures,  # noqa: F401  (session fixture: prints the figures)
    one_torch_thread,
    outside,
    read_tree,
    tree_diff,
    write_family,
    write_previous,
)

import blockmerge

SHAPES = {"a.weight": (256, 64), "b.weight": (256, 64), "c.weight": (256, 64)}
BLOCK = 256
LOCKED = "another blockmerge run is writing this output"
RACES = {  # name: (output name, extra CLI options, what is at OUT before)
    "safetensors": ("out.safetensors", [], None),
    "store": ("out.store", [], None),
    "hf": ("out-hf", ["--format", "hf"], None),
    "store-overwrite": ("out.store", ["--overwrite"], "previous"),
    "safetensors-resume": ("out.safetensors", ["--resume"], "killed"),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Family:
    return write_family(tmp_path_factory.mktemp("race-inputs"), SHAPES, num_models=2, seed=3)


def merge_args(family: Family, out: Path, extra: list[str]) -> list[str]:
    return ["merge", "-q", "--method", "ties", *family.model_args(), "--out", str(out), "--block-size", str(BLOCK),
            *extra]


@pytest.mark.parametrize("race", list(RACES))
def test_two_processes_racing_for_one_output(family, tmp_path, race):
    name, extra, before_state = RACES[race]
    scenario = Scenario(tmp_path / "race", family, name)
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    fmt = {"format": "hf"} if "--format" in extra else {}
    with one_torch_thread():
        blockmerge.merge("ties", [str(m) for m in family.models], base=str(family.base),
                         out=reference_dir / name, block_size=BLOCK, **fmt)
    reference = read_tree(reference_dir / name)
    if before_state == "previous":
        write_previous(scenario.out)
    elif before_state == "killed":
        killed = scenario.run(merge_args(family, scenario.out, []), fault="block:100")
        assert killed.returncode == -9, killed.stderr
    before = scenario.snapshot()

    procs = [scenario.popen(merge_args(family, scenario.out, extra)) for _ in range(2)]
    started = time.monotonic()
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    count("concurrent races")

    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err) for p, _, err in results]
    loser = next(err for p, _, err in results if p.returncode == 2)
    lines = loser.strip().splitlines()
    assert len(lines) == 1 and LOCKED in lines[0] and str(scenario.out) in lines[0], loser
    assert time.monotonic() - started < 300
    assert not tree_diff(read_tree(scenario.out), reference), "the raced output differs from the merge"
    assert sorted(p.name for p in scenario.out_dir.iterdir()) == [scenario.out.name], "leftovers next to OUT"
    leaked = outside(changed(before, scenario.snapshot()), scenario.out_dir)
    assert not leaked, f"a racer wrote outside the output's directory: {leaked}"


def test_reference_is_independent_of_threads(family, tmp_path):
    """The references above are computed in-process with one torch thread; the racing CLI processes use the
    default. The bytes must not depend on it."""
    outs = []
    for threads in (1, 2):
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = tmp_path / f"t{threads}.safetensors"
            blockmerge.merge("ties", [str(m) for m in family.models], base=str(family.base), out=out,
                             block_size=64 * 1024)
            outs.append(out.read_bytes())
        finally:
            torch.set_num_threads(saved)
    assert outs[0] == outs[1]
