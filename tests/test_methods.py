"""Each method against a plainly written numpy reference (docs/methods.md §1-4, §16), and properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_family
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blockmerge
from blockmerge.plugins.task_vectors import dropped_sum, keep_mask, masked_scale

FLOATS = ["embed.weight", "layer.0.attn.weight", "layer.0.norm", "layer.1.mlp.weight", "head.bias"]


def np_(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def test_average_uniform_and_weighted():
    base, models = make_family(4)
    out = blockmerge.merge("average", models)
    weighted = blockmerge.merge("average", models, weights=[1, 2, 3, 4])
    for n in FLOATS:
        ref = sum(np_(m[n]) for m in models) / 4
        np.testing.assert_allclose(out[n].double().numpy(), ref, rtol=1e-6, atol=1e-7)
        ref_w = sum(w * np_(m[n]) for w, m in zip([0.1, 0.2, 0.3, 0.4], models))
        np.testing.assert_allclose(weighted[n].double().numpy(), ref_w, rtol=1e-6, atol=1e-7)
    assert torch.equal(out["position_ids"], models[0]["position_ids"])


def test_task_arithmetic_is_a_sum_of_task_vectors():
    # docs/methods.md ta-1: λ = 0.4, 3 models.
    base, models = make_family(3)
    out = blockmerge.merge("task_arithmetic", models, base=base, scaling_factor=0.4)
    for n in FLOATS:
        ref = np_(base[n]) + 0.4 * sum(np_(m[n]) - np_(base[n]) for m in models)
        np.testing.assert_allclose(out[n].double().numpy(), ref, rtol=1e-6, atol=1e-6)


def test_dare_with_explicit_masks():
    # docs/methods.md dare-1: injected masks.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 4, generator=g)
    models = [base + torch.randn(5, 4, generator=g) for _ in range(3)]
    masks = [torch.rand(5, 4, generator=g) > 0.3 for _ in range(3)]
    for rescale in (True, False):
        factor = 0.7 / 0.7 if rescale else 0.7
        out = dropped_sum(models, base, masks, [factor] * 3).add_(base)
        ref = np_(base).copy()
        delta = np.zeros((5, 4))
        for m, k in zip(models, masks):
            for i in range(5):
                for j in range(4):
                    if k[i, j]:
                        delta[i, j] += float(m[i, j]) - float(base[i, j])
        ref += 0.7 * (delta / 0.7 if rescale else delta)
        np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-5, atol=1e-6)


def test_dare_drop_rate_one_gives_base_and_zero_gives_task_arithmetic():
    base, models = make_family(3)
    dropped = blockmerge.merge("dare", models, base=base, drop_rate=1.0)
    kept = blockmerge.merge("dare", models, base=base, drop_rate=0.0, scaling_factor=0.5)
    ta = blockmerge.merge("task_arithmetic", models, base=base, scaling_factor=0.5)
    for n in FLOATS:
        assert torch.equal(dropped[n], base[n])
        torch.testing.assert_close(kept[n], ta[n], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("drop_rate", [0.1, 0.5, 0.9])
def test_dare_mask_rate_and_independence(drop_rate):
    n = 200_000
    masks = [keep_mask(7, "w", t, 0, n, drop_rate) for t in range(2)]
    for m in masks:
        assert abs(m.float().mean().item() - (1 - drop_rate)) < 5 * np.sqrt(drop_rate * (1 - drop_rate) / n)
    both = (masks[0] & masks[1]).float().mean().item()
    assert abs(both - (1 - drop_rate) ** 2) < 0.01
    assert not torch.equal(keep_mask(8, "w", 0, 0, n, drop_rate), masks[0])
    assert not torch.equal(keep_mask(7, "v", 0, 0, n, drop_rate), masks[0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), max_size=64),
       st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_dare_masked_scale_is_the_scale_where_kept_and_zero_elsewhere(keep, scale):
    got = masked_scale(torch.tensor(keep, dtype=torch.bool), scale)
    assert got.dtype == torch.float32
    assert [float(x) for x in got] == [float(np.float32(scale)) if k else 0.0 for k in keep]


def test_dare_mask_is_keyed_by_element_index():
    full = keep_mask(3, "layer.w", 1, 0, 10_000, 0.5)
    for offset in (0, 1, 4097, 9_999):
        assert torch.equal(keep_mask(3, "layer.w", 1, offset, 10_000 - offset, 0.5), full[offset:])
    high = keep_mask(3, "x", 0, 2**33, 1000, 0.5)  # offsets past 32 bits stay well mixed
    assert 0.4 < high.float().mean().item() < 0.6


# --- TIES, written plainly after the official code (flattened model, kthvalue, dis-mean) ---

def ties_reference(base: dict, models: list[dict], names: list[str], density: float, scaling_factor: float,
                   trim: str = "global", majority: str = "global") -> dict[str, np.ndarray]:
    groups = [names] if trim == "global" else [[n] for n in names]
    trimmed = [dict() for _ in models]
    for group in groups:
        for t, m in enumerate(models):
            flat = np.concatenate([(m[n].float() - base[n].float()).numpy().ravel() for n in group])
            d = flat.size
            k = d - int(d * density)
            if k <= 0:
                thr = -np.inf
            else:
                thr = np.sort(np.abs(flat))[k - 1]  # k-th smallest, 1-indexed
            for n in group:
                tau = (m[n].float() - base[n].float()).numpy()
                trimmed[t][n] = np.where(np.abs(tau) >= thr, tau, 0.0).astype(np.float32)
    signs = {n: np.sign(sum(tr[n].astype(np.float64) for tr in trimmed)) for n in names}
    if majority == "global":
        total = sum(signs[n].sum() for n in names)
        fill = {n: 1.0 if total >= 0 else -1.0 for n in names}
    else:
        fill = {n: 1.0 if signs[n].sum() >= 0 else -1.0 for n in names}
    out = {}
    for n in names:
        gamma = np.where(signs[n] == 0, fill[n], signs[n])
        num = np.zeros_like(gamma)
        cnt = np.zeros_like(gamma)
        for tr in trimmed:
            keep = np.where(gamma > 0, tr[n] > 0, tr[n] < 0)
            num += np.where(keep, tr[n], 0.0)
            cnt += keep
        out[n] = base[n].double().numpy() + scaling_factor * num / np.maximum(cnt, 1)
    return out


def quantised_family(num_models: int, seed: int) -> tuple[dict, list[dict]]:
    """Weights and task vectors on a coarse grid: many magnitudes tie, and every sum is exact."""
    base, _ = make_family(num_models, seed=seed)
    base = {n: torch.round(t * 8) / 8 if t.is_floating_point() else t for n, t in base.items()}
    g = torch.Generator().manual_seed(seed + 100)
    models = []
    for _ in range(num_models):
        models.append({n: (t + 0.25 * torch.randint(-4, 5, t.shape, generator=g)).float() if t.is_floating_point()
                       else t for n, t in base.items()})
    return base, models


@pytest.mark.parametrize("trim,majority", [("global", "global"), ("block", "block"), ("global", "block")])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_reference(trim, majority, density):
    base, models = quantised_family(3, seed=2)
    out = blockmerge.merge("ties", models, base=base, density=density, scaling_factor=0.8, trim=trim,
                           majority_sign=majority, block_size=64)
    ref = ties_reference(base, models, FLOATS, density, 0.8, trim, majority)
    for n in FLOATS:
        np.testing.assert_allclose(out[n].double().numpy(), ref[n], rtol=1e-6, atol=1e-6, err_msg=n)


def test_ties_keeps_int_d_k_plus_one_and_ties():
    # One tensor, one model: d = 10, density 0.2 → k = 10 − 2 = 8, so the 8th smallest is the threshold
    # and int(d·K)+1 = 3 entries survive, plus every tie at the threshold.
    base = {"w": torch.zeros(10)}
    tau = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    out = blockmerge.merge("ties", [{"w": tau}], base=base, density=0.2)
    assert torch.count_nonzero(out["w"]) == 3
    tied = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.8, 0.8])
    out = blockmerge.merge("ties", [{"w": tied}], base=base, density=0.2)
    assert torch.count_nonzero(out["w"]) == 3
    tied = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 0.8, 0.8, 0.9])
    out = blockmerge.merge("ties", [{"w": tied}], base=base, density=0.2)
    assert torch.count_nonzero(out["w"]) == 4


def test_ties_zero_sign_uses_global_majority():
    # Coordinate 0 of `a` cancels exactly; the whole model is mostly negative, so it takes the negative entries.
    base = {"a": torch.zeros(2), "b": torch.zeros(4)}
    models = [{"a": torch.tensor([1.0, 1.0]), "b": torch.full((4,), -1.0)},
              {"a": torch.tensor([-1.0, 1.0]), "b": torch.full((4,), -1.0)}]
    out = blockmerge.merge("ties", models, base=base, density=1.0)
    assert out["a"][0].item() == -1.0
    out_block = blockmerge.merge("ties", models, base=base, density=1.0, majority_sign="block")
    assert out_block["a"][0].item() == 1.0


def test_ties_with_precomputed_trimmed_statistics():
    base, models = quantised_family(3, seed=5)
    ref_trimmed = [{n: torch.where(torch.rand(base[n].shape) > 0.5, m[n] - base[n], 0.0) for n in FLOATS}
                   for m in models]
    out = blockmerge.merge("ties", models, base=base, stats=[{"trimmed": t} for t in ref_trimmed],
                           density=0.9)  # density is not applied to given trimmed vectors
    signs = {n: np.sign(sum(np_(t[n]) for t in ref_trimmed)) for n in FLOATS}
    total = sum(s.sum() for s in signs.values())
    for n in FLOATS:
        gamma = np.where(signs[n] == 0, 1.0 if total >= 0 else -1.0, signs[n])
        num = sum(np.where((gamma > 0) & (np_(t[n]) > 0) | (gamma < 0) & (np_(t[n]) < 0), np_(t[n]), 0.0)
                  for t in ref_trimmed)
        cnt = sum(((gamma > 0) & (np_(t[n]) > 0) | (gamma < 0) & (np_(t[n]) < 0)).astype(float) for t in ref_trimmed)
        np.testing.assert_allclose(out[n].double().numpy(), np_(base[n]) + num / np.maximum(cnt, 1), atol=1e-6)


# --- properties ---

ALL = ["average", "task_arithmetic", "dare", "ties"]
shapes = st.dictionaries(st.sampled_from(["a", "b.weight", "c.bias", "d"]),
                         st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shapes, num_models=st.integers(1, 4), seed=st.integers(0, 1000), method=st.sampled_from(ALL),
       block_rows=st.integers(1, 9), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_block_size_does_not_change_the_bytes(shapes, num_models, seed, method, block_rows, dtype):
    base, models = make_family(num_models, dtype=dtype, seed=seed, shapes=shapes)
    whole = blockmerge.merge(method, models, base=base)
    row_bytes = 2 if dtype != torch.float32 else 4
    small = blockmerge.merge(method, models, base=base, block_size=block_rows * row_bytes)
    for n in whole:
        assert whole[n].dtype == small[n].dtype == dtype
        assert torch.equal(whole[n].view(-1).view(torch.uint8), small[n].view(-1).view(torch.uint8)), n


@settings(max_examples=25, deadline=None)
@given(shapes=shapes, num_models=st.integers(1, 5), seed=st.integers(0, 1000))
def test_copies_of_one_model_merge_to_it(shapes, num_models, seed):
    base, models = make_family(1, seed=seed, shapes=shapes)
    copies = [models[0]] * num_models
    for method, hp in [("average", {}), ("ties", {"density": 1.0}), ("dare", {"drop_rate": 0.0})]:
        hp = dict(hp, scaling_factor=1.0 / num_models) if method == "dare" else hp
        out = blockmerge.merge(method, copies, base=base if method != "average" else None, **hp)
        for n, t in models[0].items():
            torch.testing.assert_close(out[n], t, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(weights=st.lists(st.floats(0.01, 10), min_size=1, max_size=5), value=st.floats(-100, 100))
def test_weights_summing_to_one_keep_a_constant_model_constant(weights, value):
    models = [{"w": torch.full((3, 5), value)} for _ in weights]
    out = blockmerge.merge("average", models, weights=weights)
    torch.testing.assert_close(out["w"], torch.full((3, 5), value), rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 3000), st.integers(0, 2**31 - 1), st.sampled_from([torch.float32,
                                                                                          torch.float64]))
def test_row_sums_do_not_depend_on_the_rows_given(rows, width, seed, dtype):
    """Reduction passes add row sums over a tensor's blocks: a row's sum must be the same bits whichever rows come
    with it, and float64-accurate."""
    import math

    from blockmerge.plugins.ops import row_sums

    g = torch.Generator().manual_seed(seed)
    values = (torch.randn(rows, width, generator=g, dtype=torch.float64) * 10 ** torch.randint(-3, 4, (1,),
                                                                                               generator=g)).to(dtype)
    whole = row_sums(values)
    cut = int(torch.randint(0, rows + 1, (1,), generator=g))
    parts = torch.cat([row_sums(values[:cut]), row_sums(values[cut:])])
    assert whole.dtype == torch.float64 and torch.equal(whole, parts)
    assert torch.equal(whole[:1], row_sums(values[:1]))
    for r in range(rows):
        exact = math.fsum(values[r].double().tolist())
        assert abs(float(whole[r]) - exact) <= 1e-12 * max(1.0, math.fsum(abs(v) for v in values[r].double().tolist()))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 9), width=st.integers(0, 70) | st.sampled_from([8192, 8193, 20000]),
       count=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]))
def test_pair_products_are_float64_accurate_and_do_not_depend_on_the_rows_given(rows, width, count, seed, dtype):
    """Per row, v_k · v_j of every pair, accurate to float64 (each product is exact there), and the same bits
    whichever rows come with it (also past the length where BLAS would split a dot product across threads)."""
    import math

    from blockmerge.plugins.ops import gram_pairs, pair_products

    g = torch.Generator().manual_seed(seed)
    vectors = [torch.randn(rows, width, generator=g, dtype=torch.float64).to(dtype) for _ in range(count)]
    products = pair_products(vectors)
    assert products.dtype == torch.float64 and products.shape == (rows, count * (count + 1) // 2)
    for i, (k, j) in enumerate(gram_pairs(count)):
        for r in range(rows):
            terms = (vectors[k][r].double() * vectors[j][r].double()).tolist()
            scale = math.fsum(abs(t) for t in terms)
            assert abs(float(products[r, i]) - math.fsum(terms)) <= 1e-13 * max(scale, 1e-300)
    cut = int(torch.randint(0, rows + 1, (1,), generator=g))
    assert torch.equal(products, torch.cat([pair_products([v[:cut] for v in vectors]),
                                            pair_products([v[cut:] for v in vectors])]))
    if rows:
        assert torch.equal(products[rows - 1:], pair_products([v[rows - 1:] for v in vectors]))
