"""The `trimmed` statistic: a model's task vector trimmed to its global top-`density` magnitudes (docs/methods.md §4.3).

    τ̂ = τ where |τ| ≥ thr, else 0;   τ = θ − θ_0 over every float tensor; thr keeps int(d·K)+1 entries plus ties

Computed out of core through the engine: the same exact streaming threshold as TIES's global trim.
"""

from __future__ import annotations

import os
from typing import Any

from .. import __version__
from ..engine.job import Job, Layout, Summary
from ..engine.output import source_paths
from ..engine.plan import DEFAULT_BLOCK_BYTES
from ..engine.run import execute
from ..engine.sinks import parse_size
from ..engine.sources import open_checkpoint
from ..engine.tensors import TensorSpec
from ..errors import BlockmergeError
from ..plugins import Common, Method, Needs
from ..plugins.magnitude import TopDensity, band_passes, cut_task_vectors
from ..plugins.ties import Ties

TRIM = Method(name="trimmed", description="trimmed task vector", hyperparameters=Ties,
              merge=lambda block, hp, state: cut_task_vectors(block, hp.trim, state)[0],
              needs=lambda hp: Needs(base=True),
              passes=lambda hp, kinds: band_passes(lambda at: TopDensity(at.density), hp.trim, exact=False))


def trimmed(model: Any, base: Any, out: str | os.PathLike, *, density: float = 0.2, overwrite: bool = False,
            block_size: int | str = DEFAULT_BLOCK_BYTES, progress: bool = False) -> Summary:
    """Write the trimmed task vector of `model` against `base` to a statistics store at `out`."""
    try:
        hp = Ties(density=density)
    except ValueError as err:
        raise BlockmergeError(f"trimmed: {err}") from None
    ckpt, base_ckpt = open_checkpoint(model, "model"), open_checkpoint(base, "base")
    for name in sorted(set(ckpt.specs) | set(base_ckpt.specs)):
        a, b = ckpt.specs.get(name), base_ckpt.specs.get(name)
        if a is None or b is None or a.shape != b.shape:
            raise BlockmergeError("model and base do not match here", path=ckpt.label if a is None else base_ckpt.label,
                                  param=name)
    specs = {n: s for n, s in ckpt.specs.items() if s.floating}
    out_specs = {n: TensorSpec(s.shape, "float32") for n, s in specs.items()}
    job = Job(method=TRIM, hyperparameters=hp, common=Common(), models=[ckpt], base=base_ckpt,
              block_bytes=parse_size(block_size, "block_size"), progress=progress)
    layout = Layout(specs, out_specs, dict.fromkeys(specs, "merge"), dict.fromkeys(specs, ()), frozenset())
    metadata = {"statistic": "trimmed", "density": density, "model": ckpt.label, "base": base_ckpt.label,
                "blockmerge": __version__}
    summary, _ = execute(job, layout, out, out_format="store", overwrite=overwrite, kind="trimmed",
                         metadata={"statistics": metadata}, inputs=source_paths(model, base))
    return summary
