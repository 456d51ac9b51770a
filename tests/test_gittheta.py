"""Checkpoints under git-theta: real git, git-lfs and git-theta in temporary repositories with an isolated HOME.

A module-wide repository holds a small model family (float32, bfloat16, float16 and int64 tensors) on
branches, with Fisher and input-Gram statistics next to each model; it is committed by plumbing through
blockmerge's writer (no checkout needed), then checked out once. Tests that change it work on a copy.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import blockmerge
from blockmerge.errors import BlockmergeError
from blockmerge.gittheta.install import install
from blockmerge.gittheta.merges import two_way
from blockmerge.gittheta.parameters import decode, encode, lsh_signature
from blockmerge.gittheta.repo import Repo
from blockmerge.gittheta.revision import RevisionCheckpoint, TrackedCheckpoint
from blockmerge.gittheta.writer import track_safetensors
from blockmerge.plugins import get, parse_hyperparameters

pytestmark = pytest.mark.needs("git-lfs")

GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "tester", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "tester", "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_TERMINAL_PROMPT": "0"}
SPECS = {"embed.weight": ((12, 8), torch.float32), "layer.0.attn.weight": ((8, 8), torch.bfloat16),
         "layer.0.norm": ((8,), torch.float16), "head.bias": ((), torch.float32), "position_ids": ((6,), torch.int64)}
TASKS = ("task-a", "task-b", "task-c")


def git(repo: Path, *args: str, check: bool = True, env: dict | None = None, input: bytes | None = None):
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, env={**os.environ, **(env or {})},
                            input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {result.stderr.decode()[-2000:]}")
    return result


def family(seed: int = 0) -> tuple[dict, dict[str, dict], dict[str, dict]]:
    """(base, {task: model}, {task or 'main': {kind: statistic}}); statistics are float32."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.arange(s[0]) if d == torch.int64 else torch.randn(s, generator=g).to(d)
            for n, (s, d) in SPECS.items()}
    models = {t: {n: (v + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
                  for n, v in base.items()} for t in TASKS}
    stats = {}
    for owner in ("main", *TASKS):
        fisher = {n: torch.rand(v.shape, generator=g) + 0.01 for n, v in base.items() if v.is_floating_point()}
        gram = {}
        for n, v in base.items():
            if v.dim() == 2:
                x = torch.randn(20, v.shape[1], generator=g)
                gram[n] = x.T @ x / 20
        stats[owner] = {"fisher": fisher, "gram_in": gram}
    return base, models, stats


def commit_files(repo: Path, branch: str, parent: str | None, files: dict[str, dict | bytes], message: str) -> str:
    """Commit files on `branch` without a checkout: checkpoints as the metadata blockmerge's writer makes."""
    env = {"GIT_INDEX_FILE": str(repo / ".git" / "plumbing-index")}
    git(repo, "read-tree", *([parent] if parent else ["--empty"]), env=env)
    for path, content in files.items():
        if isinstance(content, dict):
            tmp = repo / ".git" / "plumbing.safetensors"
            save_file(content, tmp, metadata={"format": "pt"})
            content = track_safetensors(Repo(repo), tmp, parent)
        blob = git(repo, "hash-object", "-w", "--stdin", input=content).stdout.decode().strip()
        git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
    tree = git(repo, "write-tree", env=env).stdout.decode().strip()
    commit = git(repo, "commit-tree", tree, *(["-p", parent] if parent else []), "-m", message).stdout.decode().strip()
    git(repo, "update-ref", f"refs/heads/{branch}", commit)
    return commit


def tensors_at(repo: Path, rev: str, path: str = "model.safetensors") -> dict[str, torch.Tensor]:
    ckpt = RevisionCheckpoint(Repo(repo), rev, path)
    return {n: ckpt.tensor(n).clone() for n in ckpt.specs}


def assert_same(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), name


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        for key, value in GIT_ENV.items():
            mp.setenv(key, value)
        for key in [k for k in os.environ if k.startswith(("BLOCKMERGE_", "GIT_THETA_", "GIT_DIR", "GITHEAD_"))]:
            mp.delenv(key)
        yield home


@pytest.fixture(scope="module")
def family_repo(isolated, tmp_path_factory):
    """Branches main (base), task-a/b/c and task-wide (a wider embedding), task-a checked out."""
    repo = tmp_path_factory.mktemp("family") / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "core.checkStat", "minimal")  # copies of the repository keep their index valid
    git(repo, "config", "core.trustctime", "false")
    install(repo)
    base, models, stats = family()
    attributes = b"*.safetensors filter=theta merge=theta diff=theta\n"
    main = commit_files(repo, "main", None, {".gitattributes": attributes, "model.safetensors": base,
                                             "fisher.safetensors": stats["main"]["fisher"]}, "Base")
    for task in TASKS:
        commit_files(repo, task, main, {"model.safetensors": models[task], **{
            f"{kind}.safetensors": stats[task][kind] for kind in ("fisher", "gram_in")}}, f"Fine-tune {task}")
    wide = {**models["task-b"], "embed.weight": torch.zeros(12, 9)}
    commit_files(repo, "task-wide", main, {"model.safetensors": wide}, "Wider embedding")
    git(repo, "checkout", "-q", "-f", "task-a")
    return repo, base, models, stats


@pytest.fixture
def repo_copy(family_repo, tmp_path, monkeypatch):
    repo, *rest = family_repo
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    monkeypatch.chdir(copy)
    return (copy, *rest)


def test_hash_and_encoding_are_git_thetas():
    from git_theta import lsh, params

    rng = np.random.default_rng(0)
    for array in (rng.normal(size=(70_000,)).astype(np.float32),):  # two chunks of the running sum
        assert lsh_signature(array) == lsh.get_lsh().hash(array).tolist()
        theirs = asyncio.run(params.get_update_serializer().serialize({"parameter": array}))
        assert encode(array) == theirs
        assert np.array_equal(decode(theirs, "x", "y"), array)


def test_revisions_read_without_checkout_and_merge_like_in_memory(family_repo, monkeypatch):
    repo, base, models, stats = family_repo
    monkeypatch.chdir(repo.parent)
    assert_same(tensors_at(repo, "task-b"), models["task-b"])
    got = blockmerge.merge("ties", models=["task-a:model.safetensors", "task-b:model.safetensors"],
                           base="main:model.safetensors", repo=repo, density=0.5)
    assert_same(got, blockmerge.merge("ties", models=[models["task-a"], models["task-b"]], base=base, density=0.5))
    with pytest.raises(BlockmergeError, match="unknown revision 'nope'"):
        blockmerge.merge("average", models=["nope:model.safetensors"], repo=repo)


def test_mats_starts_from_a_checkpoint_at_a_revision(family_repo, monkeypatch):
    repo, base, models, stats = family_repo
    monkeypatch.chdir(repo.parent)
    options = dict(models=[models["task-a"], models["task-b"]], objective="diagonal_fisher", num_iterations=3,
                   stats=[{"fisher": stats[t]["fisher"]} for t in ("task-a", "task-b")])
    at_revision = blockmerge.merge("mats", initialization="main:model.safetensors", repo=repo, **options)
    assert_same(at_revision, blockmerge.merge("mats", initialization=base, **options))
    with pytest.raises(BlockmergeError, match="hyperparameter initialization: .*unknown revision 'nope'"):
        blockmerge.merge("mats", initialization="nope:model.safetensors", repo=repo, **options)


@pytest.mark.parametrize("method", two_way())
def test_each_git_theta_plugin_merges_like_blockmerge(repo_copy, monkeypatch, method):
    """git-theta's merge tool calls a plugin per parameter; every parameter equals blockmerge.merge's."""
    from git_theta import metadata

    from blockmerge.gittheta.merges import menu

    repo, base, models, stats = repo_copy
    settings = {"mats": {"objective": "diagonal_fisher", "num_iterations": "20"}}.get(method, {})
    for name, value in settings.items():
        monkeypatch.setenv(f"BLOCKMERGE_SET_{name.upper()}", value)
    theirs = git(repo, "rev-parse", "task-b").stdout.decode().strip()
    monkeypatch.setenv(f"GITHEAD_{theirs}", "task-b")
    flat = {rev: metadata.Metadata.from_metadata_dict(json.loads(git(repo, "show", f"{rev}:model.safetensors").stdout))
            .flatten() for rev in ("task-a", "task-b", "main")}
    plugin = menu()[f"blockmerge-{method}"]()
    merged = {keys: plugin(keys, flat["task-a"][keys], flat["task-b"][keys], flat["main"][keys], flat["task-a"],
                           flat["task-b"], flat["main"], {}, {}, {}, "model.safetensors")
              for keys in flat["task-a"]}
    out = repo / "merged.json"
    metadata.Metadata(merged).unflatten().write(str(out))
    ckpt = TrackedCheckpoint(Repo(repo), out.read_bytes(), "merged")
    spec = get(method)
    hp, _ = parse_hyperparameters(spec, settings)
    expected = blockmerge.merge(method, models=[models["task-a"], models["task-b"]],
                                base=base if spec.needs(hp).base else None,
                                stats=[stats["task-a"], stats["task-b"]],
                                base_stats={"fisher": stats["main"]["fisher"]}, **settings)
    assert_same({n: ckpt.tensor(n) for n in ckpt.specs}, expected)


def test_git_merge_uses_the_configured_method_and_statistics_at_both_revisions(repo_copy):
    repo, base, models, stats = repo_copy
    before = git(repo, "rev-parse", "HEAD").stdout.decode().strip()
    result = git(repo, "merge", "--no-edit", "task-b", check=False, env={"BLOCKMERGE_METHOD": "fisher"})
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert git(repo, "rev-parse", "HEAD^1").stdout.decode().strip() == before
    expected = blockmerge.merge("fisher", models=[models["task-a"], models["task-b"]],
                                stats=[stats["task-a"], stats["task-b"]])
    assert_same(tensors_at(repo, "HEAD"), expected)
    assert_same(load_file(repo / "model.safetensors"), expected)  # the checkout
    assert_same(tensors_at(repo, "HEAD", "fisher.safetensors"), stats["task-a"]["fisher"])  # ours kept
    message = git(repo, "log", "-1", "--format=%B").stdout.decode()
    assert "Blockmerge-Method: fisher" in message and "Blockmerge-Checkpoint: model.safetensors" in message
    theirs = git(repo, "rev-parse", "task-b").stdout.decode().strip()
    assert f"Blockmerge-Statistics: model 1 fisher {theirs}:fisher.safetensors" in message
    assert git(repo, "status", "--porcelain").stdout == b""


def test_a_git_merge_of_different_shapes_fails_and_aborts_to_where_it_was(repo_copy):
    repo, base, models, stats = repo_copy
    head = git(repo, "rev-parse", "HEAD").stdout
    result = git(repo, "merge", "--no-edit", "task-wide", check=False, env={"BLOCKMERGE_METHOD": "average"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.decode().splitlines() if line.startswith("blockmerge: error:")]
    assert len(errors) == 1 and "embed.weight" in errors[0] and "shape [12, 9] does not match [12, 8]" in errors[0]
    assert git(repo, "rev-parse", "HEAD").stdout == head
    git(repo, "merge", "--abort")
    assert git(repo, "status", "--porcelain").stdout == b""
    assert_same(load_file(repo / "model.safetensors"), models["task-a"])


def test_nway_merge_with_statistics_at_revisions_is_committed_with_provenance(repo_copy, tmp_path):
    repo, base, models, stats = repo_copy
    commits = {t: git(repo, "rev-parse", t).stdout.decode().strip() for t in TASKS}  # task-a is checked out: it moves
    args = ["--method", "fisher", "--base", "main:model.safetensors", "--out", str(repo / "model.safetensors"),
            "--repo", str(repo), "--commit", "-m", "Fisher of three", "-q"]
    for i, task in enumerate(TASKS):
        args += ["--model", f"{task}:model.safetensors", "--stats", f"{i}={task}:fisher.safetensors"]
    result = subprocess.run([sys.executable, "-m", "blockmerge", "merge", *args], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = blockmerge.merge("fisher", models=[models[t] for t in TASKS],
                                stats=[{"fisher": stats[t]["fisher"]} for t in TASKS])
    assert_same(tensors_at(repo, "HEAD"), expected)
    assert_same(load_file(repo / "model.safetensors"), expected)
    message = git(repo, "log", "-1", "--format=%B").stdout.decode()
    assert message.startswith("Fisher of three\n\n")
    assert "Blockmerge-Method: fisher" in message and '"fisher_floor":1e-08' in message
    for task in TASKS:
        assert f"Blockmerge-Input: model {task} {commits[task]} tensors-blake3:" in message
    assert git(repo, "status", "--porcelain").stdout == b""

    head = git(repo, "rev-parse", "HEAD").stdout
    wide = ["--method", "average", "--model", "task-a:model.safetensors", "--model", "task-wide:model.safetensors",
            "--out", str(repo / "model.safetensors"), "--repo", str(repo), "--commit", "-q"]
    result = subprocess.run([sys.executable, "-m", "blockmerge", "merge", *wide], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 2 and "does not match" in result.stderr
    assert git(repo, "rev-parse", "HEAD").stdout == head
    assert git(repo, "status", "--porcelain").stdout == b""


def test_half_precision_tracks_and_checks_out_bit_exactly(isolated, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    install(repo)
    git(repo, "theta", "track", "*.safetensors")
    git(repo, "theta", "track", "*.pt")
    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(5, 3, generator=g).to(torch.bfloat16), "b": torch.randn(4, generator=g).half(),
               "c": torch.tensor(float("nan")).to(torch.bfloat16), "d": torch.randn(2, 2, generator=g)}
    save_file(tensors, repo / "model.safetensors", metadata={"format": "pt", "note": "kept"})
    torch.save(tensors, repo / "model.pt")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "half")
    (repo / "model.safetensors").unlink()
    (repo / "model.pt").unlink()
    git(repo, "checkout", "--", ".")
    for loaded in (load_file(repo / "model.safetensors"), torch.load(repo / "model.pt", weights_only=True)):
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype
            assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    from safetensors import safe_open

    assert safe_open(repo / "model.safetensors", "pt").metadata() == {"format": "pt", "note": "kept"}
    assert git(repo, "status", "--porcelain").stdout == b""


def test_a_missing_or_corrupt_lfs_object_is_a_clear_error(repo_copy):
    repo, *_ = repo_copy
    git_repo = Repo(repo)
    ckpt = RevisionCheckpoint(git_repo, "task-c", "model.safetensors")
    missing, corrupt = ckpt.entries["embed.weight"], ckpt.entries["layer.0.norm"]
    git_repo.lfs_path(missing.oid).unlink()
    data = bytearray(git_repo.lfs_path(corrupt.oid).read_bytes())
    data[-1] ^= 1
    git_repo.lfs_path(corrupt.oid).write_bytes(bytes(data))
    with pytest.raises(BlockmergeError, match=r"task-c:model.safetensors: parameter 'embed.weight': Git LFS object "
                                              f"{missing.oid} is missing"):
        ckpt.tensor("embed.weight")
    with pytest.raises(BlockmergeError, match=r"parameter 'layer.0.norm': Git LFS object \w+ is corrupt"):
        ckpt.tensor("layer.0.norm")


@pytest.mark.parametrize("checkpoint_type", ["safetensors", "blockmerge-safetensors"])
def test_git_thetas_own_checkpoint_setting_still_gives_files_safetensors_and_transformers_read(
        isolated, tmp_path, checkpoint_type):
    """git-theta's docs tell safetensors users to export GIT_THETA_CHECKPOINT_TYPE=safetensors: with it exported for
    every git command, a two-branch merge through the prompt-free driver leaves a checkout that loads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    repo = tmp_path / "repo"
    repo.mkdir()
    env = {"GIT_THETA_CHECKPOINT_TYPE": checkpoint_type}
    git(repo, "init", "-q", "-b", "main")
    install(repo)
    (repo / ".gitattributes").write_text("*.safetensors filter=theta merge=theta diff=theta\n")
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(repo)
    git(repo, "add", ".", env=env)
    git(repo, "commit", "-q", "-m", "base", env=env)
    base = load_file(repo / "model.safetensors")
    tuned = {}
    for branch, seed in (("task-a", 1), ("task-b", 2)):
        git(repo, "checkout", "-q", "-b", branch, "main", env=env)
        g = torch.Generator().manual_seed(seed)
        tuned[branch] = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        save_file(tuned[branch], repo / "model.safetensors")  # no header metadata, as safetensors writes it
        git(repo, "commit", "-q", "-am", branch, env=env)
    result = git(repo, "merge", "--no-edit", "task-a", check=False, env={**env, "BLOCKMERGE_METHOD": "average"})
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    expected = blockmerge.merge("average", models=[tuned["task-b"], tuned["task-a"]])
    assert_same(load_file(repo / "model.safetensors"), expected)
    model = LlamaForCausalLM.from_pretrained(repo)
    assert_same({n: p.detach() for n, p in model.state_dict().items() if n in expected}, expected)
    assert git(repo, "status", "--porcelain", env=env).stdout == b""


def test_checkpoint_types_of_other_formats_apply_to_other_files_and_are_not_merged(repo_copy, monkeypatch):
    from blockmerge.gittheta.filter import check_checkpoint_type, checkpoint_type

    repo = repo_copy[0]
    for configured in (None, "safetensors", "pytorch", "tensorflow", "blockmerge-pytorch"):
        assert checkpoint_type("dir/model.safetensors", configured) == "blockmerge-safetensors"
        assert checkpoint_type("pytorch_model.bin", configured) == "blockmerge-pytorch"
    assert checkpoint_type("weights.ckpt", "safetensors") == "blockmerge-safetensors"
    assert checkpoint_type("weights.msgpack", "flax") == "flax"
    monkeypatch.setenv("GIT_THETA_CHECKPOINT_TYPE", "flax")
    check_checkpoint_type("model.safetensors")
    with pytest.raises(BlockmergeError, match="GIT_THETA_CHECKPOINT_TYPE=flax: blockmerge merges safetensors"):
        check_checkpoint_type("weights.msgpack")
    installed = subprocess.run([sys.executable, "-m", "blockmerge.gittheta", "install"], cwd=repo,
                               capture_output=True, text=True)
    assert installed.returncode == 0
    assert installed.stderr.startswith("blockmerge: note: GIT_THETA_CHECKPOINT_TYPE=flax applies only to files")


def test_the_merge_menu_lists_every_registered_method_beside_git_thetas_own(tmp_path, monkeypatch):
    """A method another package registers appears in git-theta's menu with no edit of blockmerge."""
    from blockmerge import plugins
    from blockmerge.gittheta.merges import menu

    info = tmp_path / "third_party-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[blockmerge.methods]\nnegated = third_party_negated:METHOD\n")
    (tmp_path / "third_party_negated.py").write_text(
        "import dataclasses\nfrom blockmerge.plugins.average import METHOD as AVERAGE\n"
        "METHOD = dataclasses.replace(AVERAGE, name='negated')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.registry.cache_clear()
    try:
        listed = menu()
    finally:
        monkeypatch.undo()
        plugins.registry.cache_clear()
    assert {f"blockmerge-{name}" for name in [*two_way(), "negated"]} <= set(listed)
    assert {"take_us", "take_them", "context"} <= set(listed)  # git-theta's own plugins stay


def test_the_pytorch_checkpoint_plugin_refuses_a_tensor_that_declares_more_than_it_stores(tmp_path):
    """git-theta's clean filter reads .bin files through this plugin: an expanded tensor of a few stored bytes
    declaring 65536 × 65536 elements is refused, not copied out to 16 GiB."""
    from blockmerge.gittheta.checkpoint import TorchCheckpoint

    path = tmp_path / "expanded.bin"
    torch.save({"w": torch.zeros(1).expand(65536, 65536), "b": torch.ones(3)}, path)
    with pytest.raises(ValueError, match="w: tensor of shape \\[65536, 65536\\]"):
        TorchCheckpoint.load(str(path))
    torch.save({"w": torch.randn(4, 8).T, "b": torch.ones(3)}, path)
    assert TorchCheckpoint.load(str(path))["w"].shape == (8, 4)
