"""Tensor arithmetic that several methods share: sums, means, task vectors, Gram reductions and inverses."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch

DOT_CHUNK = 8192  # OpenBLAS splits longer dot products across its threads, and their sums with the thread count


def summed(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ of same-shaped tensors, in a new tensor."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total += t
    return total


@contextlib.contextmanager
def thread_count_independent() -> Iterator[None]:
    """Torch runs this thread's operations on one thread inside: reductions (sums, dot products) and LAPACK
    factorizations split their work by the thread count, so their multi-threaded bits depend on the machine."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def average(models: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
    """The weighted mean of same-shaped tensors; uniform weights when none are given."""
    if weights is None:
        weights = [1.0] * len(models)
    return weighted_sum(models, weights, sum(weights))


def weighted_sum(models: list[torch.Tensor], weights: list[float], divisor: float = 1.0) -> torch.Tensor:
    """Σ_t (w_t / divisor) θ_t, in a new tensor."""
    out = models[0] * (weights[0] / divisor)
    for w, m in zip(weights[1:], models[1:]):
        out.add_(m, alpha=w / divisor)
    return out


def task_vector_sum(models: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Σ_t (θ_t − θ_0), summed in model order."""
    out = models[0] - base
    for m in models[1:]:
        out += m - base
    return out


def task_arithmetic(models: list[torch.Tensor], base: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """θ_0 + λ Σ_t (θ_t − θ_0)."""
    return base + task_vector_sum(models, base) * scaling_factor


def reduce_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α G + (1 − α) diag(G): off-diagonal entries times α, the diagonal exactly as in G."""
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def inverse_with_fallback(matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of a sum of Grams; for a singular one (a 0 on its diagonal, or no finite inverse), the inverse
    of the sub-matrix of indices whose row sum and diagonal entry are not 0, written into a copy of the matrix
    (docs/methods.md §6.1). Raises ValueError if that is singular too. The same bits on any number of threads."""
    with thread_count_independent():
        return _inverse_with_fallback(matrix)


def _inverse_with_fallback(matrix: torch.Tensor) -> torch.Tensor:
    # A Gram's row and column vanish with its diagonal entry: rounding can leave tiny entries beside a 0 there,
    # which would make the matrix look invertible.
    diagonal = matrix.diagonal() != 0
    if bool(diagonal.all()):
        inverse, info = torch.linalg.inv_ex(matrix)
        if int(info) == 0 and bool(torch.isfinite(inverse).all()):
            return inverse
    keep = (matrix.sum(dim=1) != 0) & diagonal
    if not torch.equal(keep, (matrix.sum(dim=0) != 0) & diagonal):
        raise ValueError("the summed Gram matrix is singular and its zero row sums and column sums differ")
    index = keep.nonzero().flatten()
    sub_inverse, info = torch.linalg.inv_ex(matrix[index][:, index])
    if int(info) != 0:
        raise ValueError(f"the summed Gram matrix is singular, also without its {int((~keep).sum())} "
                         "zero rows")
    out = matrix.clone()
    out[index[:, None], index] = sub_inverse
    out[~diagonal] = 0
    out[:, ~diagonal] = 0
    return out


def row_sums(values: torch.Tensor) -> torch.Tensor:
    """Σ_j values[i, j] for each row i (first axis) in float64.

    The sum of a row depends only on that row's entries, never on how many rows are given (with
    `math.fsum` over rows, a tensor's total does not depend on how it is cut into blocks): on the CPU numpy
    sums each row on its own (pairwise, in a fixed order), elsewhere a fixed pairwise tree does.
    """
    rows = values.shape[0] if values.dim() else 1
    width = math.prod(values.shape[1:]) if values.dim() else 1
    if rows == 0 or width == 0:
        return torch.zeros(rows, dtype=torch.float64, device=values.device)
    terms = values.reshape(rows, width).to(torch.float64)
    if terms.device.type == "cpu":
        return torch.from_numpy(np.add.reduce(terms.contiguous().numpy(), axis=1))
    size = 1 << (width - 1).bit_length()
    if size != width:
        terms = torch.nn.functional.pad(terms, (0, size - width))
    while terms.shape[1] > 1:
        half = terms.shape[1] // 2
        terms = terms[:, :half] + terms[:, half:]
    return terms[:, 0]


def gram_pairs(count: int) -> list[tuple[int, int]]:
    """The pairs (k, j), k ≤ j, of `count` vectors, in the order `pair_products` gives their products."""
    return [(k, j) for k in range(count) for j in range(k, count)]


def pair_products(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Per row (first axis): v_k · v_j of every pair k ≤ j (`gram_pairs` order) in float64, [rows, pairs] on the CPU;
    with `tensor_pass`, their exact totals over a tensor. A row's products depend only on that row's entries."""
    if vectors[0].device.type != "cpu":
        wide = [v.to(torch.float64) for v in vectors]
        return torch.stack([row_sums(wide[k] * wide[j]) for k, j in gram_pairs(len(wide))], dim=1).cpu()
    rows = vectors[0].shape[0] if vectors[0].dim() else 1
    width = math.prod(vectors[0].shape[1:]) if vectors[0].dim() else 1
    wide = [v.reshape(rows, width).to(torch.float64).numpy() for v in vectors]
    return torch.from_numpy(np.stack([row_dots(wide[k], wide[j]) for k, j in gram_pairs(len(wide))], axis=1))


def row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Σ_j a[i, j] b[i, j] for each row i of two [rows, width] float64 arrays, each row in an order set by the width
    alone: BLAS dot products of at most `DOT_CHUNK` entries, their results summed pairwise."""
    rows, width = a.shape
    whole = width - width % DOT_CHUNK
    if whole == 0:
        return np.vecdot(a, b)
    count = whole // DOT_CHUNK
    chunks = np.vecdot(a[:, :whole].reshape(rows, count, DOT_CHUNK), b[:, :whole].reshape(rows, count, DOT_CHUNK))
    if whole < width:
        chunks = np.concatenate([chunks, np.vecdot(a[:, whole:], b[:, whole:])[:, None]], axis=1)
    return np.add.reduce(chunks, axis=1)


def gram_matrix(sums: list[float]) -> np.ndarray:
    """The symmetric Gram matrix (float64) of the vectors whose pair products (`gram_pairs` order) are `sums`."""
    count = math.isqrt(8 * len(sums) + 1) // 2  # len(sums) = count (count + 1) / 2
    gram = np.empty((count, count))
    for (k, j), value in zip(gram_pairs(count), sums):
        gram[k, j] = gram[j, k] = value
    return gram

