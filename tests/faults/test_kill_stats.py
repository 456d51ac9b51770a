"""Statistics runs killed mid-way: nothing visible at the output, and a rerun gives the same arrays."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import write_family
from test_methods import quantised_family
from test_stats_cli import SENTENCES
from test_stats_data import tiny_model, tiny_tokenizer

from blockmerge.engine.sources import open_statistics


def run(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"BLOCKMERGE_FAULT": fault} if fault else {})}
    return subprocess.run([sys.executable, "-m", "blockmerge", *args], capture_output=True, text=True, env=env)


def arrays(store) -> dict[tuple[str, str], torch.Tensor]:
    return {(k, n): c.read(n, 0, c.specs[n].rows) for k, c in open_statistics(store, "s").items() for n in c.specs}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill-stats")
    base, models = quantised_family(1, seed=3)
    base_path, model_paths = write_family(tmp, base, models)
    model, tokenizer = tiny_model("classification"), tiny_tokenizer("classification")
    model.save_pretrained(tmp / "cls")
    tokenizer.save_pretrained(tmp / "cls")
    with open(tmp / "cls.jsonl", "w") as f:
        for i, s in enumerate(SENTENCES):
            f.write(json.dumps({"text": s, "label": i % 3}) + "\n")
    return tmp, base_path, model_paths[0]


@pytest.mark.parametrize("statistic,fault", [("trimmed", "pass:2"), ("trimmed", "block:3"), ("trimmed", "commit:1"),
                                             ("gram", "block:2"), ("fisher", "block:1")])
def test_killed_statistics_run_leaves_nothing_and_reruns_identically(inputs, tmp_path, statistic, fault):
    tmp, base_path, model_path = inputs
    if statistic == "trimmed":
        args = ["stats", "trimmed", "--model", str(model_path), "--base", str(base_path), "--block-size", "256"]
    else:
        args = ["stats", statistic, "--model", str(tmp / "cls"), "--data", str(tmp / "cls.jsonl"), "--outputs"]
        args = args if statistic == "gram" else args[:-1]
    reference = run([*args, "--out", str(tmp_path / "reference")])
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "out"
    killed = run([*args, "--out", str(out)], fault)
    assert killed.returncode == -9
    assert not out.exists()
    rerun = run([*args, "--out", str(out)])
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference"]
    got, want = arrays(out), arrays(tmp_path / "reference")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
