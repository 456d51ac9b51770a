"""Ctrl-C: real `python -m blockmerge` processes sent SIGINT while imports run and while a merge runs (held at
a fault point) end with one line and exit status 130, the partial output kept resumable; a second quick
SIGINT never aborts the process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import blockmerge

INTERRUPTED = "blockmerge: interrupted (rerun with --resume to continue)"


def start(base: Path, models: list[Path], out: Path, fault: str | None = None) -> subprocess.Popen:
    args = ["merge", "-q", "--method", "ties", "--base", str(base), *sum((["--model", str(m)] for m in models), []),
            "--out", str(out), "--block-size", "512"]
    env = {k: v for k, v in os.environ.items() if k != "BLOCKMERGE_FAULT"}
    if fault:
        env["BLOCKMERGE_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "blockmerge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def interrupt(process: subprocess.Popen, *gaps: float) -> tuple[int, str]:
    """SIGINT now and after each gap (seconds); the exit status and stderr."""
    process.send_signal(signal.SIGINT)
    for gap in gaps:
        time.sleep(gap)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def journaled(path: Path) -> list[str]:
    """Names of the blocks a journal lists (its other entries, and a line being written, left out)."""
    names = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            names.append(json.loads(line)["name"])
        except (ValueError, KeyError):
            pass
    return names


def wait_for_blocks(path: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while len(journaled(path)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("delay", [0.3, 0.6, 1.5])
@pytest.mark.parametrize("gaps", [(), (0.01,)], ids=["once", "twice"])
def test_interrupt_while_importing_is_one_line_and_status_130(family, tmp_path, delay, gaps):
    base, models, base_path, model_paths = family
    process = start(base_path, model_paths, tmp_path / "out.safetensors")
    time.sleep(delay)
    code, err = interrupt(process, *gaps)
    if code == 0:
        pytest.skip("the merge finished before the signal")  # a very fast machine
    assert code == 130, err
    assert err.splitlines() == [INTERRUPTED]


@pytest.mark.parametrize("gaps", [(), (0.002,), (0.05, 0.05)], ids=["once", "twice", "three-times"])
def test_interrupt_during_a_merge_keeps_it_resumable(family, tmp_path, gaps):
    base, models, base_path, model_paths = family
    out = tmp_path / "out.safetensors"
    journal = tmp_path / f".{out.name}.blockmerge-partial" / "journal.jsonl"
    process = start(base_path, model_paths, out, fault="block:2:pause")
    wait_for_blocks(journal, 2, process)
    code, err = interrupt(process, *gaps)
    assert code == 130, err
    assert err.splitlines() == [INTERRUPTED]
    assert not out.exists() and len(journaled(journal)) == 2
    summary = blockmerge.merge("ties", model_paths, base=base_path, out=out, block_size=512, resume=True)
    assert summary.blocks_resumed == 2
    expected = blockmerge.merge("ties", model_paths, base=base_path)
    got = load_file(out)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
