"""MaTS (Tam et al. 2024, "Merging by Matching Models in Task Parameter Subspaces", TMLR; docs/methods.md §7, §16).

Each merged tensor solves the linear system A x = b, A = Σ_t A_t and b = Σ_t A_t θ_t, with A_t the
symmetric PSD metric of model t that `objective` names; `alpha` scales off-diagonal entries of every
Gram and blockwise Fisher (G̃ = α G + (1 − α) diag(G)):

    average            A x = x,                      b = (1/T) Σ_t θ_t
    diagonal_fisher    A x = (Σ_t F_t) ⊙ x,          b = Σ_t F_t ⊙ θ_t        (`fisher`)
    regmean            A X = (Σ_t G̃_t) X,            b = Σ_t G̃_t W_tᵀ         (`gram_in`, X = Wᵀ)
    blockwise_fisher   A X = Σ_t G̃_t X B̃_t,         b = Σ_t G̃_t W_tᵀ B̃_t     (`gram_in`, `gram_out`: K-FAC)
                       A v = (Σ_t F̃_t) v,            b = Σ_t F̃_t v_t          (`blockwise_fisher` of a vector)

For a Linear weight W = Xᵀ the same system is solved in W's layout (A W = W Σ G̃_t, resp. Σ_t B̃_t W G̃_t):
it has the same iterates, transposed, and the same residual norms. Tensors without the statistic are
averaged by the engine; in `diagonal_fisher`, coordinates where Σ_t F_t = 0 keep x0. Under
`blockwise_fisher` a weight with `gram_in` but no `gram_out` is an error (statistics computed as MaTS
give `lm_head` no `gram_out`: exclude it, or merge it with another objective).

`solver=cg` runs conjugate gradient with SciPy ≥ 1.12's rules (stop once ‖r‖ < `rtol`·‖b‖, atol 0,
‖b‖ = 0 → 0; :mod:`blockmerge.plugins.cg`) for at most `num_iterations` iterations from x0 = `initialization`:
`task_arithmetic` θ_0 + `init_scaling_factor` · Σ_t (θ_t − θ_0), `average`, `base` θ_0, `zeros`, or any
checkpoint of the models' shapes (a path, `REV:PATH` or store: another merge, say), read block by block.
`solver=direct` solves the same system exactly: the explicit inverse with RegMean's singular fallback
(§6.1: a feature dead in every model gives 0) for every matrix objective, the K-FAC one through its
Kronecker form vec_row(B W G) = (B ⊗ G) vec_row(W). Arithmetic is in `solve_dtype`. Each tensor
reports the iterations, ‖b − A x0‖ and ‖b − A x‖ of the returned x.

Defaults (§16): objective `blockwise_fisher`, alpha 1.0, num_iterations 100, initialization
`task_arithmetic`, init_scaling_factor 0.3; `rtol` 1e-5 is SciPy's default, which the official code runs with
(a smaller one runs CG to the closed form of ill-conditioned systems).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import BlockmergeError
from .base import Block, Method, Needs, docstring_summary
from .cg import RTOL, conjugate_gradient
from .hyperparameters import InputCheckpoint
from .ops import average, inverse_with_fallback, reduce_off_diagonal, summed, task_arithmetic, thread_count_independent

DIRECT_KFAC_MAX_NUMEL = 4096  # solver=direct on K-FAC inverts a [numel, numel] matrix

Objective = Literal["average", "diagonal_fisher", "regmean", "blockwise_fisher"]
Initialization = Literal["task_arithmetic", "average", "base", "zeros"]
INITIALIZATIONS = typing.get_args(Initialization)

NEEDS: dict[str, Needs] = {
    "average": Needs(),
    "diagonal_fisher": Needs(statistics=("fisher",)),
    "regmean": Needs(statistics=("gram_in",)),
    "blockwise_fisher": Needs(one_of_statistics=("gram_in", "gram_out", "blockwise_fisher")),
}


@dataclass(frozen=True)
class Mats:
    objective: Objective = "blockwise_fisher"
    alpha: float = 1.0
    num_iterations: int = 100
    initialization: Initialization | InputCheckpoint = "task_arithmetic"
    init_scaling_factor: float = 0.3
    solver: Literal["cg", "direct"] = "cg"
    solve_dtype: Literal["float32", "float64"] = "float32"
    rtol: float = RTOL

    def __post_init__(self):
        if not self.rtol >= 0.0:
            raise ValueError(f"rtol must be non-negative, got {self.rtol}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.num_iterations < 0:
            raise ValueError(f"num_iterations must be non-negative, got {self.num_iterations}")


@dataclass
class System:
    """A x = b in a tensor's own layout, and its exact solution."""

    matvec: Callable[[torch.Tensor], torch.Tensor]
    b: torch.Tensor
    direct: Callable[[], torch.Tensor]
    keep_x0: torch.Tensor | None = None  # coordinates that keep x0 whatever the solver gives


def _reduced(grams: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    return grams if alpha == 1.0 else [reduce_off_diagonal(g, alpha) for g in grams]


def _matrix_system(models: list[torch.Tensor], metrics: list[torch.Tensor], right: bool) -> System:
    """A v = (Σ M_t) v for vectors (right=False), or A W = W Σ M_t for weights (right=True)."""
    total = summed(metrics)
    if right:
        b = summed([w @ m for w, m in zip(models, metrics)])
        return System(lambda w: w @ total, b, lambda: b @ inverse_with_fallback(total))
    b = summed([m @ v for v, m in zip(models, metrics)])
    return System(lambda v: total @ v, b, lambda: inverse_with_fallback(total) @ b)


def _kfac_system(models: list[torch.Tensor], grams_in: list[torch.Tensor], grams_out: list[torch.Tensor]) -> System:
    def matvec(w: torch.Tensor) -> torch.Tensor:
        return summed([o @ w @ i for i, o in zip(grams_in, grams_out)])

    b = summed([o @ w @ i for w, i, o in zip(models, grams_in, grams_out)])

    def direct() -> torch.Tensor:
        if b.numel() > DIRECT_KFAC_MAX_NUMEL:
            raise ValueError(f"solver=direct on the K-FAC objective inverts a [{b.numel()}, {b.numel()}] matrix "
                             f"(more than {DIRECT_KFAC_MAX_NUMEL} weights); use solver=cg")
        kronecker = summed([torch.kron(o, i) for i, o in zip(grams_in, grams_out)])
        return (inverse_with_fallback(kronecker) @ b.reshape(-1)).reshape(b.shape)

    return System(matvec, b, direct)


def _diagonal_system(models: list[torch.Tensor], fishers: list[torch.Tensor]) -> System:
    total = summed(fishers)
    b = summed([f * theta for f, theta in zip(fishers, models)])
    empty = total == 0
    return System(lambda x: total * x, b, lambda: b / torch.where(empty, 1.0, total), keep_x0=empty)


def system(objective: Objective, alpha: float, models: list[torch.Tensor],
           stats: dict[str, list[torch.Tensor]]) -> System:
    """The linear system of one whole tensor across models, with the statistics the objective reads."""
    if objective == "average":
        mean = average(models)
        return System(lambda x: x, mean, lambda: mean)
    if objective == "diagonal_fisher":
        return _diagonal_system(models, stats["fisher"])
    if objective == "regmean":
        return _matrix_system(models, _reduced(stats["gram_in"], alpha), right=True)
    if "blockwise_fisher" in stats:
        return _matrix_system(models, _reduced(stats["blockwise_fisher"], alpha), right=False)
    return _kfac_system(models, _reduced(stats["gram_in"], alpha), _reduced(stats["gram_out"], alpha))


def initial(hp: Mats, models: list[torch.Tensor], base: torch.Tensor | None,
            inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """x0 under `hp.initialization` (None: zeros); a checkpoint's tensor is in `inputs`."""
    if hp.initialization not in INITIALIZATIONS:
        return inputs["initialization"].to(models[0].dtype)
    if hp.initialization == "average":
        return average(models)
    if hp.initialization == "task_arithmetic":
        return task_arithmetic(models, base, hp.init_scaling_factor)
    if hp.initialization == "base":
        return base.clone()
    return None


def mats(block: Block, hp: Mats) -> tuple[torch.Tensor, dict]:
    """The merged tensor of a whole-tensor block, in the block's dtype, and its solver report."""
    dtype = torch.float64 if hp.solve_dtype == "float64" else torch.float32
    models = [m.to(dtype) for m in block.models]
    stats = {k: [s.to(dtype) for s in v] for k, v in block.stats.items()}
    problem = system(hp.objective, hp.alpha, models, stats)
    x0 = initial(hp, models, block.base.to(dtype) if block.base is not None else None, block.inputs)
    if hp.solver == "cg":
        result = conjugate_gradient(problem.matvec, problem.b, x0, maxiter=hp.num_iterations, rtol=hp.rtol)
        x, iterations = result.x, result.iterations
        initial_residual, final_residual = result.initial_residual, result.final_residual
    else:
        x, iterations = problem.direct(), 0
        start = problem.b if x0 is None else problem.b - problem.matvec(x0)
        initial_residual = float(torch.linalg.vector_norm(start))
        final_residual = float(torch.linalg.vector_norm(problem.b - problem.matvec(x)))
    if problem.keep_x0 is not None:  # A and b are 0 there: the residual does not change
        x = torch.where(problem.keep_x0, 0.0 if x0 is None else x0, x)
    report = {"iterations": iterations, "initial_residual": initial_residual, "final_residual": final_residual}
    return x.to(block.models[0].dtype), report


def _merge(block: Block, hp: Mats, state: Mapping[str, Any]) -> torch.Tensor:
    try:
        with thread_count_independent():  # MKL's small matrix products give other bits on other thread counts
            out, block.report = mats(block, hp)
    except ValueError as err:
        raise BlockmergeError(f"mats: {err}", param=block.name) from None
    return out


def _needs(hp: Mats) -> Needs:
    return dataclasses.replace(NEEDS[hp.objective], base=hp.initialization in ("task_arithmetic", "base"),
                               checkpoints=() if hp.initialization in INITIALIZATIONS else ("initialization",))


METHOD = Method(name="mats", description=docstring_summary(__doc__), hyperparameters=Mats, merge=_merge,
                needs=_needs, granularity="tensor", report_bytes=160)
