"""nuslerp against a plainly written reference (mergekit's formula in float64 numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blockmerge

SHAPES = {"model.layers.0.mlp.up_proj.weight": (30, 8), "model.layers.1.self_attn.q_proj.weight": (8, 8),
          "model.norm.weight": (8,)}


def slerp_vectors(v0: np.ndarray, v1: np.ndarray, t: float) -> np.ndarray:
    u0, u1 = v0 / max(np.linalg.norm(v0), 1e-7), v1 / max(np.linalg.norm(v1), 1e-7)
    omega = math.acos(float(np.clip(u0 @ u1, -1.0, 1.0)))
    if abs(math.sin(omega)) < 1e-8:
        return (1 - t) * v0 + t * v1
    return (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)


def reference(v0: np.ndarray, v1: np.ndarray, t: float, flatten: bool) -> np.ndarray:
    v0, v1 = v0.astype(np.float64), v1.astype(np.float64)
    if flatten or v0.ndim < 2:
        return slerp_vectors(v0.ravel(), v1.ravel(), t).reshape(v0.shape)
    rows = [slerp_vectors(a, b, t) for a, b in zip(v0.reshape(-1, v0.shape[-1]), v1.reshape(-1, v1.shape[-1]))]
    return np.stack(rows).reshape(v0.shape)


def family(seed: int) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    return base, [{n: t + 0.3 * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(2)]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), w=st.floats(0.1, 3.0), flatten=st.booleans(), task_vectors=st.booleans(),
       block_rows=st.integers(1, 40))
def test_nuslerp_matches_the_reference(seed, w, flatten, task_vectors, block_rows):
    base, models = family(seed)
    merged = blockmerge.merge("nuslerp", models, base=base if task_vectors else None, weights=[1.0, w],
                              flatten=flatten, task_vectors=task_vectors, block_size=block_rows * 8 * 4 * 3)
    t = w / (1.0 + w)
    for name, value in merged.items():
        a, b = models[0][name].numpy(), models[1][name].numpy()
        if task_vectors:
            origin = base[name].numpy().astype(np.float64)
            expected = origin + reference(a - origin, b - origin, t, flatten)
        else:
            expected = reference(a, b, t, flatten)
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_weights_summing_to_zero_take_the_midpoint_and_task_vectors_need_the_base():
    base, models = family(1)
    midpoint = blockmerge.merge("nuslerp", models, weights=[-0.5, 0.5])
    equal = blockmerge.merge("nuslerp", models)
    assert all(torch.equal(midpoint[n], equal[n]) for n in equal)
    with pytest.raises(blockmerge.BlockmergeError, match="nuslerp needs a base"):
        blockmerge.merge("nuslerp", models, task_vectors=True)
