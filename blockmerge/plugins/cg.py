"""Conjugate gradient for a symmetric positive semi-definite operator, with SciPy ≥ 1.12's rules (docs/methods.md §7.3).

Solves A x = b where `matvec(x) = A x` maps a tensor to one of the same shape; tensors of any shape
are vectors, their inner product the sum of elementwise products. As `scipy.sparse.linalg.cg` with
no preconditioner, `rtol=1e-5`, `atol=0`:

    ‖b‖ = 0                  → x = 0 (whatever x0), no iteration
    r = b − A x0             (b itself when x0 is all zeros)
    each iteration k = 0 .. maxiter − 1:
        stop if ‖r‖ < max(atol, rtol·‖b‖)
        ρ = r·r;  p = r (k = 0) else p = (ρ/ρ_prev)·p + r
        q = A p;  α = ρ / (p·q);  x += α p;  r −= α q

The residual is updated recursively, so the stopping test reads that r, as SciPy's does. Arithmetic
is in the tensors' dtype and on their device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops import thread_count_independent

RTOL = 1e-5


@dataclass(frozen=True)
class CGResult:
    """The solution; the iterations run; ‖b − A x0‖; and ‖b − A x‖ recomputed from the returned x
    (the true residual, not the recursive one the stopping test reads)."""

    x: torch.Tensor
    iterations: int
    initial_residual: float
    final_residual: float


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with thread_count_independent():
        return torch.dot(a.reshape(-1), b.reshape(-1))


def _norm(a: torch.Tensor) -> float:
    with thread_count_independent():
        return float(torch.linalg.vector_norm(a))


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       x0: torch.Tensor | None = None, maxiter: int | None = None, rtol: float = RTOL,
                       atol: float = 0.0) -> CGResult:
    """Solve A x = b from x0 (zeros if None) in at most `maxiter` iterations (10·b.numel() if None)."""
    x = torch.zeros_like(b) if x0 is None else x0.to(dtype=b.dtype, device=b.device, copy=True)
    maxiter = 10 * b.numel() if maxiter is None else maxiter
    b_norm = _norm(b)
    nonzero_start = bool(x.any())
    r = b - matvec(x) if nonzero_start else b.clone()
    initial_residual = _norm(r)
    if b_norm == 0:
        return CGResult(torch.zeros_like(b), 0, initial_residual, 0.0)
    tolerance = max(atol, rtol * b_norm)
    p = rho_prev = None
    iterations = 0
    for iteration in range(maxiter):
        if _norm(r) < tolerance:
            break
        rho = _dot(r, r)
        if iteration > 0:
            p = p.mul_(rho / rho_prev).add_(r)
        else:
            p = r.clone()
        q = matvec(p)
        alpha = rho / _dot(p, q)
        x.add_(alpha * p)
        r.sub_(alpha * q)
        rho_prev = rho
        iterations = iteration + 1
    return CGResult(x, iterations, initial_residual, _norm(b - matvec(x)))
