"""multislerp and karcher against plainly written references of mergekit's formulas (float64 numpy on whole
flattened tensors), at any block size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blockmerge
from blockmerge.errors import BlockmergeError

SHAPES = {"model.layers.0.mlp.up_proj.weight": (24, 10), "model.layers.1.self_attn.q_proj.weight": (10, 10),
          "model.norm.weight": (10,), "lm_head.bias": ()}


def family(seed: int, count: int, spread: float = 0.5) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    return base, [{n: base[n] + spread * torch.randn(base[n].shape, generator=g) for n in base} for _ in range(count)]


def multislerp_reference(vectors: list[np.ndarray], weights: list[float], normalize: bool = True,
                         eps: float = 1e-8) -> np.ndarray:
    alpha = np.array(weights) / (sum(weights) if normalize else 1.0)
    norms = [np.linalg.norm(v) for v in vectors]
    units = [v / (n + eps) for v, n in zip(vectors, norms)]
    mean = sum(a * u for a, u in zip(alpha, units))
    if np.linalg.norm(mean) < eps:
        return sum(a * v for a, v in zip(alpha, vectors))
    mean = mean / np.linalg.norm(mean)
    tangent = sum(a * (u - (u @ mean) * mean) for a, u in zip(alpha, units))
    r = np.linalg.norm(tangent) + eps
    return float(alpha @ np.array(norms)) * (mean * np.cos(r) + tangent * np.sin(r) / r)


def karcher_reference(vectors: list[np.ndarray], max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    norms = [np.linalg.norm(v) for v in vectors]
    kept = [(v / n, n) for v, n in zip(vectors, norms) if n > tol]
    if not kept:
        return np.zeros_like(vectors[0])
    weight = 1.0 / len(kept)
    u = sum(weight * k for k, _ in kept)
    u = kept[0][0] if np.linalg.norm(u) < tol else u / np.linalg.norm(u)
    for _ in range(max_iter):
        step = np.zeros_like(u)
        for unit, _ in kept:
            cos = np.clip(u @ unit, -1.0, 1.0)
            theta = np.arccos(cos)
            if theta >= tol:
                step += weight * theta / np.sin(theta) * (unit - cos * u)
        length = np.linalg.norm(step)
        if length < tol:
            break
        u = np.cos(length) * u + np.sin(length) * step / length
        if np.linalg.norm(u) > tol:
            u = u / np.linalg.norm(u)
    return sum(norms) / len(vectors) * u


def flat(tensors: list[dict], name: str, minus: dict | None = None) -> list[np.ndarray]:
    return [(t[name].double() - (minus[name].double() if minus else 0)).numpy().ravel() for t in tensors]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(2, 4), task_vectors=st.booleans(), block_rows=st.integers(1, 30))
def test_multislerp_matches_the_reference_at_any_block_size(seed, count, task_vectors, block_rows):
    base, models = family(seed, count)
    weights = [float(w) for w in np.random.default_rng(seed).uniform(0.1, 1.0, count)]
    merged = blockmerge.merge("multislerp", models, base=base if task_vectors else None, weights=weights,
                              task_vectors=task_vectors, block_size=block_rows * 10 * 4 * (count + 1))
    for name in SHAPES:
        expected = multislerp_reference(flat(models, name, base if task_vectors else None), weights)
        if task_vectors:
            expected = expected + base[name].double().numpy().ravel()
        np.testing.assert_allclose(merged[name].numpy().ravel(), expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_multislerp_of_two_opposite_directions_is_their_weighted_sum_and_of_three_an_error():
    x = {"w": torch.tensor([1.0, 2.0, -1.0])}
    merged = blockmerge.merge("multislerp", [x, {"w": -x["w"]}], weights=[0.5, 0.5])
    assert torch.allclose(merged["w"], torch.zeros(3), atol=1e-7)
    with pytest.raises(BlockmergeError, match="parameter 'w': multislerp: the weighted directions"):
        blockmerge.merge("multislerp", [x, {"w": -x["w"]}, {"w": 0 * x["w"]}], weights=[0.5, 0.5, 0.0])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(1, 4), spread=st.sampled_from([0.01, 0.5, 3.0]),
       block_rows=st.integers(1, 30))
def test_karcher_matches_the_reference_at_any_block_size(seed, count, spread, block_rows):
    base, models = family(seed, count, spread)
    merged = blockmerge.merge("karcher", models, block_size=block_rows * 10 * 4 * count)
    for name in [n for n, shape in SHAPES.items() if shape]:  # scalars: ±1 directions, antipodes have no mean
        expected = karcher_reference(flat(models, name))
        np.testing.assert_allclose(merged[name].numpy().ravel(), expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_karcher_of_one_direction_keeps_it_at_the_mean_norm_and_of_zeros_is_zero():
    x = torch.tensor([3.0, 4.0])
    merged = blockmerge.merge("karcher", [{"w": x}, {"w": 2 * x}, {"w": torch.zeros(2)}])
    assert torch.allclose(merged["w"], x * (5 + 10) / 3 / 5, atol=1e-6)
    assert torch.equal(blockmerge.merge("karcher", [{"w": torch.zeros(2)}] * 2)["w"], torch.zeros(2))
