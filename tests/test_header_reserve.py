"""A single `.safetensors` output holds the whole provenance in its header, however many tensors report on their
merge and however long the options: the header is sized before the merge (and grown if a method reports more
than it declared), never failing once every block is written."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import blockmerge
from blockmerge.engine.job import Job, check
from blockmerge.engine.run import execute
from blockmerge.plugins import Block, Common, Method

NAMES = [f"model.layers.{layer}.{part}.weight" for layer in range(80)
         for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]


def many_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(2, generator=g) for n in NAMES}


def provenance(path) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["blockmerge"])


def test_mats_reports_of_720_tensors_fit_in_one_safetensors_file(tmp_path):
    base, models = many_tensors(0), [many_tensors(1), many_tensors(2)]
    g = torch.Generator().manual_seed(3)
    stats = [{"fisher": {n: torch.rand(2, generator=g) + 0.1 for n in NAMES}} for _ in models]
    out = tmp_path / "out.safetensors"
    summary = blockmerge.merge("mats", models, base=base, stats=stats, objective="diagonal_fisher", out=out)
    assert len(summary.reports) == len(NAMES) == 720
    assert provenance(out)["reports"] == json.loads(json.dumps(summary.reports))
    expected = blockmerge.merge("mats", models, base=base, stats=stats, objective="diagonal_fisher")
    got = load_file(out)
    assert all(torch.equal(got[n], expected[n]) for n in NAMES)


def test_a_70kb_exclude_pattern_fits_in_one_safetensors_file(tmp_path):
    base, models = many_tensors(0), [many_tensors(1), many_tensors(2)]
    pattern = "^(" + "|".join(f"never\\.matches\\.{i:05d}\\.weight" for i in range(3000)) + ")$"
    assert len(pattern) > 70_000
    out = tmp_path / "out.safetensors"
    blockmerge.merge("task_arithmetic", models, base=base, out=out, exclude=[pattern])
    assert provenance(out)["common"]["exclude"] == [pattern]


@dataclass(frozen=True)
class Chatty:
    """No hyperparameters."""


def _chatty(block: Block, hp: Chatty, state: dict) -> torch.Tensor:
    block.report = {"note": "a report longer than the method declared " * 40}
    return block.models[0]


def test_reports_beyond_what_the_method_declared_still_reach_the_header(tmp_path):
    method = Method(name="chatty", description="first model, with long reports", hyperparameters=Chatty,
                    merge=_chatty, granularity="tensor")
    models = [many_tensors(1)]
    from blockmerge.engine.sources import open_checkpoint

    job = Job(method=method, hyperparameters=Chatty(), common=Common(), models=[open_checkpoint(models[0], "m")])
    out = tmp_path / "out.safetensors"
    summary, _ = execute(job, check(job), out, out_format="safetensors")
    assert len(provenance(out)["reports"]) == len(NAMES)
    assert all(torch.equal(t, models[0][n]) for n, t in load_file(out).items())
    assert not (tmp_path / f".{out.name}.blockmerge-partial").exists()


LATE_FAILURE = """
import resource, sys
from dataclasses import dataclass
from blockmerge.engine.job import Job, check
from blockmerge.engine.run import execute
from blockmerge.engine.sources import open_checkpoint
from blockmerge.plugins import Common, Method

@dataclass(frozen=True)
class Chatty:
    pass

def merge(block, hp, state):
    block.report = {"note": "x" * 2000}
    return block.models[0]

model, out, limit = sys.argv[1:]
if int(limit):
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
method = Method(name="chatty", description="", hyperparameters=Chatty, merge=merge, granularity="tensor")
job = Job(method=method, hyperparameters=Chatty(), common=Common(), models=[open_checkpoint(model, "m")])
summary, _ = execute(job, check(job), out, out_format="safetensors", resume=not int(limit))
print(summary.blocks_resumed)
"""


def test_a_failure_once_every_block_is_written_keeps_them_for_resume(tmp_path):
    """The header grows by a copy of the file (reports beyond what the method declared); a file-size limit makes
    that copy fail: the error says to resume, which then only seals the output."""
    model = {**many_tensors(1), "big.weight": torch.ones(2048, 1024)}  # 8 MiB: the copy goes past the limit
    save_file(model, tmp_path / "model.safetensors")
    out = tmp_path / "out.safetensors"

    def run(limit: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", LATE_FAILURE, str(tmp_path / "model.safetensors"), str(out),
                               str(limit)], capture_output=True, text=True)

    failed = run(9_400_000)
    assert failed.returncode != 0 and "rerun with --resume to finish" in failed.stderr, failed.stderr
    work = tmp_path / f".{out.name}.blockmerge-partial"
    assert not out.exists() and sorted(p.name for p in work.iterdir()) == ["journal.jsonl", out.name, "request.json"]
    resumed = run(0)
    assert resumed.returncode == 0, resumed.stderr
    assert int(resumed.stdout) == len(model)
    assert len(provenance(out)["reports"]) == len(model) and not work.exists()
    assert all(torch.equal(t, model[n]) for n, t in load_file(out).items())
