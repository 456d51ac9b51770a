"""TSV-M, Iso-C and Iso-CTS against plain numpy transcriptions of the official algorithms (exact SVD, float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blockmerge
from blockmerge.plugins.iso_c import isotropic_sum
from blockmerge.plugins.iso_cts import common_and_task_specific, subspace_sizes
from blockmerge.plugins.tsv_m import task_singular_vectors


def polar(a: np.ndarray) -> np.ndarray:
    p, _, q = np.linalg.svd(a, full_matrices=False)
    return p @ q


def tsv_m_reference(taus: list[np.ndarray]) -> np.ndarray:
    """k-wide buffers filled task by task with each task's top ⌊k/T⌋ components, zeros after them."""
    k = min(taus[0].shape)
    r = int(k * (1 / len(taus)))
    sum_u, sum_s, sum_v = np.zeros((taus[0].shape[0], k)), np.zeros(k), np.zeros((k, taus[0].shape[1]))
    for i, tau in enumerate(taus):
        u, s, vh = np.linalg.svd(tau, full_matrices=False)
        sum_u[:, i * r:(i + 1) * r], sum_s[i * r:(i + 1) * r], sum_v[i * r:(i + 1) * r] = u[:, :r], s[:r], vh[:r]
    return polar(sum_u) @ np.diag(sum_s) @ polar(sum_v)


def iso_c_reference(taus: list[np.ndarray]) -> np.ndarray:
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    return u @ np.diag(np.full_like(s, s.mean())) @ vh


def iso_cts_reference(taus: list[np.ndarray], fraction: float) -> np.ndarray:
    k, t = min(taus[0].shape), len(taus)
    c = int(k * fraction)
    c = k - round((k - c) / t) * t
    n = int((k - c) / t)
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    uc, sc, vc = u[:, :c], s[:c], vh[:c]
    cu, cs, cv = np.zeros((taus[0].shape[0], k)), np.zeros(k), np.zeros((k, taus[0].shape[1]))
    for i, tau in enumerate(taus):
        tu, ts, tvh = np.linalg.svd(tau - uc @ uc.T @ tau, full_matrices=False)
        cu[:, i * n:(i + 1) * n], cs[i * n:(i + 1) * n], cv[i * n:(i + 1) * n] = tu[:, :n], ts[:n], tvh[:n]
    cu[:, t * n:t * n + c], cs[t * n:t * n + c], cv[t * n:t * n + c] = uc, sc, vc
    return polar(cu) @ np.diag(np.full(k, cs.mean())) @ polar(cv)


def task_matrices(seed: int, shape: tuple[int, int], count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count)]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 12), columns=st.integers(1, 12), count=st.integers(1, 5),
       fraction=st.sampled_from([0.5, 0.8, 0.9, 1.0]))
def test_kernels_equal_the_official_algorithms(seed, rows, columns, count, fraction):
    taus = task_matrices(seed, (rows, columns), count)
    plain = [t.numpy() for t in taus]
    np.testing.assert_allclose(task_singular_vectors(taus).numpy(), tsv_m_reference(plain), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(isotropic_sum(taus).numpy(), iso_c_reference(plain), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(common_and_task_specific(taus, fraction).numpy(), iso_cts_reference(plain, fraction),
                               rtol=1e-9, atol=1e-9)


def test_subspace_sizes_fill_the_rank():
    assert subspace_sizes(768, 8, 0.8) == (616, 19)  # ⌊614.4⌋ = 614, round(154 / 8) = 19
    assert subspace_sizes(10, 4, 0.8) == (10, 0)  # round(0.5) = 0: only the common subspace
    assert subspace_sizes(3, 2, 0.0) == (1, 1)  # the task subspaces never outgrow the rank


def test_tsv_m_keeps_each_tasks_top_components_when_they_are_orthogonal():
    """Task matrices with orthogonal singular vectors need no decorrelation: TSV-M is the sum of their top-r parts."""
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    taus = [q[:, 2 * t:2 * t + 2] @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ q[:, 2 * t:2 * t + 2].T
            for t in range(4)]
    torch.testing.assert_close(task_singular_vectors(taus), sum(taus), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method, options, reference", [
    ("tsv_m", {"scaling_factor": 0.7}, lambda taus: tsv_m_reference(taus)),
    ("iso_c", {"scaling_factor": 1.3}, lambda taus: iso_c_reference(taus)),
    ("iso_cts", {"scaling_factor": 0.9, "common_space_fraction": 0.5},
     lambda taus: iso_cts_reference(taus, 0.5)),
])
def test_a_merge_adds_the_scaled_update_to_matrices_and_averages_the_rest(method, options, reference):
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(9, 6, generator=g), "b": torch.randn(6, generator=g), "s": torch.tensor(2.0)}
    models = [{n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(3)]
    merged = blockmerge.merge(method, models, base=base, compute_dtype="float64", **options)
    taus = [(m["w"] - base["w"]).double().numpy() for m in models]
    expected = base["w"].double().numpy() + options["scaling_factor"] * reference(taus)
    np.testing.assert_allclose(merged["w"].double().numpy(), expected, rtol=1e-6, atol=1e-6)
    for name in ("b", "s"):
        mean = sum(m[name].double() - base[name].double() for m in models) / 3
        torch.testing.assert_close(merged[name].double(), base[name].double() + options["scaling_factor"] * mean,
                                   rtol=1e-6, atol=1e-6)
