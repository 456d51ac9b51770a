"""MaTS (docs/methods.md §7, §16): conjugate gradient against SciPy, every objective against a numpy reference of the
whole system (Kronecker form for Linear weights), the direct solver, statistics handling, the CLI, properties."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from conftest import make_family, write_family
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

import blockmerge
from blockmerge.errors import BlockmergeError
from blockmerge.plugins.cg import conjugate_gradient
from blockmerge.plugins.mats import DIRECT_KFAC_MAX_NUMEL
from blockmerge.stats.store import write_statistics

SHAPES = {"embed.weight": (10, 4), "layer.0.attn.weight": (5, 4), "layer.0.ia3": (5,), "layer.0.norm": (5,),
          "layer.1.mlp.weight": (3, 5), "head.bias": (), "position_ids": (12,)}
LINEARS = ["layer.0.attn.weight", "layer.1.mlp.weight"]
VECTOR = "layer.0.ia3"
FLOATS = [n for n in SHAPES if n != "position_ids"]
EXACT = {"compute_dtype": "float64", "dtype": "float64", "solve_dtype": "float64"}


def np_(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def psd(n: int, g: torch.Generator, rank: int | None = None, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """XᵀX / rows with uneven feature scales; rank-deficient when `rank` < n; features in `dead` always 0."""
    rows = rank if rank is not None else 3 * n + 3
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    x[:, list(dead)] = 0.0
    return (x.T @ x / rows).float()


def family(num_models: int = 3, seed: int = 0) -> tuple[dict, list[dict]]:
    return make_family(num_models, seed=seed, std=0.5, shapes=SHAPES)


def statistics(models: list[dict], seed: int) -> list[dict]:
    """Every kind for every model: K-FAC Grams of the Linears, a blockwise Fisher of the IA³ vector, diagonal
    Fishers of every float tensor with some coordinates 0 in all models."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in models:
        fisher = {}
        for n in FLOATS:
            f = torch.rand(m[n].shape, generator=g)
            fisher[n] = torch.where(torch.arange(f.numel()).reshape(f.shape) % 4 == 1, 0.0, f)
        out.append({"gram_in": {n: psd(m[n].shape[1], g) for n in LINEARS},
                    "gram_out": {n: psd(m[n].shape[0], g) for n in LINEARS},
                    "blockwise_fisher": {VECTOR: psd(m[VECTOR].shape[0], g)},
                    "fisher": fisher})
    return out


# --- the plain reference ---

def reduce(g: np.ndarray, alpha: float) -> np.ndarray:
    return alpha * g + (1 - alpha) * np.diag(np.diag(g))


def scipy_cg(a: np.ndarray, b: np.ndarray, x0: np.ndarray | None, maxiter: int | None) -> tuple[np.ndarray, int]:
    """scipy.sparse.linalg.cg and the iterations it ran."""
    count = [0]

    def step(_x):
        count[0] += 1

    x, _ = scipy.sparse.linalg.cg(a, b, x0=x0, rtol=1e-5, atol=0.0, maxiter=maxiter, callback=step)
    return x, count[0]


def initial(init: str, thetas: list[np.ndarray], theta0: np.ndarray, factor: float) -> np.ndarray:
    return {"average": lambda: sum(thetas) / len(thetas),
            "task_arithmetic": lambda: theta0 + factor * sum(t - theta0 for t in thetas),
            "base": lambda: theta0, "zeros": lambda: np.zeros_like(theta0)}[init]()


def system(objective: str, name: str, models: list[dict], stats: list[dict], alpha: float):
    """(A, b, to_vector, from_vector) of MaTS's system for one tensor: Linear weights as X = Wᵀ, vec_row(X)."""
    thetas = [np_(m[name]) for m in models]
    if objective == "average":
        return np.eye(thetas[0].size), (sum(thetas) / len(thetas)).ravel(), np.ravel, lambda v: v
    if objective == "diagonal_fisher":
        fishers = [np_(s["fisher"][name]).ravel() for s in stats]
        return np.diag(sum(fishers)), sum(f * t.ravel() for f, t in zip(fishers, thetas)), np.ravel, lambda v: v
    if objective == "blockwise_fisher" and thetas[0].ndim == 1:
        metrics = [reduce(np_(s["blockwise_fisher"][name]), alpha) for s in stats]
        return sum(metrics), sum(f @ t for f, t in zip(metrics, thetas)), np.ravel, lambda v: v
    out_dim, in_dim = thetas[0].shape
    grams = [reduce(np_(s["gram_in"][name]), alpha) for s in stats]
    if objective == "regmean":
        kron = [np.kron(g, np.eye(out_dim)) for g in grams]  # vec_row(G X) = (G ⊗ I) vec_row(X)
    else:
        kron = [np.kron(g, reduce(np_(s["gram_out"][name]), alpha)) for g, s in zip(grams, stats)]
    to_vector = lambda w: w.T.ravel()  # noqa: E731
    from_vector = lambda v: v.reshape(in_dim, out_dim).T  # noqa: E731
    return sum(kron), sum(k @ to_vector(t) for k, t in zip(kron, thetas)), to_vector, from_vector


def reference(objective: str, name: str, base: dict, models: list[dict], stats: list[dict], alpha: float = 1.0,
              init: str = "task_arithmetic", factor: float = 0.3, num_iterations: int = 100,
              exact: bool = False) -> np.ndarray:
    """SciPy CG (or numpy's solve when `exact`) on the explicit matrix; ΣF = 0 coordinates keep x0."""
    a, b, to_vector, from_vector = system(objective, name, models, stats, alpha)
    x0 = to_vector(initial(init, [np_(m[name]) for m in models], np_(base[name]), factor))
    if not exact:
        x = scipy_cg(a, b, x0, num_iterations)[0]
    elif objective == "diagonal_fisher":
        x = b / np.where(np.diag(a) == 0, 1.0, np.diag(a))
    else:
        x = np.linalg.solve(a, b)
    if objective == "diagonal_fisher":
        x = np.where(np.diag(a) == 0, x0, x)
    return from_vector(x).reshape(base[name].shape)


def merged_names(objective: str) -> list[str]:
    return {"average": FLOATS, "diagonal_fisher": FLOATS, "regmean": LINEARS,
            "blockwise_fisher": [*LINEARS, VECTOR]}[objective]


# --- conjugate gradient ---

def spd(n: int, seed: int, rank: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rank or 2 * n, n)) * np.linspace(0.2, 3.0, n)
    return x.T @ x


@pytest.mark.parametrize("start", ["zeros", "random", "none"])
@pytest.mark.parametrize("maxiter", [1, 2, 3, None])
def test_cg_matches_scipy(start, maxiter):
    n = 12
    a = spd(n, seed=1)
    rng = np.random.default_rng(2)
    b = rng.standard_normal(n)
    x0 = {"zeros": np.zeros(n), "random": rng.standard_normal(n), "none": None}[start]
    expected, iterations = scipy_cg(a, b, x0, maxiter)
    at = torch.from_numpy(a)
    got = conjugate_gradient(lambda v: at @ v, torch.from_numpy(b), None if x0 is None else torch.from_numpy(x0),
                             maxiter=maxiter)
    # Truncated, the iterates agree to rounding; run to convergence (12 iterations here) rounding grows.
    np.testing.assert_allclose(got.x.numpy(), expected, rtol=1e-10 if maxiter else 1e-5, atol=1e-12)
    assert got.iterations == iterations == (maxiter or iterations)
    assert got.initial_residual == pytest.approx(np.linalg.norm(b - a @ (x0 if x0 is not None else 0 * b)), rel=1e-12)
    if maxiter is not None:
        assert got.final_residual == pytest.approx(np.linalg.norm(b - a @ expected), rel=1e-6)
    else:  # converged to SciPy's tolerance, in fewer than n·10 iterations
        assert got.final_residual < 1e-5 * np.linalg.norm(b) and 0 < iterations < 10 * n


def test_cg_treats_tensors_of_any_shape_as_vectors_and_keeps_their_dtype():
    a = spd(12, seed=3)
    b = np.random.default_rng(4).standard_normal(12)
    at = torch.from_numpy(a).float()
    got = conjugate_gradient(lambda v: (at @ v.reshape(-1)).reshape(3, 4), torch.from_numpy(b).float().reshape(3, 4),
                             maxiter=5)
    expected, _ = scipy_cg(a, b, None, 5)
    assert got.x.dtype == torch.float32 and got.x.shape == (3, 4)
    np.testing.assert_allclose(got.x.reshape(-1).double().numpy(), expected, rtol=1e-3, atol=1e-4)


def test_cg_zero_right_hand_side_returns_zeros_and_a_solution_x0_is_returned_untouched():
    a = torch.from_numpy(spd(6, seed=5))
    x0 = torch.arange(6, dtype=torch.float64)
    got = conjugate_gradient(lambda v: a @ v, torch.zeros(6, dtype=torch.float64), x0, maxiter=10)
    expected, _ = scipy_cg(a.numpy(), np.zeros(6), x0.numpy(), 10)
    assert torch.equal(got.x, torch.zeros(6, dtype=torch.float64)) and not expected.any()
    assert got.iterations == 0 and got.initial_residual == pytest.approx(float(torch.linalg.norm(a @ x0)))
    # The stopping test runs before the first iteration: an exact x0 is returned as it is.
    solution = torch.linalg.solve(a, torch.ones(6, dtype=torch.float64))
    got = conjugate_gradient(lambda v: a @ v, a @ solution, solution, maxiter=10)
    assert got.iterations == 0 and torch.equal(got.x, solution) and got.x is not solution


def test_cg_converges_to_the_solution_and_keeps_x0_in_a_null_space():
    a = spd(10, seed=6)
    b = np.random.default_rng(7).standard_normal(10)
    at = torch.from_numpy(a)
    got = conjugate_gradient(lambda v: at @ v, torch.from_numpy(b), maxiter=1000, rtol=1e-13)
    np.testing.assert_allclose(got.x.numpy(), np.linalg.solve(a, b), rtol=1e-8)
    singular = spd(10, seed=8, rank=4)  # consistent system: b in the range
    x0 = np.random.default_rng(9).standard_normal(10)
    rhs = singular @ np.random.default_rng(10).standard_normal(10)
    singular_t = torch.from_numpy(singular)
    got = conjugate_gradient(lambda v: singular_t @ v, torch.from_numpy(rhs), torch.from_numpy(x0), maxiter=50)
    expected, iterations = scipy_cg(singular, rhs, x0, 50)
    np.testing.assert_allclose(got.x.numpy(), expected, rtol=1e-8, atol=1e-10)
    assert got.iterations == iterations
    null = np.linalg.svd(singular)[2][4:]  # null-space basis: its components of x0 are kept
    np.testing.assert_allclose(null @ got.x.numpy(), null @ x0, atol=1e-8)


# --- objectives against the reference ---

@pytest.mark.parametrize("objective", ["average", "diagonal_fisher", "regmean", "blockwise_fisher"])
@pytest.mark.parametrize("num_iterations", [1, 3])  # truncated: iterates agree to rounding (converged: see direct)
def test_objectives_match_the_reference(objective, num_iterations):
    base, models = family(3, seed=11)
    stats = statistics(models, seed=12)
    hp = {"objective": objective, "alpha": 0.7, "num_iterations": num_iterations}
    out = blockmerge.merge("mats", models, base=base, stats=stats, **hp, **EXACT)
    out32 = blockmerge.merge("mats", models, base=base, stats=stats, **hp)
    for n in merged_names(objective):
        ref = reference(objective, n, base, models, stats, alpha=0.7, num_iterations=num_iterations)
        np.testing.assert_allclose(out[n].numpy(), ref, rtol=1e-8, atol=1e-10, err_msg=n)
        np.testing.assert_allclose(np_(out32[n]), ref, rtol=1e-3, atol=1e-4, err_msg=n)
    for n in set(FLOATS) - set(merged_names(objective)):  # no statistic: averaged
        np.testing.assert_allclose(out[n].numpy(), sum(np_(m[n]) for m in models) / 3, rtol=1e-12, err_msg=n)
    assert torch.equal(out["position_ids"], base["position_ids"])


@pytest.mark.parametrize("init", ["task_arithmetic", "average", "base", "zeros"])
def test_each_initialization_is_the_starting_point(init):
    base, models = family(2, seed=13)
    stats = statistics(models, seed=14)
    for objective in ("blockwise_fisher", "diagonal_fisher"):
        out = blockmerge.merge("mats", models, base=base, stats=stats, objective=objective, initialization=init,
                               init_scaling_factor=0.6, num_iterations=1, **EXACT)
        for n in merged_names(objective):
            ref = reference(objective, n, base, models, stats, init=init, factor=0.6, num_iterations=1)
            np.testing.assert_allclose(out[n].numpy(), ref, rtol=1e-9, atol=1e-11, err_msg=f"{objective} {n}")
    # Coordinates with no Fisher in any model keep x0.
    fisher = stats[0]["fisher"]["layer.1.mlp.weight"]
    empty = fisher == 0
    x0 = initial(init, [np_(m["layer.1.mlp.weight"]) for m in models], np_(base["layer.1.mlp.weight"]), 0.6)
    np.testing.assert_allclose(out["layer.1.mlp.weight"][empty].numpy(), x0[empty.numpy()], rtol=1e-12)


def test_the_report_gives_iterations_and_residuals(tmp_path):
    base, models = family(3, seed=15)
    stats = statistics(models, seed=16)
    summary = blockmerge.merge("mats", models, base=base, stats=stats, num_iterations=4, out=tmp_path / "m.safetensors",
                               **EXACT)
    assert sorted(summary.reports) == sorted([*LINEARS, VECTOR])
    for n, (entry,) in summary.reports.items():
        a, b, to_vector, from_vector = system("blockwise_fisher", n, models, stats, 1.0)
        x0 = to_vector(initial("task_arithmetic", [np_(m[n]) for m in models], np_(base[n]), 0.3))
        expected, iterations = scipy_cg(a, b, x0, 4)
        assert entry["rows"] == [0, SHAPES[n][0]] and entry["iterations"] == iterations
        assert entry["initial_residual"] == pytest.approx(np.linalg.norm(b - a @ x0), rel=1e-9)
        assert entry["final_residual"] == pytest.approx(np.linalg.norm(b - a @ expected), rel=1e-6)
    merged = load_file(tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        provenance = json.loads(f.metadata()["blockmerge"])
    assert provenance["reports"] == json.loads(json.dumps(summary.reports))
    assert provenance["hyperparameters"]["solver"] == "cg"
    np.testing.assert_allclose(merged[VECTOR].numpy(), reference("blockwise_fisher", VECTOR, base, models, stats,
                                                                 num_iterations=4), rtol=1e-9)


# --- the direct solver ---

@pytest.mark.parametrize("objective", ["average", "diagonal_fisher", "regmean", "blockwise_fisher"])
def test_direct_solves_the_system_exactly_and_converged_cg_agrees(objective):
    base, models = family(3, seed=17)
    stats = statistics(models, seed=18)
    direct = blockmerge.merge("mats", models, base=base, stats=stats, objective=objective, alpha=0.8,
                              solver="direct", **EXACT)
    cg = blockmerge.merge("mats", models, base=base, stats=stats, objective=objective, alpha=0.8,
                          num_iterations=10_000, **EXACT)
    for n in merged_names(objective):
        ref = reference(objective, n, base, models, stats, alpha=0.8, exact=True)
        np.testing.assert_allclose(direct[n].numpy(), ref, rtol=1e-9, atol=1e-11, err_msg=n)
        # CG stops at ‖r‖ < 1e-5 ‖b‖, so ‖x_cg − x*‖ ≤ ‖A⁻¹‖ · 1e-5 ‖b‖.
        a, b, to_vector, _ = system(objective, n, models, stats, 0.8)
        live = np.diag(a) > 0
        a, b = a[np.ix_(live, live)], b[live]
        bound = 1e-5 * np.linalg.norm(b) / np.linalg.eigvalsh(a)[0]
        error = np.linalg.norm(to_vector(cg[n].numpy())[live] - to_vector(ref)[live])
        assert error <= bound, (n, error, bound)


def test_direct_regmean_objective_is_regmean_with_its_singular_fallback():
    base, models = family(3, seed=19)
    g = torch.Generator().manual_seed(20)
    grams = [{n: psd(m[n].shape[1], g, dead=(1,)) for n in LINEARS} for m in models]
    stats = [{"gram_in": x} for x in grams]
    direct = blockmerge.merge("mats", models, stats=stats, objective="regmean", alpha=0.6, solver="direct",
                              initialization="average", **EXACT)
    regmean = blockmerge.merge("regmean", models, stats=stats, alpha=0.6, compute_dtype="float64", dtype="float64")
    for n in FLOATS:
        np.testing.assert_allclose(direct[n].numpy(), regmean[n].numpy(), rtol=1e-10, atol=1e-12, err_msg=n)
        if n in LINEARS:
            assert torch.equal(direct[n][:, 1], torch.zeros(SHAPES[n][0], dtype=torch.float64))
    # CG instead keeps x0 (here the average) on the dead feature.
    cg = blockmerge.merge("mats", models, stats=stats, objective="regmean", alpha=0.6, initialization="average",
                          **EXACT)
    for n in LINEARS:
        np.testing.assert_allclose(cg[n][:, 1].numpy(), sum(np_(m[n][:, 1]) for m in models) / 3, rtol=1e-12)


def test_direct_kfac_refuses_a_large_weight():
    side = int(DIRECT_KFAC_MAX_NUMEL ** 0.5) + 1
    g = torch.Generator().manual_seed(21)
    models = [{"w": torch.randn(side, side, generator=g)} for _ in range(2)]
    stats = [{"gram_in": {"w": torch.eye(side)}, "gram_out": {"w": torch.eye(side)}} for _ in models]
    with pytest.raises(BlockmergeError, match=r"parameter 'w': mats: solver=direct .* use solver=cg"):
        blockmerge.merge("mats", models, stats=stats, solver="direct", initialization="zeros")


# --- statistics, base and hyperparameters ---

def test_tensors_without_statistics_are_averaged_and_counted(tmp_path):
    base, models = family(3, seed=22)
    stats = [{k: s[k] for k in ("gram_in", "gram_out")} for s in statistics(models, seed=23)]
    summary = blockmerge.merge("mats", models, base=base, stats=stats, out=tmp_path / "m.safetensors")
    assert summary.tensors_merged == 2 and summary.tensors_copied == 1
    assert summary.tensors_averaged_missing_statistic == len(FLOATS) - 2
    out = load_file(tmp_path / "m.safetensors")
    for n in set(FLOATS) - set(LINEARS):
        np.testing.assert_allclose(np_(out[n]), sum(np_(m[n]) for m in models) / 3, rtol=1e-6, atol=1e-7)
    with pytest.raises(BlockmergeError, match=r"parameter '(embed\.weight|head\.bias|layer\.0\.\w+)': "
                                              r"no 'gram_in' statistic \(missing_statistic=error\)"):
        blockmerge.merge("mats", models, base=base, stats=stats, missing_statistic="error")
    fisher = [{"fisher": {n: s["fisher"][n] for n in LINEARS}} for s in statistics(models, seed=23)]
    summary = blockmerge.merge("mats", models, base=base, stats=fisher, objective="diagonal_fisher",
                               out=tmp_path / "f.safetensors")
    assert summary.tensors_merged == 2 and summary.tensors_averaged_missing_statistic == len(FLOATS) - 2


def test_gram_in_without_gram_out_is_one_line_naming_the_parameter():
    base, models = family(2, seed=24)
    stats = statistics(models, seed=25)
    holes = [dict(s, gram_out={"layer.0.attn.weight": s["gram_out"]["layer.0.attn.weight"]}) for s in stats]
    for bad, name in ((holes, "layer.1.mlp.weight"), ([{"gram_in": s["gram_in"]} for s in stats], LINEARS[0])):
        with pytest.raises(BlockmergeError) as err:
            blockmerge.merge("mats", models, base=base, stats=bad)
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"parameter '{name}': has a 'gram_in' statistic but no 'gram_out' statistic")
    # The regmean objective reads gram_in alone.
    blockmerge.merge("mats", models, base=base, stats=holes, objective="regmean")


def test_inputs_are_checked_before_any_data_is_read():
    base, models = family(2, seed=26)
    stats = statistics(models, seed=27)
    cases = [
        ({"stats": stats}, "mats needs a base"),
        ({"stats": stats, "initialization": "base"}, "mats needs a base"),
        ({"base": base}, "reads 'gram_in' or 'gram_out' or 'blockwise_fisher' statistics; none given for model 0"),
        ({"base": base, "stats": [{"gram_in": s["gram_in"]} for s in stats], "objective": "diagonal_fisher"},
         "reads 'fisher' statistics; none given for model 0"),
        ({"base": base, "stats": stats, "objective": "kfac"}, "objective: 'kfac' is not one of"),
        ({"base": base, "stats": stats, "alpha": 1.5}, "alpha must be in"),
        ({"base": base, "stats": stats, "solver": "lu"}, "solver"),
        ({"base": base, "stats": stats, "solve_dtype": "float16"}, "solve_dtype"),
        ({"base": base, "stats": stats, "num_iterations": -1}, "num_iterations"),
        ({"base": base, "stats": stats, "initialization": "pretrained"}, "initialization"),
    ]
    for kwargs, match in cases:
        with pytest.raises(BlockmergeError, match=match):
            blockmerge.merge("mats", models, **kwargs)
    # No base is needed to start from the average or zeros, nor statistics for the average objective.
    blockmerge.merge("mats", models, stats=stats, initialization="average")
    blockmerge.merge("mats", models, objective="average", initialization="zeros")


def test_statistics_of_zero_follow_scipy():
    base, models = family(2, seed=28)
    zero = [{"gram_in": {n: torch.zeros(SHAPES[n][1], SHAPES[n][1]) for n in LINEARS},
             "gram_out": {n: torch.zeros(SHAPES[n][0], SHAPES[n][0]) for n in LINEARS},
             "fisher": {n: torch.zeros(SHAPES[n]) for n in FLOATS}} for _ in models]
    kfac = blockmerge.merge("mats", models, base=base, stats=zero)  # ‖b‖ = 0: SciPy returns zeros
    for n in LINEARS:
        assert torch.equal(kfac[n], torch.zeros(SHAPES[n]))
    diagonal = blockmerge.merge("mats", models, base=base, stats=zero, objective="diagonal_fisher")
    for n in FLOATS:  # Σ F = 0 everywhere: x0 (task arithmetic) kept
        np.testing.assert_allclose(np_(diagonal[n]), initial("task_arithmetic", [np_(m[n]) for m in models],
                                                             np_(base[n]), 0.3), rtol=1e-6, atol=1e-7)


# --- the command line ---

def test_cli_merges_files_on_disk(tmp_path):
    base, models = family(2, seed=29)
    stats = statistics(models, seed=30)
    base_path, model_paths = write_family(tmp_path, base, models)
    args = [sys.executable, "-m", "blockmerge", "merge", "-q", "--method", "mats", "--base", str(base_path)]
    for i, (path, s) in enumerate(zip(model_paths, stats)):
        store = write_statistics({k: s[k] for k in ("gram_in", "gram_out", "blockwise_fisher")},
                                 tmp_path / f"stats{i}", {})
        args += ["--model", str(path), "--stats", f"{i}={store}"]
    out = tmp_path / "merged.safetensors"
    run = subprocess.run([*args, "--set", "alpha=0.5", "--set", "num_iterations=3", "--set", "solve_dtype=float64",
                          "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    merged = load_file(out)
    for n in [*LINEARS, VECTOR]:
        ref = reference("blockwise_fisher", n, base, models, stats, alpha=0.5, num_iterations=3)
        np.testing.assert_allclose(np_(merged[n]), ref, rtol=1e-5, atol=1e-6, err_msg=n)
    with safe_open(out, "pt") as f:
        reports = json.loads(f.metadata()["blockmerge"])["reports"]
    assert sorted(reports) == sorted([*LINEARS, VECTOR]) and all(r[0]["iterations"] == 3 for r in reports.values())
    args[args.index("--base"):args.index("--base") + 2] = []
    run = subprocess.run([*args, "--out", str(tmp_path / "nobase.safetensors")], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "mats needs a base" in run.stderr
    assert not (tmp_path / "nobase.safetensors").exists()


# --- properties ---

OBJECTIVES = ["average", "diagonal_fisher", "regmean", "blockwise_fisher"]
PROPERTY_SHAPES = {"w": (3, 4), "v": (4,), "s": ()}


def random_statistics(model: dict, g: torch.Generator, rank: int) -> dict:
    """Every kind, PSD of the given rank (capped by each size), diagonal Fishers with some zeros."""
    fisher = {n: torch.rand(t.shape, generator=g) * (torch.rand(t.shape, generator=g) > 0.3) for n, t in model.items()}
    return {"gram_in": {"w": psd(4, g, rank=min(rank, 4))}, "gram_out": {"w": psd(3, g, rank=min(rank, 3))},
            "blockwise_fisher": {"v": psd(4, g, rank=min(rank, 4))}, "fisher": fisher}


def only(objective: str, stats: dict) -> dict:
    kinds = {"average": (), "diagonal_fisher": ("fisher",), "regmean": ("gram_in",),
             "blockwise_fisher": ("gram_in", "gram_out", "blockwise_fisher")}[objective]
    return {k: stats[k] for k in kinds}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objective=st.sampled_from(OBJECTIVES), num_models=st.integers(1, 3), seed=st.integers(0, 10_000),
       rank=st.integers(1, 6), alpha=st.floats(0, 1), solver=st.sampled_from(["cg", "direct"]))
def test_copies_of_one_model_merge_to_it(objective, num_models, seed, rank, alpha, solver):
    g = torch.Generator().manual_seed(seed)
    _, (model,) = make_family(1, seed=seed, shapes=PROPERTY_SHAPES, std=1.0)
    stats = [only(objective, random_statistics(model, g, rank)) for _ in range(num_models)]
    if solver == "direct" and rank < 4 and objective in ("regmean", "blockwise_fisher"):
        solver = "cg"  # the direct fallback zeroes dead features, it does not keep x0
    out = blockmerge.merge("mats", [model] * num_models, stats=stats, objective=objective, alpha=alpha,
                           initialization="average", solver=solver, **EXACT)
    for n, t in model.items():
        torch.testing.assert_close(out[n], t.double(), rtol=1e-7, atol=1e-9)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objective=st.sampled_from(OBJECTIVES[1:]), num_models=st.integers(1, 3), seed=st.integers(0, 10_000),
       rank=st.integers(1, 6), alpha=st.floats(0, 1), exponent=st.integers(-12, 12), scale=st.floats(1e-3, 1e3),
       init=st.sampled_from(["task_arithmetic", "average", "base", "zeros"]))
def test_scaling_every_statistic_by_one_constant_changes_nothing(objective, num_models, seed, rank, alpha, exponent,
                                                                 scale, init):
    g = torch.Generator().manual_seed(seed)
    base, models = make_family(num_models, seed=seed, shapes=PROPERTY_SHAPES, std=1.0)
    stats = [only(objective, random_statistics(m, g, rank)) for m in models]

    def merge(factor: float, **kwargs) -> dict:
        scaled = [{k: {n: t.double() * factor for n, t in s[k].items()} for k in s} for s in stats]
        return blockmerge.merge("mats", models, base=base, stats=scaled, objective=objective, alpha=alpha,
                                initialization=init, **kwargs, **EXACT)

    # CG's iterates and its stopping test do not change when A and b scale by a power of two: the same bits.
    one, other = merge(1.0, num_iterations=1000), merge(2.0 ** exponent, num_iterations=1000)
    for n in one:
        assert torch.equal(one[n], other[n]), n
    if rank >= 4 or objective == "diagonal_fisher":  # nonsingular where it is solved: any constant, solved exactly
        one, other = merge(1.0, solver="direct"), merge(scale, solver="direct")
        for n in one:
            torch.testing.assert_close(other[n], one[n], rtol=1e-7, atol=1e-9)


def test_the_default_budget_holds_a_whole_tensor_and_a_given_one_is_never_exceeded():
    """MaTS merges whole tensors: by default the block budget grows to the largest one's inputs (here 12 MiB,
    over the 8 MiB default); a budget the user gives is a limit, refused in one line before anything is read."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(1024, 1024, generator=g)}
    models = [{"w": base["w"] + 0.01 * torch.randn(1024, 1024, generator=g)} for _ in range(2)]
    merged = blockmerge.merge("mats", models, base=base, objective="average", num_iterations=3)
    assert torch.allclose(merged["w"], (models[0]["w"] + models[1]["w"]) / 2, atol=1e-5)
    with pytest.raises(BlockmergeError, match=r"raise --block-size \(block_size=\) to at least 12582912"):
        blockmerge.merge("mats", models, base=base, objective="average", block_size="8MiB")
