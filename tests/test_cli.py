"""`blockmerge merge` over safetensors and over stores, every method, against the plain references."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_family
from safetensors.torch import load_file
from test_methods import FLOATS, quantised_family, ties_reference

from blockmerge.plugins.task_vectors import keep_mask


def run(*args: str) -> subprocess.CompletedProcess:
    # os.environ, not the process's C environment: something in pytest's process exports COLUMNS=80 there.
    result = subprocess.run([sys.executable, "-m", "blockmerge", *args], capture_output=True, text=True,
                            env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    return result


def reference(method: str, base: dict, models: list[dict]) -> dict[str, np.ndarray]:
    b = {n: base[n].double().numpy() for n in FLOATS}
    tau = [{n: m[n].double().numpy() - b[n] for n in FLOATS} for m in models]
    if method == "average":
        return {n: sum(m[n].double().numpy() for m in models) / len(models) for n in FLOATS}
    if method == "task_arithmetic":
        return {n: b[n] + 0.4 * sum(t[n] for t in tau) for n in FLOATS}
    if method == "dare":
        out = {}
        for n in FLOATS:
            masks = [keep_mask(3, n, i, 0, base[n].numel(), 0.5).view(base[n].shape).numpy()
                     for i in range(len(models))]
            out[n] = b[n] + 0.4 * sum(np.where(k, t[n], 0.0) for k, t in zip(masks, tau)) / 0.5
        return out
    return ties_reference(base, models, FLOATS, 0.3, 0.9)


SETTINGS = {"average": [], "task_arithmetic": ["scaling_factor=0.4"],
            "dare": ["scaling_factor=0.4", "drop_rate=0.5", "seed=3"], "ties": ["density=0.3", "scaling_factor=0.9"]}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    base, models = quantised_family(3, seed=9)
    base_path, model_paths = write_family(tmp, base, models)
    store_paths = []
    for p in [base_path, *model_paths]:
        run("import", str(p), str(p.with_suffix(".store")))
        store_paths.append(p.with_suffix(".store"))
    return tmp, base, models, [base_path, *model_paths], store_paths


def test_cli_summary_gives_the_time_of_each_reduction_pass(stores):
    tmp, _, _, files, _ = stores
    models = [a for m in files[1:] for a in ("--model", str(m))]
    ties = run("merge", "--method", "ties", "--base", str(files[0]), *models, "--out", str(tmp / "t.safetensors"))
    line = next(x for x in ties.stderr.splitlines() if x.startswith("ties: reduction passes"))
    assert len(line.split(" passes ")[1].split(" s,")[0].split(" + ")) == 3
    average = run("merge", "--method", "average", *models, "--out", str(tmp / "a.safetensors"))
    assert "│ average" in average.stderr and "reduction passes" not in average.stderr


@pytest.mark.parametrize("method", list(SETTINGS))
def test_cli_merges_safetensors_and_stores_to_the_specification(stores, method):
    tmp, base, models, files, store_paths = stores
    expected = reference(method, base, models)
    for kind, inputs in (("safetensors", files), ("store", store_paths)):
        out = tmp / f"{method}-{kind}.safetensors"
        args = ["merge", "-q", "--method", method, "--out", str(out), "--block-size", "700"]
        if method != "average":
            args += ["--base", str(inputs[0])]
        for m in inputs[1:]:
            args += ["--model", str(m)]
        for s in SETTINGS[method]:
            args += ["--set", s]
        run(*args)
        got = load_file(out)
        for n in FLOATS:
            np.testing.assert_allclose(got[n].double().numpy(), expected[n], rtol=1e-6, atol=1e-6,
                                       err_msg=f"{method} {kind} {n}")
        assert torch.equal(got["position_ids"], base["position_ids"])


def test_methods_command_lists_every_method_with_defaults():
    listed = {m["name"]: m for m in json.loads(run("methods", "--json").stdout)}
    assert {"average", "task_arithmetic", "dare", "ties"} <= set(listed)
    assert listed["ties"]["hyperparameters"]["density"]["default"] == 0.2
    assert listed["dare"]["hyperparameters"]["drop_rate"]["default"] == 0.9
    assert listed["task_arithmetic"]["needs_base"] is True
    reference = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
    assert "docs/methods.md" in run("methods").stdout and reference.is_file()
    sections = {number.rstrip(".") for number in re.findall(r"^#+ ([0-9.]+) ", reference.read_text(), re.MULTILINE)}
    for m in listed.values():
        cited = re.findall(r"docs/methods\.md ((?:§[0-9.]+(?:, )?)+)", m["description"])
        assert cited, m["name"]
        assert set(re.findall(r"§([0-9]+(?:\.[0-9]+)*)", cited[0])) <= sections, (m["name"], cited)


def test_summary_into_a_log_says_where_the_output_went_without_carriage_returns(stores):
    tmp, _, _, files, _ = stores
    out = tmp / "log.safetensors"
    models = [a for m in files[1:] for a in ("--model", str(m))]
    result = run("merge", "--method", "average", *models, "--out", str(out))
    assert "\r" not in result.stderr and "\r" not in result.stdout
    assert f"average: written to {out}" in result.stderr.replace("\n", "")
    widest = max(len(line) for line in result.stderr.splitlines())
    assert 100 < widest <= 160


def test_tables_take_the_width_given_by_columns(stores):
    tmp, _, _, files, _ = stores
    result = subprocess.run([sys.executable, "-m", "blockmerge", "inspect", str(files[0])], capture_output=True,
                            text=True, env={**os.environ, "COLUMNS": "60"})
    assert result.returncode == 0, result.stderr
    assert max(len(line) for line in result.stdout.splitlines()) <= 60


def test_import_and_export_progress_is_labelled_with_what_they_do(stores, capsys):
    from blockmerge.api import convert

    tmp, _, _, files, _ = stores
    convert(files[0], tmp / "labelled.store", format="store", progress=True, label="import")
    assert "import:" in capsys.readouterr().err


def test_every_command_line_option_has_help_text():
    import click

    from blockmerge.cli import main

    context = click.Context(main)
    undocumented = []

    def walk(command: click.Command, path: str) -> None:
        if isinstance(command, click.Group):
            for name in command.list_commands(context):
                walk(command.get_command(context, name), f"{path} {name}")
            return
        undocumented.extend(f"{path} {p.opts[-1]}" for p in command.params
                            if isinstance(p, click.Option) and not p.help)

    walk(main, "blockmerge")
    assert not undocumented


def test_methods_reports_the_needs_that_needs_computes():
    from blockmerge.plugins import get, parse_hyperparameters

    listed = json.loads(run("methods", "--json").stdout)
    for m in listed:
        method = get(m["name"])
        needs = method.needs(method.hyperparameters())
        assert (m["needs_base"], m["statistics"], m["optional_statistics"], m["one_of_statistics"]) == (
            needs.base, list(needs.statistics), list(needs.optional_statistics), list(needs.one_of_statistics))
    mats = json.loads(run("methods", "mats", "--set", "initialization=zeros", "--set", "objective=regmean",
                          "--json").stdout)
    hp, _ = parse_hyperparameters(get("mats"), {"initialization": "zeros", "objective": "regmean"})
    assert len(mats) == 1 and mats[0]["needs_base"] is get("mats").needs(hp).base is False
    assert mats[0]["statistics"] == ["gram_in"]


def test_a_safetensors_merge_imports_no_optional_backend(tmp_path: Path):
    """tensorstore, ml_dtypes and Dask cost start-up time and memory: only merges that use them import them."""
    from safetensors.torch import save_file

    for i in range(2):
        save_file({"w": torch.full((4, 3), float(i), dtype=torch.bfloat16)}, tmp_path / f"m{i}.safetensors")
    script = (
        "import sys\n"
        "from blockmerge.cli import main\n"
        f"try:\n    main(['merge', '--method', 'average', '--model', {str(tmp_path / 'm0.safetensors')!r}, "
        f"'--model', {str(tmp_path / 'm1.safetensors')!r}, '--out', {str(tmp_path / 'out.safetensors')!r}])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted(m for m in ('tensorstore', 'ml_dtypes', 'dask', 'distributed') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.safetensors").is_file()
    assert done.stdout.strip().splitlines()[-1] == "[]"
