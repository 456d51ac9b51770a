"""The README's git-theta walk-through (examples/git_theta_walkthrough.sh), run as is with an isolated HOME."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import blockmerge
from blockmerge.engine.sources import open_statistics
from blockmerge.gittheta.repo import Repo
from blockmerge.gittheta.revision import RevisionCheckpoint

pytestmark = pytest.mark.needs("git-lfs")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "git_theta_walkthrough.sh"


def tensors_at(repo: Path, rev: str) -> dict[str, torch.Tensor]:
    ckpt = RevisionCheckpoint(Repo(repo), rev, "model.safetensors")
    return {n: ckpt.tensor(n).clone() for n in ckpt.specs}


def assert_same(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_walkthrough_builds_merges_and_logs(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "BLOCKMERGE_"))}
    env.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="tester", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="tester", GIT_COMMITTER_EMAIL="t@example.com", HF_HUB_OFFLINE="1")
    result = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    repo = tmp_path / "models"
    log = result.stdout
    assert "Merge branch 'task-b' into ties-ab" in log and "Blockmerge-Method: ties" in log
    assert '"density":0.5' in log and "Fisher merge of tasks a, b and c" in log and "Blockmerge-Method: fisher" in log

    ties = blockmerge.merge("ties", models=["ties-ab^1:model.safetensors", "ties-ab^2:model.safetensors"],
                            base="main:model.safetensors", repo=repo, density=0.5, scaling_factor=1.0)
    assert_same(tensors_at(repo, "ties-ab"), ties)
    tasks = ("task-a", "task-b", "task-c")
    fisher = blockmerge.merge("fisher", models=[f"{t}:model.safetensors" for t in tasks],
                              stats=[f"{t}:fisher.safetensors" for t in tasks], repo=repo)
    assert_same(tensors_at(repo, "fisher-abc"), fisher)
    assert_same(load_file(repo / "model.safetensors"), fisher)  # fisher-abc is checked out
    assert not torch.equal(fisher["lm_head.weight"], ties["lm_head.weight"])

    stats = open_statistics("task-a:fisher.safetensors", "stats", repo)
    assert list(stats) == ["fisher"] and "model_sha256" in stats["fisher"].header()["blockmerge"]


def test_readme_shows_the_walkthrough_script():
    readme = (SCRIPT.parents[1] / "README.md").read_text()
    block = readme.split("### Walk-through", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = SCRIPT.read_text().splitlines(keepends=True)
    header = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    assert block.strip() == "".join(lines[header:]).strip()
