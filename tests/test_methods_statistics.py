"""Methods that read statistics (docs/methods.md §5 Fisher, §6.1 RegMean, §8 UBGM, §16) against plainly written
numpy references, and properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_family
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import blockmerge
from blockmerge import plugins
from blockmerge.errors import BlockmergeError
from blockmerge.plugins.regmean import ROW_CHUNK, regmean

FLOATS = ["embed.weight", "layer.0.attn.weight", "layer.0.norm", "layer.1.mlp.weight", "head.bias"]
LINEARS = ["layer.0.attn.weight", "layer.1.mlp.weight"]
MODULES = {"fisher": "blockmerge.plugins.fisher", "regmean": "blockmerge.plugins.regmean",
           "ubgm": "blockmerge.plugins.ubgm"}


@pytest.fixture(scope="module", autouse=True)
def registered(tmp_path_factory):
    """Register the three methods through a temporary entry point unless the installed package already does."""
    plugins.registry.cache_clear()
    missing = [name for name in MODULES if name not in plugins.registry()]
    with pytest.MonkeyPatch.context() as mp:
        if missing:
            root = tmp_path_factory.mktemp("entry_points")
            info = root / "blockmerge_statistics_methods-0.0.dist-info"
            info.mkdir()
            (info / "METADATA").write_text("Metadata-Version: 2.1\nName: blockmerge-statistics-methods\n"
                                           "Version: 0.0\n")
            lines = "".join(f"{name} = {MODULES[name]}:METHOD\n" for name in missing)
            (info / "entry_points.txt").write_text("[blockmerge.methods]\n" + lines)
            mp.syspath_prepend(str(root))
            plugins.registry.cache_clear()
        assert all(name in plugins.registry() for name in MODULES)
        yield
    plugins.registry.cache_clear()


def np_(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def random_stats(like: dict, seed: int, names: list[str] = FLOATS, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(like[n].shape, generator=g) * scale for n in names}


def gram(num_in: int, g: torch.Generator, rows: int | None = None, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """XᵀX / n of random activations with uneven feature scales; features in `dead` are always 0."""
    rows = rows or 4 * num_in + 4
    x = torch.randn(rows, num_in, generator=g) * torch.linspace(0.5, 2.0, num_in)
    x[:, list(dead)] = 0.0
    return (x.T @ x) / rows


# --- Fisher ---

def fisher_reference(models: list[dict], fishers: list[dict], names: list[str], weights=None, floor: float = 1e-8,
                     mode: str = "floor", normalize: bool = False) -> dict[str, np.ndarray]:
    w = np.ones(len(models)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    if normalize:
        norms = [np.sqrt(sum((np_(f[n]) ** 2).sum() for n in names)) for f in fishers]
        w = w / np.asarray(norms)
    out = {}
    for n in names:
        num = np.zeros(models[0][n].shape)
        den = np.zeros(models[0][n].shape)
        for t, (m, f) in enumerate(zip(models, fishers)):
            F = np_(f[n])
            if mode == "floor" or (mode == "favor_target" and t == 0):
                F = np.maximum(F, floor)
            num += w[t] * F * np_(m[n])
            den += w[t] * F
        if mode == "zero":
            out[n] = np.where(den == 0, 0.0, num / np.where(den == 0, 1.0, den))
        else:
            out[n] = num / den
    return out


def patterned_fishers(models: list[dict], seed: int) -> list[dict]:
    """Flat index % 5: 0 → every Fisher 0; 1 → every Fisher below 1e-6; 2 → model 0's Fisher 0; else uniform."""
    g = torch.Generator().manual_seed(seed)
    out = [{} for _ in models]
    for n in FLOATS:
        shape = models[0][n].shape
        pattern = (torch.arange(max(1, models[0][n].numel())) % 5)[:models[0][n].numel()].reshape(shape)
        for t in range(len(models)):
            f = torch.rand(shape, generator=g)
            f = torch.where(pattern == 0, 0.0, f)
            f = torch.where(pattern == 1, f * 1e-7, f)
            if t == 0:
                f = torch.where(pattern == 2, 0.0, f)
            out[t][n] = f
    return out


@pytest.mark.parametrize("mode", ["floor", "favor_target", "zero"])
def test_fisher_zero_fisher_modes_match_reference(mode):
    base, models = make_family(3, seed=3)
    fishers = patterned_fishers(models, seed=4)
    out = blockmerge.merge("fisher", models, stats=[{"fisher": f} for f in fishers], zero_fisher=mode,
                           fisher_floor=1e-6)
    ref = fisher_reference(models, fishers, FLOATS, floor=1e-6, mode=mode)
    for n in FLOATS:
        np.testing.assert_allclose(np_(out[n]), ref[n], rtol=1e-5, atol=1e-6, err_msg=n)
    assert torch.equal(out["position_ids"], models[0]["position_ids"])
    # Coordinates where every Fisher is 0: the average, model 0, or 0.
    w = out["layer.1.mlp.weight"].flatten()[::5]
    thetas = [m["layer.1.mlp.weight"].flatten()[::5] for m in models]
    expected = {"floor": sum(thetas) / 3, "favor_target": thetas[0], "zero": torch.zeros_like(w)}[mode]
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-6)
    if mode == "zero":
        assert torch.equal(w, torch.zeros_like(w))


def test_fisher_favor_target_lets_model_0_win_below_the_floor():
    models = [{"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([10.0, 20.0, 30.0])}]
    stats = [{"fisher": {"w": torch.tensor([0.0, 1e-9, 1.0])}}, {"fisher": {"w": torch.tensor([0.0, 1e-9, 1.0])}}]
    favored = blockmerge.merge("fisher", models, stats=stats, zero_fisher="favor_target", fisher_floor=1e-6)
    floored = blockmerge.merge("fisher", models, stats=stats, zero_fisher="floor", fisher_floor=1e-6)
    # Below the floor model 0 is floored to 1e-6 against 1e-9 (or 0): it wins.
    torch.testing.assert_close(favored["w"], torch.tensor([1.0, (2e-6 + 20e-9) / (1e-6 + 1e-9), 16.5]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(floored["w"], torch.tensor([5.5, 11.0, 16.5]))


@pytest.mark.parametrize("mode", ["floor", "favor_target", "zero"])
def test_fisher_weights(mode):
    base, models = make_family(3, seed=5)
    fishers = patterned_fishers(models, seed=6)
    out = blockmerge.merge("fisher", models, stats=[{"fisher": f} for f in fishers], weights=[1, 2, 3],
                           zero_fisher=mode)
    ref = fisher_reference(models, fishers, FLOATS, weights=[1, 2, 3], mode=mode)
    for n in FLOATS:
        np.testing.assert_allclose(np_(out[n]), ref[n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_fisher_normalize_fishers_uses_one_global_norm_per_model():
    base, models = make_family(3, seed=7)
    with_fisher = [n for n in FLOATS if n != "layer.0.norm"]  # layer.0.norm has none: averaged, not in the norm
    fishers = [random_stats(models[0], seed=10 + t, names=with_fisher, scale=s) for t, s in enumerate([1, 1e3, 1e-3])]
    stats = [{"fisher": f} for f in fishers]
    out = blockmerge.merge("fisher", models, stats=stats, normalize_fishers=True, weights=[3, 1, 2])
    ref = fisher_reference(models, fishers, with_fisher, weights=[3, 1, 2], normalize=True)
    for n in with_fisher:
        np.testing.assert_allclose(np_(out[n]), ref[n], rtol=1e-5, atol=1e-6, err_msg=n)
    np.testing.assert_allclose(np_(out["layer.0.norm"]), sum(np_(m["layer.0.norm"]) for m in models) / 3,
                               rtol=1e-6, atol=1e-7)
    # A per-tensor norm would give a different merge.
    per_tensor = {}
    for n in with_fisher:
        w = np.array([3, 1, 2]) / 6 / np.array([np.linalg.norm(np_(f[n])) for f in fishers])
        per_tensor[n] = sum(w[t] * np_(fishers[t][n]) * np_(models[t][n]) for t in range(3)) / \
            sum(w[t] * np_(fishers[t][n]) for t in range(3))
    assert not np.allclose(per_tensor["embed.weight"], ref["embed.weight"], rtol=1e-4)
    # Scaling one model's Fishers everywhere leaves the normalised merge unchanged.
    rescaled = [{"fisher": {n: f[n] * c for n in f}} for f, c in zip(fishers, [7.0, 1e-2, 1.0])]
    again = blockmerge.merge("fisher", models, stats=rescaled, normalize_fishers=True, weights=[3, 1, 2])
    for n in with_fisher:
        torch.testing.assert_close(again[n], out[n], rtol=1e-5, atol=1e-6)


def test_fisher_normalize_rejects_an_all_zero_fisher():
    models = [{"w": torch.ones(3)}, {"w": torch.zeros(3)}]
    stats = [{"fisher": {"w": torch.ones(3)}}, {"fisher": {"w": torch.zeros(3)}}]
    with pytest.raises(BlockmergeError, match="model 1's Fisher is zero"):
        blockmerge.merge("fisher", models, stats=stats, normalize_fishers=True)


def test_fisher_hyperparameters_are_checked():
    base, models = make_family(2)
    stats = [{"fisher": random_stats(m, seed=i)} for i, m in enumerate(models)]
    for bad, match in [({"zero_fisher": "nearest"}, "zero_fisher"), ({"fisher_floor": 0}, "fisher_floor"),
                       ({"weights": [1, 2, 3]}, "weights has 3 entries"), ({"weights": [-1, 2]}, "non-negative"),
                       ({"zero_fisher": "favor_target", "weights": [0, 1]}, "positive weight on model 0")]:
        with pytest.raises(BlockmergeError, match=match):
            blockmerge.merge("fisher", models, stats=stats, **bad)


# --- RegMean ---

def regmean_reference(models: list[dict], grams: list[dict], name: str, alpha: float) -> np.ndarray:
    """W* = ((Σ G̃_t)^{-1} Σ G̃_t W_tᵀ)ᵀ, G̃ = α G + (1 − α) diag(G), with np.linalg.inv."""
    reduced = [alpha * np_(g[name]) + (1 - alpha) * np.diag(np.diag(np_(g[name]))) for g in grams]
    inverse = np.linalg.inv(sum(reduced))
    return (inverse @ sum(r @ np_(m[name]).T for r, m in zip(reduced, models))).T


def linear_grams(models: list[dict], seed: int, dead: tuple[int, ...] = ()) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{n: gram(m[n].shape[1], g, dead=dead) for n in LINEARS} for m in models]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_regmean_matches_reference(alpha):
    base, models = make_family(3, seed=8, std=0.5)
    grams = linear_grams(models, seed=9)
    stats = [{"gram_in": g} for g in grams]
    out = blockmerge.merge("regmean", models, stats=stats, alpha=alpha)
    out64 = blockmerge.merge("regmean", models, stats=stats, alpha=alpha, compute_dtype="float64", dtype="float64")
    for n in LINEARS:
        ref = regmean_reference(models, grams, n, alpha)
        np.testing.assert_allclose(np_(out[n]), ref, rtol=1e-4, atol=1e-5, err_msg=n)
        np.testing.assert_allclose(out64[n].numpy(), ref, rtol=1e-10, atol=1e-12, err_msg=n)
    for n in ["embed.weight", "layer.0.norm", "head.bias"]:  # no Gram: averaged
        np.testing.assert_allclose(np_(out[n]), sum(np_(m[n]) for m in models) / 3, rtol=1e-6, atol=1e-7)


def test_regmean_alpha_zero_weights_each_input_feature_by_its_gram_diagonal():
    base, models = make_family(3, seed=10, std=0.5)
    grams = linear_grams(models, seed=11)
    out = blockmerge.merge("regmean", models, stats=[{"gram_in": g} for g in grams], alpha=0)
    for n in LINEARS:
        rows, cols = models[0][n].shape
        ref = np.zeros((rows, cols))
        for i in range(cols):
            num = sum(float(g[n][i, i]) * np_(m[n][:, i]) for g, m in zip(grams, models))
            ref[:, i] = num / sum(float(g[n][i, i]) for g in grams)
        np.testing.assert_allclose(np_(out[n]), ref, rtol=1e-5, atol=1e-6, err_msg=n)


@pytest.mark.parametrize("residue", [0.0, 1e-31])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_regmean_dead_input_feature_gives_a_zero_column(alpha, residue):
    """`residue`: what float rounding leaves beside a 0 diagonal entry of a dead feature's Gram row."""
    base, models = make_family(2, seed=12, std=0.5)
    dead = (3, 7)
    grams = linear_grams(models, seed=13, dead=dead)
    for g in grams:
        for n in LINEARS:
            for d in dead:
                g[n][d, :] = g[n][:, d] = residue
                g[n][d, d] = 0.0
    out = blockmerge.merge("regmean", models, stats=[{"gram_in": g} for g in grams], alpha=alpha)
    for n in LINEARS:
        cols = models[0][n].shape[1]
        live = [i for i in range(cols) if i not in dead]
        reduced = [alpha * np_(g[n]) + (1 - alpha) * np.diag(np.diag(np_(g[n]))) for g in grams]
        sub_inverse = np.linalg.inv(sum(reduced)[np.ix_(live, live)])
        numerator = sum(np_(m[n]) @ r for m, r in zip(models, reduced))
        ref = np.zeros(models[0][n].shape)
        ref[:, live] = numerator[:, live] @ sub_inverse
        np.testing.assert_allclose(np_(out[n]), ref, rtol=1e-4, atol=1e-5, err_msg=n)
        assert torch.equal(out[n][:, list(dead)], torch.zeros(out[n].shape[0], len(dead)))


def test_regmean_parameters_without_grams_are_averaged(tmp_path):
    base, models = make_family(3, seed=14)
    grams = linear_grams(models, seed=15)
    summary = blockmerge.merge("regmean", models, stats=[{"gram_in": g} for g in grams], alpha=0.9,
                               out=tmp_path / "o.safetensors")
    assert summary.tensors_averaged_missing_statistic == 3  # embed.weight, layer.0.norm, head.bias
    assert summary.tensors_merged == 2 and summary.tensors_copied == 1
    out = load_file(tmp_path / "o.safetensors")
    for n in ["embed.weight", "layer.0.norm", "head.bias"]:
        np.testing.assert_allclose(np_(out[n]), sum(np_(m[n]) for m in models) / 3, rtol=1e-6, atol=1e-7)
    for n in LINEARS:
        np.testing.assert_allclose(np_(out[n]), regmean_reference(models, grams, n, 0.9), rtol=1e-4, atol=1e-5)
    with pytest.raises(BlockmergeError, match="no 'gram_in' statistic"):
        blockmerge.merge("regmean", models, stats=[{"gram_in": g} for g in grams], missing_statistic="error")


def test_regmean_row_blocks_across_chunk_boundaries_give_the_same_bytes():
    g = torch.Generator().manual_seed(16)
    rows = 2 * ROW_CHUNK + 89
    models = [{"w": torch.randn(rows, 8, generator=g)} for _ in range(3)]
    stats = [{"gram_in": {"w": gram(8, g)}} for _ in models]
    whole = blockmerge.merge("regmean", models, stats=stats, alpha=0.5)
    ref = regmean_reference(models, [s["gram_in"] for s in stats], "w", 0.5)
    np.testing.assert_allclose(np_(whole["w"]), ref, rtol=1e-4, atol=1e-5)
    for block_rows in (1, 7, ROW_CHUNK - 1, ROW_CHUNK + 3):
        small = blockmerge.merge("regmean", models, stats=stats, alpha=0.5, block_size=block_rows * 8 * 4 * 3)
        assert torch.equal(small["w"], whole["w"]), block_rows


def test_regmean_kernel_rows_do_not_depend_on_the_row_block():
    g = torch.Generator().manual_seed(24)
    rows = 2 * ROW_CHUNK + 89
    weights = [torch.randn(rows, 8, generator=g) for _ in range(2)]
    grams = [gram(8, g) for _ in weights]
    whole = regmean(weights, grams, 0.5)
    for start, stop in [(0, 1), (5, 12), (ROW_CHUNK - 3, ROW_CHUNK + 4), (ROW_CHUNK, 2 * ROW_CHUNK), (rows - 1, rows),
                        (17, rows)]:
        part = regmean([w[start:stop] for w in weights], grams, 0.5, first_row=start)
        assert torch.equal(part, whole[start:stop]), (start, stop)


def test_regmean_square_weights_at_small_block_sizes():
    # gram_in of a square weight [d, d] has the weight's own shape; it must still reach the method whole.
    base, models = make_family(2, seed=25, std=0.5)
    grams = linear_grams(models, seed=26)
    stats = [{"gram_in": g} for g in grams]
    whole = blockmerge.merge("regmean", models, stats=stats, alpha=0.9)
    small = blockmerge.merge("regmean", models, stats=stats, alpha=0.9, block_size=3 * 16 * 4 * 2)
    np.testing.assert_allclose(np_(small["layer.0.attn.weight"]),
                               regmean_reference(models, grams, "layer.0.attn.weight", 0.9), rtol=1e-4, atol=1e-5)
    for n in whole:
        assert torch.equal(small[n], whole[n]), n


def test_regmean_statistics_are_checked():
    base, models = make_family(2, seed=17)
    grams = linear_grams(models, seed=18)
    wrong = [dict(g, **{"layer.1.mlp.weight": torch.eye(32)}) for g in grams]  # [out, out], not [in, in]
    with pytest.raises(BlockmergeError, match=r"'gram_in' statistic has shape \[32, 32\], expected \[16, 16\]"):
        blockmerge.merge("regmean", models, stats=[{"gram_in": g} for g in wrong])
    with pytest.raises(BlockmergeError, match="do not apply"):
        blockmerge.merge("regmean", models, stats=[{"gram_in": dict(g, **{"layer.0.norm": torch.eye(16)})}
                                                   for g in grams])
    with pytest.raises(BlockmergeError, match="none given for model 1"):
        blockmerge.merge("regmean", models, stats=[{"gram_in": grams[0]}, {}])
    with pytest.raises(BlockmergeError, match="alpha"):
        blockmerge.merge("regmean", models, stats=[{"gram_in": g} for g in grams], alpha=1.5)


# --- UBGM ---

def ubgm_reference(base: dict, models: list[dict], hessians: list[dict], base_hessian: dict, name: str,
                   scaling_factor: float, delta0: float, base_scale: float, model_scales) -> np.ndarray:
    H = [np_(h[name]) for h in hessians]
    H0 = np_(base_hessian[name])
    theta0 = np_(base[name])
    P = 1.0 / (scaling_factor * sum(s * h for s, h in zip(model_scales, H)) + base_scale * H0 + delta0)
    return theta0 + scaling_factor * sum(P * (s * h + base_scale * H0 + delta0) * (np_(m[name]) - theta0)
                                         for s, h, m in zip(model_scales, H, models))


@pytest.mark.parametrize("hp", [{}, {"scaling_factor": 0.7, "delta0": 1e-3, "base_scale": 2.0,
                                     "model_scales": [1.0, 10.0, 0.5]}])
def test_ubgm_matches_reference(hp):
    base, models = make_family(3, seed=19)
    hessians = [random_stats(m, seed=20 + t) for t, m in enumerate(models)]
    for h in hessians:  # some coordinates with no curvature at all
        h["layer.1.mlp.weight"][::3] = 0.0
    base_hessian = random_stats(base, seed=30)
    base_hessian["layer.1.mlp.weight"][::3] = 0.0
    out = blockmerge.merge("ubgm", models, base=base, stats=[{"fisher": h} for h in hessians],
                           base_stats={"fisher": base_hessian}, **hp)
    full = {"scaling_factor": 1.0, "delta0": 1e-12, "base_scale": 1.0, "model_scales": [1.0] * 3, **hp}
    for n in FLOATS:
        ref = ubgm_reference(base, models, hessians, base_hessian, n, **full)
        np.testing.assert_allclose(np_(out[n]), ref, rtol=1e-5, atol=1e-6, err_msg=n)
    assert torch.equal(out["position_ids"], base["position_ids"])


def test_ubgm_with_zero_hessians_is_task_arithmetic():
    base, models = make_family(3, seed=21)
    zeros = {n: torch.zeros(base[n].shape) for n in FLOATS}
    out = blockmerge.merge("ubgm", models, base=base, stats=[{"fisher": zeros}] * 3, base_stats={"fisher": zeros},
                           scaling_factor=0.3)
    ta = blockmerge.merge("task_arithmetic", models, base=base, scaling_factor=0.3)
    for n in FLOATS:
        ref = np_(base[n]) + 0.3 * sum(np_(m[n]) - np_(base[n]) for m in models)
        np.testing.assert_allclose(np_(out[n]), ref, rtol=1e-6, atol=1e-6, err_msg=n)
        assert torch.equal(out[n], ta[n]), n  # δ0/δ0 is exactly 1


def test_ubgm_inputs_are_checked():
    base, models = make_family(2, seed=22)
    stats = [{"fisher": random_stats(m, seed=t)} for t, m in enumerate(models)]
    base_stats = {"fisher": random_stats(base, seed=9)}
    with pytest.raises(BlockmergeError, match="needs a base"):
        blockmerge.merge("ubgm", models, stats=stats, base_stats=base_stats)
    with pytest.raises(BlockmergeError, match="statistics of the base; none given"):
        blockmerge.merge("ubgm", models, base=base, stats=stats)
    with pytest.raises(BlockmergeError, match="model_scales has 3 entries for 2 models"):
        blockmerge.merge("ubgm", models, base=base, stats=stats, base_stats=base_stats, model_scales=[1, 2, 3])
    with pytest.raises(BlockmergeError, match="delta0"):
        blockmerge.merge("ubgm", models, base=base, stats=stats, base_stats=base_stats, delta0=-1)
    partial = {"fisher": {n: t for n, t in base_stats["fisher"].items() if n != "head.bias"}}
    with pytest.raises(BlockmergeError, match="no 'fisher' statistic of the base"):
        blockmerge.merge("ubgm", models, base=base, stats=stats, base_stats=partial, missing_statistic="error")
    averaged = blockmerge.merge("ubgm", models, base=base, stats=stats, base_stats=partial)
    torch.testing.assert_close(averaged["head.bias"], (models[0]["head.bias"] + models[1]["head.bias"]) / 2)


def test_missing_statistics_are_errors():
    base, models = make_family(3, seed=23)
    stats = [{"fisher": random_stats(m, seed=t)} for t, m in enumerate(models)]
    with pytest.raises(BlockmergeError, match="reads 'fisher' statistics; none given for model 2"):
        blockmerge.merge("fisher", models, stats=stats[:2] + [{}])
    with pytest.raises(BlockmergeError, match="statistics given for 2 models, there are 3"):
        blockmerge.merge("fisher", models, stats=stats[:2])
    holes = stats[:2] + [{"fisher": {n: t for n, t in stats[2]["fisher"].items() if n != "embed.weight"}}]
    with pytest.raises(BlockmergeError, match="no 'fisher' statistic for model 2"):
        blockmerge.merge("fisher", models, stats=holes)
    with pytest.raises(BlockmergeError, match="reads 'fisher' statistics; none given for model 0"):
        blockmerge.merge("ubgm", models, base=base, base_stats={"fisher": stats[0]["fisher"]})


# --- properties ---

shapes = st.dictionaries(st.sampled_from(["a", "b.weight", "c.bias", "d"]),
                         st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)
linear_shapes = st.dictionaries(st.sampled_from(["a.weight", "b.weight", "c.weight"]),
                                st.tuples(st.integers(0, 9), st.integers(1, 7)), min_size=1, max_size=3)


def positive(like: dict, g: torch.Generator, zeros: bool = False) -> dict[str, torch.Tensor]:
    """Positive values over several orders of magnitude (some exact zeros when asked)."""
    out = {}
    for n, t in like.items():
        if t.is_floating_point():
            v = torch.exp(torch.empty(t.shape).uniform_(-5, 5, generator=g))
            out[n] = torch.where(torch.rand(t.shape, generator=g) < 0.2, 0.0, v) if zeros else v
    return out


def grams_for(like: dict, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Well-conditioned positive definite Grams, each with its own overall scale."""
    out = {}
    for n, t in like.items():
        k = t.shape[1]
        x = torch.randn(4 * k + 4, k, generator=g)
        scale = float(torch.exp(torch.empty(()).uniform_(-3, 3, generator=g)))
        out[n] = ((x.T @ x) / (4 * k + 4) + 0.5 * torch.eye(k)) * scale
    return out


@settings(max_examples=25, deadline=None)
@given(shapes=shapes, linears=linear_shapes, num_models=st.integers(1, 4), seed=st.integers(0, 1000),
       mode=st.sampled_from(["floor", "favor_target", "zero"]), normalize=st.booleans(), alpha=st.floats(0, 1))
def test_copies_of_one_model_merge_to_it(shapes, linears, num_models, seed, mode, normalize, alpha):
    g = torch.Generator().manual_seed(seed)
    _, models = make_family(1, seed=seed, shapes=shapes, std=1.0)
    fishers = [positive(models[0], g) for _ in range(num_models)]
    out = blockmerge.merge("fisher", [models[0]] * num_models, stats=[{"fisher": f} for f in fishers],
                           zero_fisher=mode, normalize_fishers=normalize)
    for n, t in models[0].items():
        torch.testing.assert_close(out[n], t, rtol=1e-5, atol=1e-5)
    _, linear_models = make_family(1, seed=seed, shapes=linears, std=1.0)
    grams = [grams_for(linear_models[0], g) for _ in range(num_models)]
    out = blockmerge.merge("regmean", [linear_models[0]] * num_models, stats=[{"gram_in": x} for x in grams],
                           alpha=alpha)
    for n, t in linear_models[0].items():
        torch.testing.assert_close(out[n], t, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(shapes=shapes, linears=linear_shapes, num_models=st.integers(1, 4), seed=st.integers(0, 1000),
       scale=st.floats(1e-3, 1e3), alpha=st.floats(0, 1))
def test_scaling_every_statistic_by_one_constant_changes_nothing(shapes, linears, num_models, seed, scale, alpha):
    g = torch.Generator().manual_seed(seed)
    _, models = make_family(num_models, seed=seed, shapes=shapes, std=1.0)
    fishers = [positive(m, g, zeros=True) for m in models]
    one = blockmerge.merge("fisher", models, stats=[{"fisher": f} for f in fishers], zero_fisher="zero")
    scaled = [{"fisher": {n: f[n] * scale for n in f}} for f in fishers]
    other = blockmerge.merge("fisher", models, stats=scaled, zero_fisher="zero")
    for n in one:
        torch.testing.assert_close(other[n], one[n], rtol=1e-5, atol=1e-5)
    _, linear_models = make_family(num_models, seed=seed, shapes=linears, std=1.0)
    grams = [grams_for(m, g) for m in linear_models]
    one = blockmerge.merge("regmean", linear_models, stats=[{"gram_in": x} for x in grams], alpha=alpha)
    scaled = [{"gram_in": {n: x[n] * scale for n in x}} for x in grams]
    other = blockmerge.merge("regmean", linear_models, stats=scaled, alpha=alpha)
    for n in one:
        torch.testing.assert_close(other[n], one[n], rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shapes, linears=linear_shapes, num_models=st.integers(1, 4), seed=st.integers(0, 1000),
       mode=st.sampled_from(["floor", "favor_target", "zero"]), normalize=st.booleans(),
       block_bytes=st.integers(1, 300), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_block_size_does_not_change_the_bytes(shapes, linears, num_models, seed, mode, normalize, block_bytes,
                                              dtype):
    g = torch.Generator().manual_seed(seed)
    base, models = make_family(num_models, dtype=dtype, seed=seed, shapes=shapes)
    fishers = [positive(m, g, zeros=not normalize) for m in models]  # an all-zero Fisher has no norm
    runs = [("fisher", {"stats": [{"fisher": f} for f in fishers], "zero_fisher": mode,
                        "normalize_fishers": normalize}),
            ("ubgm", {"base": base, "stats": [{"fisher": f} for f in fishers],
                      "base_stats": {"fisher": positive(base, g, zeros=True)}, "scaling_factor": 0.6})]
    _, linear_models = make_family(num_models, dtype=dtype, seed=seed, shapes=linears)
    runs.append(("regmean", {"models": linear_models, "alpha": 0.9,
                             "stats": [{"gram_in": grams_for(m, g)} for m in linear_models]}))
    for method, kwargs in runs:
        kwargs = {"models": models, **kwargs}
        whole = blockmerge.merge(method, **kwargs)
        small = blockmerge.merge(method, **kwargs, block_size=block_bytes)
        for n in whole:
            assert whole[n].dtype == small[n].dtype == kwargs["models"][0][n].dtype
            assert torch.equal(whole[n].view(-1).view(torch.uint8), small[n].view(-1).view(torch.uint8)), (method, n)


@pytest.mark.parametrize("method,options", [
    ("regmean", {"alpha": 0.7}),
    ("mats", {"objective": "regmean", "num_iterations": 15}),
    ("mats", {"objective": "regmean", "solver": "direct"}),
])
def test_statistic_merges_give_the_same_bits_on_any_number_of_threads(method, options):
    """LAPACK factorizations and reductions split their work by torch's thread count; merges must not."""
    g = torch.Generator().manual_seed(5)
    shapes = {"a.weight": (300, 256), "b.weight": (128, 320)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    models = [{n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(3)]
    stats = []
    for _ in models:
        grams = {}
        for n, (_, width) in shapes.items():
            x = torch.randn(2 * width, width, generator=g)
            grams[n] = x.T @ x / len(x)
        stats.append({"gram_in": grams})
    before = torch.get_num_threads()
    merged = {}
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            merged[threads] = blockmerge.merge(method, models=models, base=base, stats=stats, **options)
    finally:
        torch.set_num_threads(before)
    for name in shapes:
        assert torch.equal(merged[1][name], merged[4][name]), name
