"""Statistic methods end to end: fine-tune a real transformers classifier twice, compute statistics with
`blockmerge stats`, merge with `blockmerge merge` and `blockmerge.merge`, and compare every tensor to the
formulas of docs/methods.md written out in float64 over statistics computed independently (batch-1 autograd)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from scipy.sparse.linalg import cg
from test_stats_data import tiny_model, tiny_tokenizer

import blockmerge
from blockmerge.cli import main
from blockmerge.stats.data import TaskSpec, batches, load_task
from blockmerge.stats.fisher import fisher
from blockmerge.stats.gram import gram

SENTENCES = ["the cat sat on the mat", "a dog ran fast", "big red dog", "the small happy cat sat", "yes",
             "no maybe", "green mat", "a sad blue dog ran slow on the mat", "red red red cat", "the mat is blue"]


def finetune(model, rows: list[dict], tokenizer, steps: int, seed: int):
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([r["label"] for r in rows])
    for _ in range(steps):
        opt.zero_grad()
        model(**enc, labels=labels).loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and two fine-tuned classifiers on disk, each with its task file and statistics stores."""
    tmp = tmp_path_factory.mktemp("family")
    tokenizer = tiny_tokenizer("classification")
    dirs, tasks = [], []
    for t in range(3):  # 0: the base
        model = tiny_model("classification")
        rows = [{"text": s, "label": (i + t * len(s)) % 3} for i, s in enumerate(SENTENCES)]
        if t:
            finetune(model, rows, tokenizer, steps=4, seed=t)
        path = tmp / f"model{t}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        data = tmp / f"task{t}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(path)
        tasks.append(data)
    runner = CliRunner()
    for t in range(3):
        for command, flags in (("fisher", ["--batch-size", "4"]), ("gram", ["--outputs"])):
            result = runner.invoke(main, ["stats", command, "--model", str(dirs[t]), "--data", str(tasks[t]),
                                          *flags, "--out", str(tmp / f"{command}{t}")])
            assert result.exit_code == 0, result.output
    return tmp, dirs, tasks


def reference_statistics(path, data) -> dict[str, dict[str, np.ndarray]]:
    """Fisher (batch-1 autograd loop), Grams and weights of a saved model, as float64 arrays."""
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(path).eval()
    tokenizer = tiny_tokenizer("classification")
    task = TaskSpec(data=str(data))
    examples = list(batches(load_task(task), tokenizer, task, "classification", 1))
    out = {"weights": {n: p.detach().double().numpy() for n, p in model.state_dict().items()}}
    out.update({k: {n: t.double().numpy() for n, t in v.items()}
                for k, v in fisher(model, examples, vectorize=False).tensors.items()})
    out.update({k: {n: t.double().numpy() for n, t in v.items()}
                for k, v in gram(model, examples, inputs=True, outputs=True).tensors.items()})
    return out


@pytest.fixture(scope="module")
def reference(family):
    _, dirs, tasks = family
    return [reference_statistics(d, t) for d, t in zip(dirs, tasks)]


def off_diagonal_scaled(g: np.ndarray, alpha: float) -> np.ndarray:
    return alpha * g + (1 - alpha) * np.diag(np.diag(g))


def expected(method: str, ref: list[dict], alpha: float = 0.9) -> dict[str, np.ndarray]:
    base, models = ref[0], ref[1:]
    out = {}
    for name, w0 in base["weights"].items():
        ws = [m["weights"][name] for m in models]
        if method == "fisher" and name in models[0]["fisher"]:
            fs = [np.maximum(m["fisher"][name], 1e-8) for m in models]
            out[name] = sum(f * w for f, w in zip(fs, ws)) / sum(fs)
        elif method == "ubgm" and name in models[0]["fisher"] and name in base["fisher"]:
            prior = base["fisher"][name] + 1e-12
            denominator = sum(m["fisher"][name] for m in models) + prior
            out[name] = w0 + sum((m["fisher"][name] + prior) / denominator * (w - w0) for m, w in zip(models, ws))
        elif method == "regmean" and name in models[0]["gram_in"]:
            gs = [off_diagonal_scaled(m["gram_in"][name], alpha) for m in models]
            out[name] = np.linalg.solve(sum(gs), sum(g @ w.T for g, w in zip(gs, ws))).T
        elif method == "mats" and name in models[0]["gram_in"]:
            gs = [m["gram_in"][name] for m in models]
            bs = [m["gram_out"][name] for m in models]
            system = sum(np.kron(b, g) for g, b in zip(gs, bs))  # vec_row(B W G) = (B ⊗ G) vec_row(W)
            rhs = sum(b @ w @ g for w, g, b in zip(ws, gs, bs)).reshape(-1)
            x0 = (w0 + MATS_INIT_SCALING * sum(w - w0 for w in ws)).reshape(-1)
            x, _ = cg(system, rhs, x0=x0, rtol=1e-5, atol=0.0, maxiter=MATS_ITERATIONS)
            out[name] = x.reshape(w0.shape)
        elif method == "ubgm":
            out[name] = w0 + sum(w - w0 for w in ws)  # no Fisher: task arithmetic
        else:
            out[name] = sum(ws) / len(ws)
    return out


MATS_ITERATIONS, MATS_INIT_SCALING = 5, 0.3  # K-FAC systems of tiny data are singular: compare CG iterates

CASES = {
    "fisher": ({}, "fisher", False),
    "regmean": ({"alpha": "0.9"}, "gram", False),
    "ubgm": ({}, "fisher", True),
    "mats": ({"num_iterations": str(MATS_ITERATIONS), "solve_dtype": "float64"}, "gram", True),
}


def cli_args(method: str, tmp, dirs) -> list[str]:
    hp, stat, with_base = CASES[method]
    args = ["merge", "--method", method, "--model", str(dirs[1]), "--model", str(dirs[2]),
            "--stats", f"0={tmp / f'{stat}1'}", "--stats", f"1={tmp / f'{stat}2'}"]
    if with_base:
        args += ["--base", str(dirs[0])]
    if method == "ubgm":
        args += ["--base-stats", str(tmp / "fisher0")]
    for k, v in hp.items():
        args += ["--set", f"{k}={v}"]
    return args


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, np.ndarray], rtol: float = 1e-4) -> None:
    merged = {n: t for n, t in got.items() if n in want}
    assert set(merged) == {n for n, w in want.items() if w.dtype.kind == "f" and n in got}
    for name, t in merged.items():
        w = want[name]
        scale = max(float(np.abs(w).max()), 1e-6)
        err = float(np.abs(t.double().numpy() - w).max()) / scale
        assert err < rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("method", sorted(CASES))
def test_cli_merge_from_cli_statistics_matches_the_formula(method, family, reference, tmp_path):
    tmp, dirs, _ = family
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(main, [*cli_args(method, tmp, dirs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert_matches(load_file(out), expected(method, reference))


@pytest.mark.parametrize("method", sorted(CASES))
def test_python_api_gives_the_cli_bytes(method, family, tmp_path):
    tmp, dirs, _ = family
    hp, stat, with_base = CASES[method]
    cli_out = tmp_path / "cli.safetensors"
    result = CliRunner().invoke(main, [*cli_args(method, tmp, dirs), "--out", str(cli_out)])
    assert result.exit_code == 0, result.output
    merged = blockmerge.merge(method, [dirs[1], dirs[2]], base=dirs[0] if with_base else None,
                              stats=[tmp / f"{stat}1", tmp / f"{stat}2"],
                              base_stats=tmp / "fisher0" if method == "ubgm" else None, **hp)
    for name, t in load_file(cli_out).items():
        assert torch.equal(merged[name], t), name


def test_mats_reports_the_solve_of_every_linear_weight(family, reference, tmp_path):
    tmp, dirs, _ = family
    linear = set(reference[1]["gram_in"])
    run = blockmerge.merge("mats", [dirs[1], dirs[2]], base=dirs[0], stats=[tmp / "gram1", tmp / "gram2"],
                           out=tmp_path / "mats.safetensors", num_iterations=MATS_ITERATIONS)
    assert set(run.reports) == linear
    for report in run.reports.values():
        assert 1 <= report[0]["iterations"] <= MATS_ITERATIONS
        assert report[0]["final_residual"] < report[0]["initial_residual"]


def test_cli_subprocess_merges_and_prints_a_summary(family, tmp_path):
    tmp, dirs, _ = family
    out = tmp_path / "fisher.safetensors"
    proc = subprocess.run([sys.executable, "-m", "blockmerge", *cli_args("fisher", tmp, dirs), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "fisher" in proc.stdout + proc.stderr


@pytest.mark.parametrize("objective,method,statistic,options,closed_options", [
    ("regmean", "regmean", "gram", {"alpha": 0.9}, {}),
    ("diagonal_fisher", "fisher", "fisher", {}, {"fisher_floor": 1e-30}),  # MaTS floors no Fisher
])
def test_mats_run_to_convergence_is_the_closed_form_of_its_objective(family, reference, objective, method,
                                                                     statistic, options, closed_options):
    """MaTS's objectives are RegMean's and Fisher merging's quadratics: conjugate gradient run to convergence
    lands on their closed forms (real statistics of two fine-tunes). Where every Fisher is 0, MaTS keeps its
    starting point and Fisher merging averages: those entries are left out."""
    tmp, dirs, _ = family
    stats = [tmp / f"{statistic}1", tmp / f"{statistic}2"]
    closed = blockmerge.merge(method, [dirs[1], dirs[2]], stats=stats, compute_dtype="float64", **options,
                              **closed_options)
    solved = blockmerge.merge("mats", [dirs[1], dirs[2]], base=dirs[0], stats=stats, objective=objective,
                              num_iterations=10_000, solve_dtype="float64", rtol=1e-12, **options)
    assert set(solved) == set(closed)
    for name, want in closed.items():
        informed = torch.ones(want.shape, dtype=torch.bool)
        if objective == "diagonal_fisher" and name in reference[1]["fisher"]:
            informed = torch.from_numpy(reference[1]["fisher"][name] + reference[2]["fisher"][name] > 0)
        scale = float(want.abs().max()) or 1.0
        difference = (solved[name] - want)[informed].abs()
        assert not difference.numel() or float(difference.max()) / scale < 1e-5, (name, float(difference.max()), scale)
