"""RAM, RAM+ (tensor-local) and SCE against plainly written references of mergekit's formulas."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import blockmerge

SHAPES = {"model.layers.0.mlp.up_proj.weight": (24, 10), "model.norm.weight": (10,), "lm_head.bias": ()}


def family(seed: int, count: int) -> tuple[dict, list[dict]]:
    """Task vectors that are zero on about half the entries of each model, so entries are changed by 0 to 3 models."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    models = [{n: base[n] + torch.randn(base[n].shape, generator=g) * (torch.rand(base[n].shape, generator=g) < 0.5)
               for n in base} for _ in range(count)]
    return base, models


def ram_reference(base: np.ndarray, taus: list[np.ndarray], epsilon: float, r: float, alpha: float) -> np.ndarray:
    active = [np.abs(t) > epsilon for t in taus]
    count = sum(a.astype(int) for a in active)
    boosts = []
    for a in active:
        shared, unique = int((a & (count > 1)).sum()), int((a & (count == 1)).sum())
        boosts.append(1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha))
    out = base.astype(np.float64).ravel().copy()
    for j in range(out.size):
        changed = [i for i, a in enumerate(active) if a.ravel()[j]]
        if len(changed) == 1:
            out[j] += boosts[changed[0]] * taus[changed[0]].ravel()[j]
        elif changed:
            out[j] += sum(taus[i].ravel()[j] for i in changed) / len(changed)
    return out.reshape(base.shape)


@pytest.mark.parametrize("r,alpha", [(0.0, 0.2), (0.1, 0.2), (0.5, 3.0)])
@pytest.mark.parametrize("count", [1, 3])
def test_ram_matches_the_reference(r, alpha, count):
    base, models = family(count, count)
    merged = blockmerge.merge("ram", models, base=base, r=r, alpha=alpha, block_size=300)
    for name in SHAPES:
        taus = [(m[name] - base[name]).double().numpy() for m in models]
        expected = ram_reference(base[name].numpy(), taus, 1e-5, r, alpha)
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-6, atol=1e-6, err_msg=name)


def sce_reference(base: np.ndarray, taus: list[np.ndarray], topk: float) -> np.ndarray:
    """mergekit's SCE on whole tensors; the top-k by variance keeps equal variances in index order."""
    stacked = np.stack(taus)
    if topk < 1:
        variance = stacked.astype(np.float32).var(axis=0).ravel()
        k = int(np.count_nonzero(variance) * topk) if topk > 0 else 0
        order = np.lexsort((np.arange(variance.size), variance))
        keep = np.zeros(variance.size, dtype=bool)
        if k:
            keep[order[-k:]] = True
        stacked = stacked * keep.reshape(base.shape)
    means = (stacked.reshape(len(taus), -1) ** 2).mean(axis=1)
    weights = np.full(len(taus), 1 / len(taus)) if abs(means.sum()) < 1e-6 else means / means.sum()
    elected = np.where(stacked.sum(axis=0) >= 0, 1.0, -1.0)
    agree = (np.sign(stacked) == elected) * weights.reshape(-1, *[1] * base.ndim)
    return base + (stacked * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("count", [1, 3])
def test_sce_matches_the_reference(topk, count):
    base, models = family(10 + count, count)
    merged = blockmerge.merge("sce", models, base=base, select_topk=topk, block_size=300)
    for name in SHAPES:
        taus = [(m[name] - base[name]).numpy().astype(np.float64) for m in models]
        expected = sce_reference(base[name].numpy().astype(np.float64), taus, topk)
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)


def arcee_fusion_reference(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """mergekit's formula on the whole tensor, quantiles by a full sort."""
    if base.dim() == 0:
        return model
    p = torch.softmax(model, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = (model - base).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    ordered = torch.sort(importance.reshape(-1)).values
    q1, median, q3 = (ordered[int(f * (ordered.numel() - 1))] for f in (0.25, 0.5, 0.75))
    return base + (model - base) * (importance >= median + 1.5 * (q3 - q1))


def test_arcee_fusion_matches_the_reference_and_keeps_few_changes():
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(40, 16, generator=g), "v": torch.randn(30, generator=g), "s": torch.randn((), generator=g)}
    model = {n: t + 0.3 * torch.randn(t.shape, generator=g) ** 3 for n, t in base.items()}
    merged = blockmerge.merge("arcee_fusion", [model], base=base, block_size=16 * 4 * 2 * 3)
    for name in base:
        torch.testing.assert_close(merged[name], arcee_fusion_reference(base[name], model[name]), rtol=0, atol=0)
    kept = (merged["w"] != base["w"]).float().mean()
    assert 0 < kept < 0.3


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1), st.sampled_from([1e-4, 1.0, 1e4]))
def test_sce_variance_has_torch_var_bits(count, seed, scale):
    """SCE's selection compares variances bit for bit with mergekit's torch.var: the fast form must give its bits."""
    from blockmerge.plugins.sce import variance_bits

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4096, generator=g)
    models = [base + torch.randn(4096, generator=g) * scale * float(torch.rand(1, generator=g)) for _ in range(count)]
    expected = torch.var(torch.stack([m - base for m in models]), dim=0, unbiased=False)
    assert torch.equal(variance_bits(models, base)[0], expected.view(torch.int32))
