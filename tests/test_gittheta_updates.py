"""Fine-tunes stored by git-theta as low-rank (and sparse, IA³) updates of the base merge without a checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import blockmerge
from blockmerge.cli import main
from blockmerge.errors import BlockmergeError
from blockmerge.gittheta.install import install
from blockmerge.gittheta.parameters import decode_parts
from blockmerge.gittheta.repo import Repo
from blockmerge.gittheta.revision import RevisionCheckpoint
from blockmerge.gittheta.updates import apply_update

GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "tester", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "tester", "GIT_COMMITTER_EMAIL": "t@example.com"}
SHAPES = {"embed.weight": (12, 8), "layer.0.attn.weight": (8, 8), "layer.0.mlp.weight": (16, 8), "norm.weight": (8,)}
TASKS = {"task-a": 1, "task-b": 2}
RANK = 2


def git(repo: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {result.stderr.decode()[-2000:]}")
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """main: a dense base; task-a, task-b: fine-tunes added with `git theta add --update-type low-rank` and their
    factors side-loaded (vectors as plain differences); the checked-out fine-tunes kept beside the repository."""
    home = tmp_path_factory.mktemp("home")
    root = tmp_path_factory.mktemp("updates")
    repo = root / "repo"
    repo.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        for key, value in GIT_ENV.items():
            mp.setenv(key, value)
        for key in [k for k in os.environ if k.startswith(("BLOCKMERGE_", "GIT_THETA_", "GIT_DIR"))]:
            mp.delenv(key)
        git(repo, "init", "-q", "-b", "main")
        install(repo)
        git(repo, "theta", "track", "*.safetensors")
        g = torch.Generator().manual_seed(0)
        base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
        save_file(base, repo / "model.safetensors")
        git(repo, "add", ".")
        git(repo, "commit", "-qm", "base")
        for task, seed in TASKS.items():
            git(repo, "checkout", "-q", "-b", task, "main")
            g = torch.Generator().manual_seed(seed)
            factors, model = {}, {}
            for name, value in base.items():
                if value.dim() == 2:
                    r = torch.randn(value.shape[0], RANK, generator=g) * 0.1
                    c = torch.randn(RANK, value.shape[1], generator=g) * 0.1
                    factors[f"{name}/R"], factors[f"{name}/C"] = r, c
                    model[name] = value + r @ c
                else:
                    model[name] = value + 0.01 * torch.randn(value.shape, generator=g)
            save_file(factors, root / f"{task}-update.safetensors")
            save_file(model, repo / "model.safetensors")
            git(repo, "theta", "add", "model.safetensors", "--update-type", "low-rank", "--update-data",
                str(root / f"{task}-update.safetensors"))
            git(repo, "commit", "-qm", f"fine-tune {task}")
            (repo / "model.safetensors").unlink()
            git(repo, "checkout", "--", "model.safetensors")
            shutil.copy(repo / "model.safetensors", root / f"{task}.safetensors")
        git(repo, "checkout", "-q", "main")
        shutil.copy(repo / "model.safetensors", root / "base.safetensors")
        git(repo, "checkout", "-q", "task-a")
        yield repo


def test_fine_tunes_are_stored_as_low_rank_updates(repo):
    metadata = json.loads(git(repo, "show", "task-a:model.safetensors").stdout)
    main = git(repo, "rev-parse", "main").stdout.decode().strip()
    for name in SHAPES:
        theta = metadata[name]["theta_metadata"]
        assert theta["update_type"] == "low-rank" and theta["last_commit"] == main
    lfs = metadata["layer.0.mlp.weight"]["lfs_metadata"]
    parts = decode_parts(Repo(repo).read_lfs(lfs["oid"], int(lfs["size"]), "x", "y"), "x", "y")
    assert {k: v.shape for k, v in parts.items()} == {"R": (16, RANK), "C": (RANK, 8)}


@pytest.mark.parametrize("task", TASKS)
def test_a_revision_reads_as_git_thetas_checkout(repo, task):
    checked_out = load_file(repo.parent / f"{task}.safetensors")
    ckpt = RevisionCheckpoint(Repo(repo), task, "model.safetensors")
    for name, tensor in checked_out.items():
        assert torch.equal(ckpt.tensor(name), tensor), name


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_low_rank_revisions_merge_through_the_cli_as_the_checked_out_files(repo, tmp_path, monkeypatch, method):
    monkeypatch.chdir(repo)
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(main, ["merge", "--method", method, "--base", "main:model.safetensors", "--model",
                                       "task-a:model.safetensors", "--model", "task-b:model.safetensors", "-o",
                                       str(out), "-q"])
    assert result.exit_code == 0, result.output
    files = repo.parent
    expected = blockmerge.merge(method, [str(files / "task-a.safetensors"), str(files / "task-b.safetensors")],
                                base=str(files / "base.safetensors"))
    got = load_file(out)
    assert set(got) == set(expected) and all(torch.equal(got[n], expected[n]) for n in expected)


def test_git_merge_of_low_rank_fine_tunes(repo, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    result = git(copy, "merge", "--no-edit", "task-b", check=False, env={"BLOCKMERGE_METHOD": "task_arithmetic"})
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    files = repo.parent
    expected = blockmerge.merge("task_arithmetic", [str(files / "task-a.safetensors"),
                                                    str(files / "task-b.safetensors")],
                                base=str(files / "base.safetensors"))
    merged = load_file(copy / "model.safetensors")
    assert set(merged) == set(expected) and all(torch.equal(merged[n], expected[n]) for n in expected)


def test_sparse_and_ia3_updates_apply_as_git_theta_does():
    rng = np.random.default_rng(0)
    previous = rng.standard_normal((4, 5)).astype(np.float32)
    diff = np.zeros(20, dtype=np.float32)
    diff[[1, 7, 19]] = [0.5, -1.0, 2.0]
    sparse = {"data": diff[[1, 7, 19]], "indices": np.array([1, 7, 19]), "indptr": np.array([0, 3]),
              "shape": np.array([4, 5])}
    assert np.array_equal(apply_update("sparse", sparse, previous, "x", "w"), previous + diff.reshape(4, 5))
    factor = rng.standard_normal((1, 5))
    ia3 = apply_update("ia3", {"ia3": factor}, previous, "x", "w")
    assert ia3.dtype == np.float32 and np.array_equal(ia3, (previous * factor).astype(np.float32))
    low = apply_update("low-rank", {"R": np.ones((4, 1), np.float32), "C": np.ones((1, 5), np.float32)}, previous,
                       "x", "w")
    assert np.array_equal(low, previous + 1)
    with pytest.raises(BlockmergeError, match="does not apply"):
        apply_update("low-rank", {"R": np.ones((3, 1), np.float32), "C": np.ones((1, 5), np.float32)}, previous,
                     "x", "w")


@pytest.mark.parametrize("edit, path, message", [
    (lambda theta: theta.update(update_type="tucker"), "model.safetensors", "update type 'tucker' is not supported"),
    (lambda theta: theta.update(last_commit=None), "model.safetensors", "update without the commit of its previous"),
    (lambda theta: theta.update(last_commit="HEAD~1"), "model.safetensors", "corrupt git-theta metadata entry"),
    (lambda theta: None, None, "update without the commit of its previous value"),
])
def test_bad_incremental_updates_stop_with_one_line(repo, edit, path, message):
    from blockmerge.gittheta.revision import TrackedCheckpoint

    metadata = json.loads(git(repo, "show", "task-a:model.safetensors").stdout)
    edit(metadata["layer.0.attn.weight"]["theta_metadata"])
    with pytest.raises(BlockmergeError, match=message) as err:
        TrackedCheckpoint(Repo(repo), json.dumps(metadata).encode(), "edited", path)
    assert "\n" not in str(err.value)


def test_an_update_whose_previous_commit_lacks_the_file_is_named(repo):
    from blockmerge.gittheta.revision import TrackedCheckpoint

    metadata = json.loads(git(repo, "show", "task-a:model.safetensors").stdout)
    ckpt = TrackedCheckpoint(Repo(repo), json.dumps(metadata).encode(), "moved", "elsewhere/model.safetensors")
    with pytest.raises(BlockmergeError, match="that an update is based on has no elsewhere/model.safetensors"):
        ckpt.tensor("layer.0.attn.weight")


def test_a_half_precision_parameter_stored_as_an_update_is_refused(repo):
    from blockmerge.gittheta.revision import TrackedCheckpoint

    metadata = json.loads(git(repo, "show", "task-a:model.safetensors").stdout)
    entry = metadata.pop("layer.0.attn.weight")
    entry["tensor_metadata"]["dtype"] = "uint16"
    metadata["layer.0.attn.weight"] = {"#bfloat16": entry}
    with pytest.raises(BlockmergeError, match="a bfloat16 parameter stored as a low-rank update is not supported"):
        TrackedCheckpoint(Repo(repo), json.dumps(metadata).encode(), "half", "model.safetensors")
