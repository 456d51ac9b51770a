"""The generalized task-vector family (weights, normalize, exact top-k, breadcrumbs' band, sign rule with + on zero,
L1 rescale, DELLA's ranked drop) against plainly written numpy references of mergekit's formulas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import blockmerge
from blockmerge.cli import main
from blockmerge.errors import BlockmergeError
from blockmerge.plugins.della import probabilities
from blockmerge.plugins.task_vectors import keep_mask, uniform_draws

SHAPES = {"model.layers.0.mlp.up_proj.weight": (24, 10), "model.layers.1.self_attn.q_proj.weight": (10, 10),
          "model.norm.weight": (10,), "lm_head.bias": ()}


def family(seed: int, count: int, step: float | None = None) -> tuple[dict, list[dict]]:
    """Base and `count` fine-tunes; with `step`, task vectors are small multiples of it (runs of equal magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    models = []
    for _ in range(count):
        if step is None:
            models.append({n: base[n] + 0.1 * torch.randn(base[n].shape, generator=g) for n in base})
        else:
            models.append({n: base[n] + step * torch.randint(-3, 4, base[n].shape, generator=g).float() for n in base})
    return base, models


def ascending_positions(tau: np.ndarray) -> np.ndarray:
    """Each entry's position in the ascending order of |τ| (equal magnitudes in index order)."""
    flat = np.abs(tau.ravel())
    order = np.lexsort((np.arange(flat.size), flat))
    positions = np.empty(flat.size, dtype=np.int64)
    positions[order] = np.arange(flat.size)
    return positions.reshape(tau.shape)


def top_count(tau: np.ndarray, density: float) -> np.ndarray:
    k = int(tau.size * density)
    return np.where(ascending_positions(tau) >= tau.size - k, tau, 0.0)


def outlier_band(tau: np.ndarray, density: float, gamma: float) -> np.ndarray:
    n = tau.size
    top = int(n * gamma)
    bottom = n - int(n * density) - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    position = ascending_positions(tau)
    return np.where((position >= bottom) & (position < n - top), tau, 0.0)


def l1_rescaled(tau: np.ndarray, kept: np.ndarray) -> np.ndarray:
    whole, part = np.abs(tau).sum(), np.abs(kept).sum()
    return kept * (whole / part) if whole >= 1e-7 and part >= 1e-7 else kept


def combine(base: np.ndarray, kept: list[np.ndarray], weights: list[float], sign: bool, normalize: bool,
            scale: float) -> np.ndarray:
    """mergekit's generalized task arithmetic on sparsified task vectors, entry by entry."""
    weighted = [w * k for w, k in zip(weights, kept)]
    out = np.zeros(base.size)
    for j in range(base.size):
        values = [d.ravel()[j] for d in weighted]
        if sign:
            elected = 1.0 if sum(values) >= 0 else -1.0
            agree = [i for i, v in enumerate(values) if np.sign(v) == elected]
            total = sum(values[i] for i in agree)
            divisor = sum(weights[i] for i in agree) or 1.0
        else:
            total = sum(values)
            divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        out[j] = scale * (total / divisor if normalize else total)
    return base.astype(np.float64) + out.reshape(base.shape)


def taus(base: dict, models: list[dict], name: str) -> list[np.ndarray]:
    """Task vectors as float32 differences (as both tools take them), in float64."""
    return [(m[name].float().numpy() - base[name].float().numpy()).astype(np.float64) for m in models]


def check(merged: dict, expected: dict, tolerance: float = 1e-5) -> None:
    for name, value in expected.items():
        np.testing.assert_allclose(merged[name].float().numpy(), value, rtol=tolerance, atol=tolerance, err_msg=name)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(1, 4), sign=st.booleans(), normalize=st.booleans(),
       ties=st.booleans(), block_rows=st.integers(1, 30))
def test_exact_top_count_with_weights_matches_mergekit_ties(seed, count, sign, normalize, ties, block_rows):
    base, models = family(seed, count, step=0.25 if ties else None)
    rng = np.random.default_rng(seed)
    densities = [float(d) for d in rng.uniform(0.1, 1.0, count)]
    weights = [float(w) for w in rng.uniform(0.2, 1.5, count)]
    merged = blockmerge.merge("ties", models, base=base, density=densities, weights=weights, trim="block",
                              exact_count=True, majority_sign="plus", normalize=normalize, scaling_factor=0.7,
                              block_size=block_rows * 10 * 4 * (count + 1)) if sign else None
    if not sign:  # the same sparsifier without consensus: breadcrumbs with gamma 0 keeps exactly the top int(d·K)
        merged = blockmerge.merge("breadcrumbs", models, base=base, density=densities, gamma=0.0, weights=weights,
                                  normalize=normalize, scaling_factor=0.7, block_size=block_rows * 10 * 4 * (count + 1))
    expected = {}
    for name in SHAPES:
        kept = [top_count(t, d) for t, d in zip(taus(base, models, name), densities)]
        expected[name] = combine(base[name].numpy(), kept, weights, sign, normalize, 0.7)
    check(merged, expected)


def test_exact_top_count_keeps_exactly_int_dk_where_magnitudes_tie_across_blocks():
    base, models = family(5, 2, step=0.5)  # magnitudes 0, 0.5, 1, 1.5: long runs of ties
    merged = blockmerge.merge("breadcrumbs", models[:1], base=base, density=0.3, gamma=0.0, block_size=4 * 10 * 4 * 2)
    for name in SHAPES:
        tau = taus(base, models[:1], name)[0]
        kept = (merged[name].numpy().astype(np.float64) - base[name].numpy()) != 0
        assert kept.sum() == min(int(tau.size * 0.3), np.count_nonzero(tau)), name
        np.testing.assert_allclose(merged[name].numpy(), base[name].numpy() + top_count(tau, 0.3), atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(1, 3), density=st.floats(0.05, 1.0),
       gamma=st.floats(0.0, 0.3), sign=st.booleans(), l1=st.booleans(), ties=st.booleans())
def test_breadcrumbs_matches_the_reference(seed, count, density, gamma, sign, l1, ties):
    base, models = family(seed, count, step=0.25 if ties else None)
    merged = blockmerge.merge("breadcrumbs", models, base=base, density=density, gamma=gamma,
                              consensus="sign" if sign else "none", rescale="l1" if l1 else False, block_size=400)
    expected = {}
    for name in SHAPES:
        kept = []
        for tau in taus(base, models, name):
            band = outlier_band(tau, density, gamma)
            kept.append(l1_rescaled(tau, band) if l1 else band)
        expected[name] = combine(base[name].numpy(), kept, [1.0] * count, sign, False, 1.0)
    check(merged, expected)


@pytest.mark.parametrize("sign", [False, True])
def test_dare_l1_rescale_and_per_model_drop_rates_match_the_reference(sign):
    base, models = family(11, 3)
    rates, weights = [0.5, 0.3, 0.8], [1.0, 0.5, 2.0]
    merged = blockmerge.merge("dare", models, base=base, drop_rate=rates, weights=weights, rescale="l1", seed=4,
                              consensus="sign" if sign else "none", normalize=sign)
    expected = {}
    for name, shape in SHAPES.items():
        kept = []
        for t, (tau, p) in enumerate(zip(taus(base, models, name), rates)):
            mask = keep_mask(4, name, t, 0, tau.size, p).numpy().reshape(shape)
            kept.append(l1_rescaled(tau, np.where(mask, tau, 0.0)))
        expected[name] = combine(base[name].numpy(), kept, weights, sign, sign, 1.0)
    check(merged, expected)


def della_reference(tau: np.ndarray, name: str, model: int, density: float, epsilon: float, seed: int,
                    rescale: bool) -> np.ndarray:
    rows = tau.reshape(tau.shape[0] if tau.ndim > 1 else 1, -1)
    width = rows.shape[1]
    p = np.empty_like(rows)
    for i, row in enumerate(rows):
        order = sorted(range(width), key=lambda j: (abs(row[j]), j))
        for rank, j in enumerate(order):
            p[i, j] = density if width == 1 else density - epsilon + 2 * epsilon * rank / (width - 1)
    draws = uniform_draws(seed, name, model, 0, tau.size).astype(np.float64).reshape(rows.shape)
    kept = np.where(draws < p * 2.0**32, rows / p if rescale else rows, 0.0)
    return kept.reshape(tau.shape)


@pytest.mark.parametrize("consensus,rescale", [("sign", True), ("none", "l1"), ("none", False)])
def test_della_matches_the_reference(consensus, rescale):
    base, models = family(13, 3)
    density, epsilon = [0.5, 0.6, 0.4], 0.2
    merged = blockmerge.merge("della", models, base=base, density=density, epsilon=epsilon, seed=9,
                              consensus=consensus, rescale=rescale, normalize=consensus == "sign", block_size=300)
    expected = {}
    for name in SHAPES:
        kept = []
        for t, (tau, d) in enumerate(zip(taus(base, models, name), density)):
            dropped = della_reference(tau, name, t, d, epsilon, 9, rescale is True)
            kept.append(l1_rescaled(tau, dropped) if rescale == "l1" else dropped)
        expected[name] = combine(base[name].numpy(), kept, [1.0] * 3, consensus == "sign", consensus == "sign", 1.0)
    check(merged, expected)


def test_della_keeps_each_rank_with_its_probability():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(2000, 64, generator=g)
    p = probabilities(64, 0.5, 0.2)
    assert np.isclose(p[0], 0.3) and np.isclose(p[-1], 0.7) and np.all(np.diff(p) > 0)
    merged = blockmerge.merge("della", [{"w": tau}], base={"w": torch.zeros_like(tau)}, density=0.5, epsilon=0.2,
                              rescale=False, consensus="none")
    kept = merged["w"] != 0
    largest = tau.abs().argmax(1)
    smallest = tau.abs().argmin(1)
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    assert abs(kept[torch.arange(2000), largest].float().mean().item() - 0.7) < 0.04
    assert abs(kept[torch.arange(2000), smallest].float().mean().item() - 0.3) < 0.04


def test_della_refuses_a_band_outside_zero_one():
    base, models = family(1, 2)
    with pytest.raises(BlockmergeError, match=r"della: density ± epsilon must lie inside \(0, 1\)"):
        blockmerge.merge("della", models, base=base, density=0.9, epsilon=0.2)


def test_task_arithmetic_weights_normalize_and_a_scale_per_layer():
    base, models = family(2, 3)
    merged = blockmerge.merge("task_arithmetic", models, base=base, weights=[1.0, 2.0, 0.5], normalize=True,
                              scaling_factor=[0.5, 1.5])
    for name in SHAPES:
        scale = 1.5 if "layers.1." in name else 0.5  # a gradient over the two layers; other tensors sit at 0
        expected = combine(base[name].numpy(), taus(base, models, name), [1.0, 2.0, 0.5], False, True, scale)
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_one_per_model_value_serves_every_model_and_a_wrong_count_is_refused():
    base, models = family(3, 3)
    one = blockmerge.merge("ties", models, base=base, density=[0.4])
    each = blockmerge.merge("ties", models, base=base, density=[0.4, 0.4, 0.4])
    assert all(torch.equal(one[n], each[n]) for n in one)
    with pytest.raises(BlockmergeError, match="density has 2 entries for 3 models"):
        blockmerge.merge("ties", models, base=base, density=[0.4, 0.5])


def test_a_global_trim_refuses_a_density_that_varies_by_tensor():
    base, models = family(3, 2)
    with pytest.raises(BlockmergeError, match="densities differ between tensors"):
        blockmerge.merge("ties", models, base=base, density=[[{"filter": "mlp", "value": 0.3}, {"value": 0.5}]])


def mergekit_yaml(config: dict, tmp_path) -> tuple[dict, dict]:
    """The tensors `blockmerge mergekit-yaml` writes for `config`, and its base's."""
    path, out = tmp_path / "config.yml", tmp_path / "merged"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["mergekit-yaml", str(path), str(out), "-q"])
    assert result.exit_code == 0, result.output
    return load_file(out / "model.safetensors"), load_file(Path(config["base_model"]) / "model.safetensors")


def test_mergekit_ties_config_gives_mergekit_ties(llamas, tmp_path):
    """Per-model weights, a density by filter and layer, lambda: exactly int(d·K) per tensor, + on a zero sum."""
    density_a = [{"filter": "mlp", "value": [0.2, 0.6]}, {"value": 0.5}]
    config = {"merge_method": "ties", "base_model": str(llamas["base"]), "dtype": "float32",
              "parameters": {"lambda": 0.8, "normalize": True, "int8_mask": True},
              "models": [{"model": str(llamas["a"]), "parameters": {"weight": 0.7, "density": density_a}},
                         {"model": str(llamas["b"]), "parameters": {"weight": 0.4, "density": 0.3}}]}
    got, base = mergekit_yaml(config, tmp_path)
    models = [load_file(llamas[k] / "model.safetensors") for k in ("a", "b")]
    for name in base:
        layer = 1 if ".layers.1." in name else 0
        d_a = ([0.2, 0.6][layer]) if "mlp" in name else 0.5
        kept = [top_count(t, d) for t, d in zip(taus(base, models, name), (d_a, 0.3))]
        expected = combine(base[name].numpy(), kept, [0.7, 0.4], True, True, 0.8)
        np.testing.assert_allclose(got[name].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                                    "della_linear", "task_arithmetic"])
def test_every_mergekit_task_vector_method_runs_from_its_config(llamas, tmp_path, method):
    config = {"merge_method": method, "base_model": str(llamas["base"]),
              "parameters": {"density": 0.5, "weight": 0.5, "gamma": 0.05, "epsilon": 0.1},
              "models": [{"model": str(llamas["a"])}, {"model": str(llamas["b"])}]}
    got, base = mergekit_yaml(config, tmp_path)
    changed = [n for n in base if not torch.equal(got[n], base[n])]
    assert len(changed) > len(base) // 2
    if method == "task_arithmetic":
        models = [load_file(llamas[k] / "model.safetensors") for k in ("a", "b")]
        for name in base:
            expected = combine(base[name].numpy(), taus(base, models, name), [0.5, 0.5], False, False, 1.0)
            np.testing.assert_allclose(got[name].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("method,parameters", [("multislerp", {"weight": 0.5}), ("karcher", {}), ("ram", {}),
                                               ("ramplus_tl", {}), ("model_stock", {"filter_wise": True})])
def test_mergekit_methods_beyond_task_vectors_run_from_their_configs(llamas, tmp_path, method, parameters):
    models = [{"model": str(llamas[k])} for k in ("a", "b")]
    config = {"merge_method": method, "base_model": str(llamas["base"]), "parameters": parameters, "models": models}
    got, base = mergekit_yaml(config, tmp_path)
    assert sum(not torch.equal(got[n], base[n]) for n in base) > len(base) // 2


def test_ties_with_l1_rescale_matches_the_reference():
    base, models = family(21, 3)
    merged = blockmerge.merge("ties", models, base=base, density=0.3, trim="block", exact_count=True,
                              majority_sign="plus", rescale="l1")
    for name in SHAPES:
        kept = [l1_rescaled(t, top_count(t, 0.3)) for t in taus(base, models, name)]
        np.testing.assert_allclose(merged[name].numpy(), combine(base[name].numpy(), kept, [1.0] * 3, True, True, 1.0),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
