"""SLERP against a plainly written reference (mergekit's formula in float64 numpy), and its schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blockmerge
from blockmerge.errors import BlockmergeError


def reference(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation of two whole tensors, written out."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    unit_a = a64 / na if na > 1e-8 else a64
    unit_b = b64 / nb if nb > 1e-8 else b64
    d = float(np.sum(unit_a * unit_b))
    if abs(d) > 0.9995:
        return (1 - t) * a64 + t * b64
    omega = math.acos(d)
    return math.sin((1 - t) * omega) / math.sin(omega) * a64 + math.sin(t * omega) / math.sin(omega) * b64


SHAPES = {"model.embed_tokens.weight": (50, 8), "model.layers.0.mlp.up_proj.weight": (16, 8),
          "model.layers.1.self_attn.q_proj.weight": (8, 8), "model.layers.2.input_layernorm.weight": (8,),
          "lm_head.bias": ()}


def pair(seed: int, shapes=SHAPES) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(2)]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.floats(0.0, 1.0), block_rows=st.integers(1, 60))
def test_slerp_matches_the_reference_at_any_block_size(seed, t, block_rows):
    models = pair(seed)
    merged = blockmerge.merge("slerp", models, t=t, block_size=block_rows * 8 * 4 * 2)
    for name, value in merged.items():
        expected = reference(models[0][name].numpy(), models[1][name].numpy(), t)
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_ends_are_the_models_and_parallel_tensors_interpolate_linearly():
    a, b = pair(1)
    assert all(torch.equal(v, a[n]) for n, v in blockmerge.merge("slerp", [a, b], t=0.0).items())
    assert all(torch.equal(v, b[n]) for n, v in blockmerge.merge("slerp", [a, b], t=1.0).items())
    scaled = {n: 3.0 * v for n, v in a.items()}  # d = 1: linear
    for name, value in blockmerge.merge("slerp", [a, scaled], t=0.25).items():
        torch.testing.assert_close(value, 0.75 * a[name] + 0.25 * scaled[name])
    zero = {n: torch.zeros_like(v) for n, v in a.items()}  # ‖b‖ ≤ 1e-8: b is not normalised, d = 0
    for name, value in blockmerge.merge("slerp", [a, zero], t=0.5).items():
        torch.testing.assert_close(value, math.sin(math.pi / 4) * a[name], rtol=1e-6, atol=1e-7)


def test_a_gradient_and_filters_give_each_tensor_its_t():
    a, b = pair(2)
    schedule = [{"filter": "self_attn", "value": 0.9}, {"filter": "layernorm", "value": [0.2, 0.4]},
                {"value": [0.0, 1.0]}]
    merged = blockmerge.merge("slerp", [a, b], t=schedule)
    expected_t = {"model.embed_tokens.weight": 0.0,  # in no layer: the gradient's start
                  "model.layers.0.mlp.up_proj.weight": 0.0,  # layer 0 of 3
                  "model.layers.1.self_attn.q_proj.weight": 0.9,  # the first matching rule
                  "model.layers.2.input_layernorm.weight": 0.4,  # layer 2 of 3: the end of its gradient
                  "lm_head.bias": 0.0}
    for name, t in expected_t.items():
        np.testing.assert_allclose(merged[name].numpy(), reference(a[name].numpy(), b[name].numpy(), t),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    from_cli_text = blockmerge.merge("slerp", [a, b], t="0,1")
    middle = "model.layers.1.self_attn.q_proj.weight"  # layer 1 of 3: x = 0.5
    np.testing.assert_allclose(from_cli_text[middle].numpy(), reference(a[middle].numpy(), b[middle].numpy(), 0.5),
                               rtol=1e-5, atol=1e-6)


def test_slerp_refuses_other_model_counts_and_unmatched_tensors_before_reading():
    a, b = pair(3)
    with pytest.raises(BlockmergeError, match="slerp: merges exactly 2 models, got 3"):
        blockmerge.merge("slerp", [a, b, a])
    with pytest.raises(BlockmergeError, match="no rule of the schedule matches"):
        blockmerge.merge("slerp", [a, b], t=[{"filter": "mlp", "value": 0.5}])
