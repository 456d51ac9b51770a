"""model_stock and nearswap against plainly written references (mergekit's formulas in float64 numpy)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blockmerge
from blockmerge.errors import BlockmergeError

SHAPES = {"model.layers.0.mlp.up_proj.weight": (30, 8), "model.layers.1.self_attn.q_proj.weight": (8, 8),
          "model.norm.weight": (8,), "lm_head.bias": ()}


def family(seed: int, count: int, std: float = 0.1) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    shared = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}  # a common direction: cosines > 0
    return base, [{n: base[n] + std * (shared[n] + torch.randn(base[n].shape, generator=g)) for n in base}
                  for _ in range(count)]


def model_stock_reference(base: np.ndarray, models: list[np.ndarray]) -> np.ndarray:
    taus = [m.astype(np.float64).ravel() - base.astype(np.float64).ravel() for m in models]
    cosines = [np.clip(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-6), -1, 1)
               for a, b in itertools.combinations(taus, 2)]
    c = float(np.mean(cosines))
    n = len(models)
    t = n * c / (1 + (n - 1) * c)
    return t * np.mean([m.astype(np.float64) for m in models], axis=0) + (1 - t) * base.astype(np.float64)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(2, 4), block_rows=st.integers(1, 40))
def test_model_stock_matches_the_reference_at_any_block_size(seed, count, block_rows):
    base, models = family(seed, count)
    base.pop("lm_head.bias")  # two scalar task vectors of opposite signs have cos = -1: see below
    models = [{n: t for n, t in m.items() if n in base} for m in models]
    merged = blockmerge.merge("model_stock", models, base=base, block_size=block_rows * 8 * 4 * (count + 1))
    for name, value in merged.items():
        expected = model_stock_reference(base[name].numpy(), [m[name].numpy() for m in models])
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_model_stock_needs_two_models_and_a_base_and_a_finite_ratio():
    base, models = family(0, 2)
    opposed = [{**models[0], "lm_head.bias": base["lm_head.bias"] + 1},
               {**models[1], "lm_head.bias": base["lm_head.bias"] - 1}]
    with pytest.raises(BlockmergeError, match="parameter 'lm_head.bias': model_stock: the task vectors' mean cosine"):
        blockmerge.merge("model_stock", opposed, base=base)
    with pytest.raises(BlockmergeError, match="model_stock: merges at least 2 models, got 1"):
        blockmerge.merge("model_stock", models[:1], base=base)
    with pytest.raises(BlockmergeError, match="model_stock needs a base"):
        blockmerge.merge("model_stock", models)


def nearswap_reference(base: np.ndarray, model: np.ndarray, t: float) -> np.ndarray:
    base, model = base.astype(np.float64), model.astype(np.float64)
    weight = np.clip(t / np.maximum(np.abs(base - model), 1e-6), 0.0, 1.0)
    return weight * model + (1 - weight) * base


@pytest.mark.parametrize("t", [0.0, 0.01, 0.1, 10.0])
def test_nearswap_matches_the_reference(t):
    base, models = family(3, 1)
    merged = blockmerge.merge("nearswap", models, base=base, t=t)
    for name, value in merged.items():
        np.testing.assert_allclose(value.numpy(), nearswap_reference(base[name].numpy(), models[0][name].numpy(), t),
                                   rtol=1e-6, atol=1e-7, err_msg=name)
    assert math.isfinite(float(sum(v.sum() for v in merged.values())))


def test_nearswap_refuses_a_negative_t_and_two_models():
    base, models = family(4, 2)
    with pytest.raises(BlockmergeError, match="t must be non-negative"):
        blockmerge.merge("nearswap", models[:1], base=base, t=-0.1)
    with pytest.raises(BlockmergeError, match="nearswap: merges exactly 1 model, got 2"):
        blockmerge.merge("nearswap", models, base=base)


def test_model_stock_filter_wise_takes_each_rows_own_ratio():
    base, models = family(7, 3)
    base.pop("lm_head.bias")
    models = [{n: t for n, t in m.items() if n in base} for m in models]
    merged = blockmerge.merge("model_stock", models, base=base, filter_wise=True, block_size=400)
    for name, value in merged.items():
        b, ms = base[name].numpy(), [m[name].numpy() for m in models]
        if b.ndim < 2:
            expected = model_stock_reference(b, ms)
        else:
            expected = np.stack([model_stock_reference(b[i], [m[i] for m in ms]) for i in range(b.shape[0])])
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)
    whole = blockmerge.merge("model_stock", models, base=base)
    assert not torch.allclose(whole["model.layers.0.mlp.up_proj.weight"], merged["model.layers.0.mlp.up_proj.weight"])
