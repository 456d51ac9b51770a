"""Where an output may go: never onto or around an input, into an input directory only as a new path (never
into a store); `--overwrite` replaces only blockmerge's own outputs of the same kind, a file in one atomic
rename; symbolic links in the way are refused before any block is read; missing parent directories are
created; `..` in `--out` works.

Real files, the real CLI (in-process through CliRunner, or its own process where a fault point kills it).
"""

from __future__ import annotations

import gc
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import blockmerge
from blockmerge import api
from blockmerge.cli import main


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g),
            "ids": torch.arange(4, dtype=torch.int64)}


def cli(*args: object) -> tuple[int, str]:
    """Exit code and stderr of the CLI run in-process."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    code, stderr = result.exit_code, result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += repr(result.exception)
    del result
    gc.collect()
    return code, stderr


def process(*args: object, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"BLOCKMERGE_FAULT": fault} if fault else {})}
    return subprocess.run([sys.executable, "-m", "blockmerge", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def one_line(code: int, stderr: str, *needles: str) -> str:
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("blockmerge: error: "), stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def digests(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (a root may be a file), symbolic links as their targets' names."""
    out = {}
    for root in roots:
        paths = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for p in paths:
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class World:
    """Inputs of every kind under tmp/models (files, a Hugging Face directory, a store), a note next to them."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.models = tmp / "models"
        self.models.mkdir()
        self.a = self.models / "a.safetensors"
        save_file(tensors(1), self.a)
        self.hf = self.models / "hf"
        self.hf.mkdir()
        save_file(tensors(2), self.hf / "model.safetensors")
        (self.hf / "config.json").write_text('{"model_type": "toy"}')
        self.store = self.models / "c.store"
        api.convert(self.a, self.store)
        self.base = self.models / "base.safetensors"
        save_file(tensors(0), self.base)
        self.notes = self.models / "notes.txt"
        self.notes.write_text("not a checkpoint, keep me")
        self.outdir = tmp / "out"
        self.outdir.mkdir()

    def args(self, out: object, *extra: object, method: str = "task_arithmetic") -> list:
        return ["merge", "-q", "--method", method, "--base", self.base, "--model", self.a, "--model", self.hf,
                "--model", self.store, "--out", out, "--block-size", "64B", *extra]

    def snapshot(self) -> dict[str, str]:
        return digests(self.models)


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path)


# ------------------------------------------------------------------------------------ outputs that are inputs


@pytest.mark.parametrize("target", ["model file", "hf directory", "hf weights", "hf config", "base", "store",
                                    "store manifest", "inside the store", "symlink to a model",
                                    "previous output inside the hf directory"])
def test_an_input_is_never_the_output_even_with_overwrite(world, target):
    out = {"model file": world.a, "hf directory": world.hf, "hf weights": world.hf / "model.safetensors",
           "hf config": world.hf / "config.json", "base": world.base, "store": world.store,
           "store manifest": world.store / "blockmerge.json", "inside the store": world.store / "merged.safetensors",
           "symlink to a model": world.outdir / "alias.safetensors",
           "previous output inside the hf directory": world.hf / "old.safetensors"}[target]
    if target == "symlink to a model":
        out.symlink_to(world.a)
    if target.startswith("previous"):
        api.convert(world.a, out)
    before = world.snapshot()
    one_line(*cli(*world.args(out, "--overwrite")), "this run")
    assert world.snapshot() == before


def test_a_new_output_may_go_next_to_a_model_in_its_directory(world):
    """As statistics do (`--model . --out fisher.safetensors`): a new path inside an input directory (not a
    store) changes no input; once there, it is not replaced while that directory is an input."""
    before = world.snapshot()
    out = world.hf / "merged.safetensors"
    code, stderr = cli(*world.args(out))
    assert code == 0, stderr
    after = world.snapshot()
    assert {k: after[k] for k in before} == before and str(out) in after
    one_line(*cli(*world.args(out, "--overwrite")), "exists inside an input directory")
    assert world.snapshot() == after


@pytest.mark.parametrize("where", ["models", ".", "tmp"])
def test_a_directory_holding_the_inputs_is_never_the_output(world, where, monkeypatch):
    monkeypatch.chdir(world.models)
    out = {"models": world.models, ".": ".", "tmp": world.tmp}[where]
    before = world.snapshot()
    one_line(*cli(*world.args(out, "--overwrite")), "input")
    assert world.snapshot() == before
    assert world.notes.read_text() == "not a checkpoint, keep me"


def test_statistics_are_inputs_too(world):
    stats = world.outdir / "a.trimmed"
    assert cli("stats", "trimmed", "--model", world.a, "--base", world.base, "--out", stats)[0] == 0
    before = digests(stats)
    args = ["merge", "-q", "--method", "ties", "--base", world.base, "--model", world.a, "--model", world.a,
            "--stats", f"0={stats}", "--stats", f"1={stats}", "--out", stats, "--overwrite"]
    one_line(*cli(*args), "this run")
    assert digests(stats) == before


def test_a_statistics_computation_never_writes_onto_its_model(world):
    before = world.snapshot()
    one_line(*cli("stats", "trimmed", "--model", world.a, "--base", world.base, "--out", world.base,
                  "--overwrite"), "input")
    one_line(*cli("stats", "trimmed", "--model", world.a, "--base", world.base, "--out", world.models,
                  "--overwrite"), "input")
    assert world.snapshot() == before


def test_export_and_import_never_write_onto_their_source(world):
    before = world.snapshot()
    one_line(*cli("export", world.store, world.store / "x.safetensors", "--overwrite"), "this run")
    one_line(*cli("import", world.store, world.store / "x.store", "--overwrite"), "this run")
    one_line(*cli("import", world.hf, world.hf, "--overwrite"), "this run")
    assert world.snapshot() == before


# ------------------------------------------------------------------------- --overwrite replaces only our own


@pytest.mark.parametrize("thing", ["junk file", "foreign safetensors", "plain directory", "foreign hf directory"])
def test_overwrite_refuses_what_blockmerge_did_not_write(world, thing):
    name = "x.safetensors" if thing in ("junk file", "foreign safetensors") else "x"
    out = world.outdir / name
    if thing == "junk file":
        out.write_bytes(b"precious bytes")
    elif thing == "foreign safetensors":
        save_file(tensors(5), out)
    else:
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
        if thing == "foreign hf directory":
            save_file(tensors(5), out / "model.safetensors")
    extra = ("--format", "hf") if thing == "foreign hf directory" else ()
    before = digests(world.outdir)
    one_line(*cli(*world.args(out, "--overwrite", *extra)), "not a blockmerge output")
    assert digests(world.outdir) == before
    assert sorted(p.name for p in world.outdir.iterdir()) == [name]


@pytest.mark.parametrize("kind", ["file", "store", "hf", "safetensors shards"])
def test_overwrite_replaces_a_previous_output_of_the_same_kind(world, kind):
    out = world.outdir / ("x.safetensors" if kind == "file" else "x")
    extra = {"file": (), "store": (), "hf": ("--format", "hf"),
             "safetensors shards": ("--format", "safetensors", "--max-shard-size", "64B")}[kind]
    assert cli(*world.args(out, *extra, method="average"))[0] == 0
    code, stderr = cli(*world.args(out, "--overwrite", *extra))
    assert code == 0, stderr
    expected = blockmerge.merge("task_arithmetic", [world.a, world.hf, world.store], base=world.base)
    check = world.tmp / "check.safetensors"
    api.convert(out, check)
    got = load_file(check)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert sorted(p.name for p in world.outdir.iterdir()) == ["x.safetensors" if kind == "file" else "x"]


def test_overwrite_keeps_an_output_of_another_kind(world):
    store = world.outdir / "x"
    assert cli(*world.args(store))[0] == 0
    before = digests(world.outdir)
    one_line(*cli(*world.args(store, "--overwrite", "--format", "hf")), "store")
    assert digests(world.outdir) == before


def test_a_statistics_file_is_replaced_by_a_statistics_file(world):
    out = world.outdir / "trimmed.safetensors"
    args = ["stats", "trimmed", "--model", world.a, "--base", world.base, "--out", out]
    assert cli(*args)[0] == 0
    assert cli(*args, "--overwrite", "--density", "0.5")[0] == 0
    foreign = world.outdir / "fisher.safetensors"
    save_file(tensors(3), foreign)
    before = digests(foreign)
    one_line(*cli("stats", "trimmed", "--model", world.a, "--base", world.base, "--out", foreign, "--overwrite"),
             "not a blockmerge output")
    assert digests(foreign) == before


# ----------------------------------------------------------------------------------- atomic file overwrite


@pytest.mark.parametrize("point", ["commit:1", "swap:1"])
def test_an_overwritten_file_is_never_missing(world, point):
    """A file output is replaced by one rename: killed anywhere, OUT is the previous output or the new one."""
    out = world.outdir / "x.safetensors"
    assert cli(*world.args(out, method="average"))[0] == 0
    previous = out.read_bytes()
    killed = process(*world.args(out, "--overwrite"), fault=point)
    assert killed.returncode in (0, -9), killed.stderr
    assert out.is_file(), "OUT went missing during --overwrite"
    assert out.read_bytes() == previous or killed.returncode == 0
    if killed.returncode == -9:
        code, stderr = cli(*world.args(out, "--overwrite", "--resume"))
        assert code == 0, stderr
    assert load_file(out).keys() == tensors(0).keys()
    assert out.read_bytes() != previous


def test_a_directory_killed_after_both_renames_is_finished_by_the_next_run(world):
    """Killed after the new output took OUT's place but before the work directory was removed: the next run
    with --overwrite --resume finds OUT complete and the rest litter (it used to fail on the missing payload)."""
    out = world.outdir / "x"
    assert cli(*world.args(out, method="average"))[0] == 0
    killed = process(*world.args(out, "--overwrite"), fault="swap:1")
    assert killed.returncode == -9, killed.stderr
    work = world.outdir / ".x.blockmerge-partial"
    assert not out.exists() and (work / "replaced").is_dir()
    (work / "x").rename(out)  # the rename the killed run was about to make; then it would have been killed
    code, stderr = cli(*world.args(out, "--overwrite", "--resume"))
    assert code == 0, stderr
    assert sorted(p.name for p in world.outdir.iterdir()) == ["x"]


# ------------------------------------------------------------------------------------------ symbolic links


def killed_partial(world: World, out: Path, *extra: str) -> Path:
    """The work directory of a merge into `out` killed after its second block."""
    killed = process(*world.args(out, *extra), fault="block:2")
    assert killed.returncode == -9, killed.stderr
    return out.parent / f".{out.name}.blockmerge-partial"


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_resume_never_writes_through_a_link_planted_in_the_work_directory(world, link):
    out = world.outdir / "x.safetensors"
    work = killed_partial(world, out)
    victim = world.tmp / "victim.safetensors"
    victim.write_bytes((work / out.name).read_bytes())
    (work / out.name).unlink()
    if link == "symbolic":
        (work / out.name).symlink_to(victim)
    else:
        os.link(victim, work / out.name)
    before = digests(victim)
    code, stderr = cli(*world.args(out, "--resume"))
    assert code == 0, stderr
    assert digests(victim) == before, "the merge wrote through a symbolic link"
    assert out.is_file() and not out.is_symlink()
    expected = blockmerge.merge("task_arithmetic", [world.a, world.hf, world.store], base=world.base)
    got = load_file(out)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_a_work_directory_that_is_a_link_is_refused(world):
    out = world.outdir / "x.safetensors"
    elsewhere = world.tmp / "elsewhere"
    work = killed_partial(world, out)
    work.rename(elsewhere)
    work.symlink_to(elsewhere)
    before = digests(elsewhere)
    one_line(*cli(*world.args(out, "--resume")), "work directory")
    assert digests(elsewhere) == before
    assert not out.exists()


def test_a_lock_path_that_is_a_link_creates_nothing_elsewhere(world):
    out = world.outdir / "x.safetensors"
    target = world.tmp / "created-elsewhere"
    (world.outdir / ".x.safetensors.blockmerge-lock").symlink_to(target)
    one_line(*cli(*world.args(out)), "lock")
    assert not os.path.lexists(target)
    assert not out.exists()


@pytest.mark.parametrize("dangling", [True, False])
def test_a_link_at_out_is_refused_before_any_block(world, dangling):
    out = world.outdir / "x"
    target = world.tmp / ("nowhere" if dangling else "somewhere")
    if not dangling:
        target.mkdir()
        (target / "keep.txt").write_text("keep")
    out.symlink_to(target)
    result = process(*world.args(out, "--overwrite"), fault="block:1")
    one_line(result.returncode, result.stderr, "symbolic link")
    assert os.readlink(out) == str(target)
    assert dangling or (target / "keep.txt").read_text() == "keep"


# ------------------------------------------------------------------------------------ parents, `..`, names


def test_missing_parent_directories_are_created(world):
    out = world.outdir / "merged" / "deeper" / "ties"
    code, stderr = cli(*world.args(out))
    assert code == 0, stderr
    assert (out / "blockmerge.json").is_file()


def test_the_readme_config_example_works(world, monkeypatch):
    config = world.tmp / "merge.yaml"
    config.write_text(yaml.safe_dump({"method": "ties", "base": str(world.base), "models": [str(world.a),
                                      str(world.hf)], "set": {"density": 0.2}, "out": "merged/ties"}))
    monkeypatch.chdir(world.outdir)
    code, stderr = cli("merge", "-q", "-c", config)
    assert code == 0, stderr
    assert (world.tmp / "merged" / "ties" / "blockmerge.json").is_file()


def test_a_failed_merge_removes_the_parents_it_created(world):
    bad = tensors(9)
    bad["w"][3, 1] = float("nan")
    save_file(bad, world.models / "nan.safetensors")
    out = world.outdir / "new" / "deeper" / "x.safetensors"
    args = ["merge", "-q", "--method", "average", "--model", world.a, "--model", world.models / "nan.safetensors",
            "--out", out, "--block-size", "64B"]
    one_line(*cli(*args), "nan.safetensors")
    assert list(world.outdir.iterdir()) == []


@pytest.mark.parametrize("case", ["file component", "dangling link component"])
def test_an_unusable_parent_is_refused(world, case):
    component = world.outdir / "p"
    if case == "file component":
        component.write_text("a file")
    else:
        component.symlink_to(world.tmp / "missing-dir")
    before = digests(world.outdir)
    one_line(*cli(*world.args(component / "q" / "x.safetensors")), "p")
    assert digests(world.outdir) == before
    assert not (world.tmp / "missing-dir").exists()


@pytest.mark.parametrize("out", ["../merged", "../merged.safetensors", "sub/../../merged-hf"])
def test_dot_dot_in_out(world, monkeypatch, out):
    here = world.outdir / "here"
    (here / "sub").mkdir(parents=True)
    monkeypatch.chdir(here)
    extra = ("--format", "hf") if out.endswith("-hf") else ()
    code, stderr = cli(*world.args(out, *extra))
    assert code == 0, stderr
    assert (world.outdir / Path(out).name).exists()


# ------------------------------------------------------------------------------ property: inputs never change


CHOICES = ["a", "hf", "hf/model.safetensors", "hf/config.json", "hf/new.safetensors", "c.store",
           "c.store/blockmerge.json", "c.store/arrays", "c.store/new", "base.safetensors", "notes.txt", ".",
           "models-root", "tmp", "fresh.safetensors", "fresh-store", "fresh/sub/deep.safetensors",
           "../out/fresh-up.safetensors"]


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(choice=st.sampled_from(CHOICES), alias=st.booleans(), relative=st.booleans(), fmt=st.sampled_from(
    [None, "store", "hf", "safetensors"]))
def test_property_no_input_byte_ever_changes(tmp_path_factory, choice, alias, relative, fmt):
    world = World(tmp_path_factory.mktemp("prop"))
    target = {"a": world.a, "models-root": world.models, "tmp": world.tmp, ".": world.models}.get(
        choice, world.models / choice)
    if alias:  # the same place through a symbolic link
        link = world.outdir / "link"
        link.symlink_to(world.tmp)
        target = link / target.resolve().relative_to(world.tmp.resolve())
    before = world.snapshot()
    cwd = os.getcwd()
    os.chdir(world.models)
    try:
        given_out = os.path.relpath(target, world.models) if relative else target
        if choice == ".":
            given_out = "." if relative else world.models
        code, stderr = cli(*world.args(given_out, "--overwrite", *(("--format", fmt) if fmt else ())))
    finally:
        os.chdir(cwd)
    after = world.snapshot()
    assert {k: after.get(k) for k in before} == before, f"an input changed (--out {given_out})"
    fresh = choice.startswith(("fresh", "../")) or choice == "hf/new.safetensors"  # new, next to a model
    if code != 0:
        one_line(code, stderr)
        assert not fresh or (fmt == "store" and str(given_out).endswith(".safetensors")), stderr
    else:
        assert fresh, f"--out {given_out} was accepted"
