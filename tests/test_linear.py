"""linear against a plainly written weighted sum, with per-model weights scheduled per tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import blockmerge
from blockmerge.errors import BlockmergeError

SHAPES = {"model.embed_tokens.weight": (12, 4), "model.layers.0.self_attn.q_proj.weight": (4, 4),
          "model.layers.0.mlp.up_proj.weight": (8, 4), "model.layers.1.self_attn.q_proj.weight": (4, 4),
          "model.layers.1.mlp.up_proj.weight": (8, 4), "model.norm.weight": (4,)}


def models(seed: int, count: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s, generator=g) for n, s in SHAPES.items()} for _ in range(count)]


def reference(tensors: list[np.ndarray], weights: list[float], normalize: bool) -> np.ndarray:
    total = sum(w * t.astype(np.float64) for w, t in zip(weights, tensors))
    return total / sum(weights) if normalize else total


@pytest.mark.parametrize("normalize", [True, False])
def test_per_model_weights_scheduled_by_filter_and_layer(normalize):
    ms = models(0)
    weights = [[{"filter": "self_attn", "value": 1.0}, {"value": 0.0}],  # model 0: attention only
               [{"filter": "mlp", "value": [1.0, 3.0]}, {"value": 0.5}],  # model 1: MLPs, more in layer 1
               0.25]
    merged = blockmerge.merge("linear", ms, weights=weights, normalize=normalize)
    expected_weights = {
        "model.embed_tokens.weight": [0.0, 0.5, 0.25], "model.norm.weight": [0.0, 0.5, 0.25],
        "model.layers.0.self_attn.q_proj.weight": [1.0, 0.5, 0.25],
        "model.layers.1.self_attn.q_proj.weight": [1.0, 0.5, 0.25],
        "model.layers.0.mlp.up_proj.weight": [0.0, 1.0, 0.25], "model.layers.1.mlp.up_proj.weight": [0.0, 3.0, 0.25]}
    for name, w in expected_weights.items():
        np.testing.assert_allclose(merged[name].numpy(), reference([m[name].numpy() for m in ms], w, normalize),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


def test_default_weights_are_the_average_and_bad_weights_are_refused():
    ms = models(1)
    merged, average = blockmerge.merge("linear", ms), blockmerge.merge("average", ms)
    for name in merged:
        torch.testing.assert_close(merged[name], average[name])
    with pytest.raises(BlockmergeError, match="weights has 2 entries for 3 models"):
        blockmerge.merge("linear", ms, weights=[1.0, 2.0])
    with pytest.raises(BlockmergeError, match="parameter '.*': linear: the weights sum to 0"):
        blockmerge.merge("linear", ms, weights=[1.0, -1.0, 0.0])
