"""Diagonal and blockwise Fisher information of a model over examples (docs/methods.md §5.5, §9, §16).

Diagonal Fisher (kind ``fisher``), one tensor per parameter, the parameter's shape::

    F = (1/N) Σ_n g_n ⊙ g_n,        g_n = ∇_θ log p(y_n | x_n)

Blockwise Fisher (kind ``blockwise_fisher``) for vectors ``v ∈ R^n`` (IA³ scalings), ``[n, n]``::

    F = (1/N) Σ_n g_n g_nᵀ

``log p(y|x)`` is :func:`blockmerge.stats.models.log_likelihood` (classification: log-softmax at the label;
seq2seq / causal LM: minus the mean target-token cross-entropy). Labels:

* ``empirical`` — the gold label / target (MaTS, REALISTIC default);
* ``sampled`` — one label drawn per example from the model (MaTS ``--use_true_fisher``, UBGM): a class from
  the softmax, or for generative models a sequence from ``generate(do_sample=True)``;
* ``exact`` — classification only: the expectation over classes, ``Σ_c p(c|x) (∇ log p(c|x))²`` (FISHER).

Per-example gradients come from ``torch.func.vmap`` over ``torch.func.grad`` of a ``functional_call``, so the
batch size is only a speed (and memory: B per-example gradients are live at once) choice: the result is the
batch-size-1 loop of MaTS. The input embedding matrix is differentiated through its looked-up rows, so an
example's gradient of it is ``[tokens, hidden]``, not ``[vocabulary, hidden]``. ``vectorize=False`` runs
that loop with plain autograd instead (least memory). The model is put in eval mode (restored afterwards) and
moved to ``device``; accumulators are float32. Parameters whose gradient does not exist (``grad is None``: not
used by the forward) get no Fisher, as in REALISTIC.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import BlockmergeError
from .models import (
    check_class_labels,
    check_label_mode,
    count_tokens,
    forward_names,
    functional_mode,
    log_likelihood,
    model_kind,
    prepare,
    sample_labels,
    to_device,
)

_DATA_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "decoder_input_ids",
              "decoder_attention_mask", "target_mask")


@dataclass
class Statistics:
    """Statistics of one model: ``tensors[kind][parameter name]`` float32 CPU tensors, and what they cover."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    examples: int = 0
    tokens: int = 0          # encoder / input tokens (attention mask) counted
    target_tokens: int = 0   # decoder / target tokens that entered the loss (0 for classification)
    labels: str = "empirical"
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # terms of each tensor's sum (see `mean`)


def mean(total: torch.Tensor, count: int) -> torch.Tensor:
    """The statistic a sum accumulator over ``count`` terms stands for (examples for a Fisher, unmasked rows for
    a Gram matrix), as a CPU tensor; shards' sums added together give the whole data's statistic."""
    return (total / max(count, 1)).cpu()


def select_parameters(model: nn.Module, parameters: str | None) -> dict[str, nn.Parameter]:
    """Trainable parameters (``requires_grad``) whose name fully matches the regex ``parameters`` (all if None)."""
    try:
        pattern = re.compile(parameters) if parameters is not None else None
    except re.error as e:
        raise BlockmergeError(f"bad parameters regex {parameters!r}: {e}") from e
    chosen = {n: p for n, p in model.named_parameters()
              if p.requires_grad and (pattern is None or pattern.fullmatch(n))}
    if not chosen:
        raise BlockmergeError(f"no trainable parameter matches {parameters!r}" if parameters is not None
                              else f"{type(model).__name__} has no trainable parameters")
    return chosen


def _example_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in _DATA_KEYS if k in batch}


class _EmbeddingGradient(NamedTuple):
    """Example b's gradient of an embedding matrix, kept per token: row ``ids[b, t]`` gets ``grads[b, t]``."""

    ids: torch.Tensor    # [B, L]
    grads: torch.Tensor  # [B, L, H], zero at the padding index
    vocab: int

    def weighted_squares(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, ``w_b G_b[row]²``) for every (example, row) present, ``G_b`` the example's dense gradient."""
        batch, _, hidden = self.grads.shape
        keys = (torch.arange(batch, device=self.ids.device)[:, None] * self.vocab + self.ids).reshape(-1)
        unique, inverse = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(len(unique), hidden, dtype=torch.float32, device=self.grads.device)
        sums.index_add_(0, inverse, self.grads.reshape(-1, hidden).float())
        return unique % self.vocab, sums.square_().mul_(weight[unique // self.vocab, None])


def _input_embedding(model: nn.Module, kind: str,
                     params: Mapping[str, torch.Tensor]) -> tuple[str, nn.Embedding] | None:
    """The selected input embedding when its per-example gradient can be kept per token: a plain
    ``nn.Embedding`` used once (not tied to the output layer, not a seq2seq model's shared table)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if kind != "seq2seq" and get is not None else None
    if (type(embedding) is not nn.Embedding or embedding.max_norm is not None or embedding.scale_grad_by_freq
            or "inputs_embeds" not in forward_names(model)):
        return None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is embedding.weight:
        return None
    name = next((n for n, p in model.named_parameters() if p is embedding.weight), None)
    return (name, embedding) if name in params else None


class _Gradients:
    """Per-example gradients of log p(y|x) for the selected parameters: vmap, or a batch-1 autograd loop.

    With ``per_token_embedding``, vmap differentiates w.r.t. the input embeddings instead of the embedding
    matrix, so an example's embedding gradient is kept per token (``[L, H]``), not as a dense ``[V, H]``.
    """

    def __init__(self, model: nn.Module, kind: str, params: dict[str, torch.Tensor], vectorize: bool,
                 per_token_embedding: bool):
        self.model, self.kind, self.params, self.vectorize = model, kind, params, vectorize
        self.embedding = _input_embedding(model, kind, params) if per_token_embedding else None

        def one(p: dict[str, torch.Tensor], example: dict[str, torch.Tensor],
                embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            batch = {k: v.unsqueeze(0) for k, v in example.items()}
            ll = log_likelihood(model, batch, kind, params=p,
                                inputs_embeds=None if embeds is None else embeds.unsqueeze(0))[0]
            return ll, ll.detach()

        self._vmapped = torch.func.vmap(torch.func.grad(one, has_aux=True), in_dims=(None, 0))
        self._vmapped_embedded = torch.func.vmap(torch.func.grad(one, argnums=(0, 2), has_aux=True),
                                                 in_dims=(None, 0, 0))

    def used(self, batch: Mapping[str, torch.Tensor]) -> set[str]:
        """Names of parameters that receive a gradient from the first example (``grad is not None``)."""
        params = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
        example = {k: v[:1] for k, v in _example_inputs(batch).items()}
        ll = log_likelihood(self.model, example, self.kind, params=params)[0]
        grads = torch.autograd.grad(ll, list(params.values()), allow_unused=True)
        return {n for n, g in zip(params, grads) if g is not None}

    def _loop(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        data = _example_inputs(batch)
        n = data["input_ids"].shape[0]
        params = {name: p.detach().requires_grad_(True) for name, p in self.params.items()}
        grads: dict[str, list[torch.Tensor]] = {name: [] for name in params}
        values = []
        for b in range(n):
            ll = log_likelihood(self.model, {k: v[b:b + 1] for k, v in data.items()}, self.kind, params=params)[0]
            gs = torch.autograd.grad(ll, list(params.values()), allow_unused=True)
            for (name, p), g in zip(params.items(), gs):
                grads[name].append(torch.zeros_like(p) if g is None else g)
            values.append(ll.detach())
        return {name: torch.stack(gs) for name, gs in grads.items()}, torch.stack(values)

    def _vectorized(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        data = _example_inputs(batch)
        if self.embedding is None:
            return self._vmapped(self.params, data)
        name, embedding = self.embedding
        ids = data["input_ids"]
        rest = {n: p for n, p in self.params.items() if n != name}
        embeds = torch.nn.functional.embedding(ids, self.params[name])
        (grads, per_token), ll = self._vmapped_embedded(rest, data, embeds)
        if embedding.padding_idx is not None:
            per_token = per_token.masked_fill((ids == embedding.padding_idx).unsqueeze(-1), 0.0)
        return {**grads, name: _EmbeddingGradient(ids, per_token, embedding.num_embeddings)}, ll

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        """(gradients ``{name: [B, *shape]}`` or an :class:`_EmbeddingGradient`, log-likelihoods ``[B]``)."""
        if self.vectorize:
            try:
                with torch.no_grad():  # parameters left out still require grad: no graph around the transform
                    return self._vectorized(batch)
            except RuntimeError as e:  # a model with data-dependent Python control flow cannot be vmapped
                if "vmap" not in str(e) and "functorch" not in str(e):
                    raise
                warnings.warn(f"{type(self.model).__name__} cannot be vectorized with torch.func.vmap "
                              f"({str(e).splitlines()[0][:200]}); computing per-example gradients one by one",
                              RuntimeWarning, stacklevel=3)
                self.vectorize = False
        return self._loop(batch)


def _weighted_square_sum(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_b w_b g_b², squaring the per-example gradients ``g`` in place."""
    return (weight @ g.reshape(g.shape[0], -1).square_()).reshape(g.shape[1:])


def _add(acc: dict[str, torch.Tensor], grads: Mapping[str, Any], weight: torch.Tensor,
         reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch: Mapping[str, torch.Tensor],
         note: str = "") -> None:
    """Add each parameter's reduced batch to its accumulator; a NaN/Inf names the parameter and the example
    (``reduce`` may overwrite the gradients with values that are finite where they were, e.g. their squares;
    a gradient whose square overflows float32 counts as non-finite)."""
    for name, a in acc.items():
        g, rows = grads[name], None
        if isinstance(g, _EmbeddingGradient):
            rows, partial = g.weighted_squares(weight)
            g = g.grads.float()
        else:
            g = g.float()
            partial = reduce(g, weight)
        if not bool(torch.isfinite(partial).all()):
            ok = torch.isfinite(g).reshape(g.shape[0], -1).all(1)
            if bool(ok.all()):
                raise BlockmergeError(f"the Fisher overflows float32{note}", param=name)
            b = int((~ok).nonzero()[0, 0])
            index = int(batch["index"][b]) if "index" in batch else b
            raise BlockmergeError(f"non-finite gradient of log p(y|x) at example {index}{note}", param=name)
        if rows is None:
            a += partial
        else:
            a.index_add_(0, rows, partial)


def _accumulate(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, params: dict[str, nn.Parameter],
                reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: Callable[[torch.Tensor], tuple],
                stat: str, labels: str, seed: int, device: str | torch.device, progress: bool,
                max_new_tokens: int, vectorize: bool, sums: bool) -> Statistics:
    kind = model_kind(model)
    check_label_mode(labels, kind)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    model.to(device)
    detached = {n: p.detach() for n, p in params.items()}
    grads_of = _Gradients(model, kind, detached, vectorize, per_token_embedding=stat == "fisher")
    acc: dict[str, torch.Tensor] = {}
    used: set[str] | None = None
    stats = Statistics(labels=labels)
    offset = 0
    from tqdm.auto import tqdm

    try:
        with functional_mode(model):
            for raw in tqdm(batches, desc=stat, unit="batch", disable=not progress):
                batch = to_device(raw, device)
                n = int(batch["input_ids"].shape[0])
                if kind == "classification" and labels == "empirical":
                    check_class_labels(model, batch, _num_classes(model, batch, kind))
                if labels == "sampled":
                    batch = sample_labels(model, batch, kind, seed=seed, max_new_tokens=max_new_tokens,
                                          offset=offset)
                batch = prepare(model, batch, kind)
                if used is None:
                    used = grads_of.used(batch)
                    acc = {name: torch.zeros(shape(p), dtype=torch.float32, device=device)
                           for name, p in detached.items() if name in used}
                if labels == "exact":
                    for c in range(_num_classes(model, batch, kind)):
                        batch_c = dict(batch, labels=torch.full_like(batch["labels"], c))
                        grads, ll = grads_of(batch_c)
                        _add(acc, grads, ll.float().exp(), reduce, batch, f" (class {c})")
                else:
                    grads, _ = grads_of(batch)
                    _add(acc, grads, torch.ones(n, dtype=torch.float32, device=device), reduce, batch)
                tokens, target_tokens = count_tokens(batch, kind)
                stats.examples += n
                stats.tokens += tokens
                stats.target_tokens += target_tokens
                offset += n
    finally:
        model.train(was_training)
    if stats.examples == 0:
        raise BlockmergeError("no examples: the batches are empty")
    stats.counts[stat] = dict.fromkeys(acc, stats.examples)
    stats.tensors[stat] = {name: a.cpu() if sums else mean(a, stats.examples) for name, a in acc.items()}
    return stats


def _num_classes(model: nn.Module, batch: Mapping[str, torch.Tensor], kind: str) -> int:
    n = getattr(getattr(model, "config", None), "num_labels", None)
    if n is None:  # pragma: no cover - every transformers config has num_labels
        raise BlockmergeError(f"{type(model).__name__}: config has no num_labels")
    return int(n)


def fisher(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, labels: str = "empirical",
           seed: int = 0, device: str | torch.device = "cpu", progress: bool = False, parameters: str | None = None,
           max_new_tokens: int = 64, vectorize: bool = True, sums: bool = False) -> Statistics:
    """Diagonal Fisher ``(1/N) Σ_n g_n²`` of every selected parameter (docs/methods.md §5.5; kind ``fisher``).

    ``batches`` are those of :func:`blockmerge.stats.data.batches`; ``labels`` is ``empirical``, ``sampled``
    (seeded per example by ``seed``; generative models sample at most ``max_new_tokens`` tokens) or ``exact``
    (classification only). ``parameters`` is a regex (full match) of the trainable parameters to include
    (default all). A NaN/Inf gradient raises :class:`BlockmergeError` naming the parameter and the example.
    With ``sums`` the tensors are the sums ``Σ_n g_n²`` (see :func:`mean` and ``Statistics.counts``).
    """
    params = select_parameters(model, parameters)
    return _accumulate(model, batches, params=params, reduce=_weighted_square_sum,
                       shape=lambda p: tuple(p.shape), stat="fisher", labels=labels, seed=seed, device=device,
                       progress=progress, max_new_tokens=max_new_tokens, vectorize=vectorize, sums=sums)


def blockwise_fisher(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, parameters: str,
                     labels: str = "empirical", seed: int = 0, device: str | torch.device = "cpu",
                     progress: bool = False, max_new_tokens: int = 64, vectorize: bool = True,
                     sums: bool = False) -> Statistics:
    """Blockwise Fisher ``(1/N) Σ_n g_n g_nᵀ`` ``[n, n]`` of each vector parameter matching the regex
    ``parameters`` (IA³ scalings; MaTS ``compute_blockwiseFisher``, docs/methods.md §5.5; kind ``blockwise_fisher``).

    Every matching parameter must be 1-D. Other arguments as :func:`fisher`.
    """
    params = select_parameters(model, parameters)
    for name, p in params.items():
        if p.dim() != 1:
            raise BlockmergeError(f"blockwise Fisher needs vectors; shape {list(p.shape)} matches {parameters!r}",
                                  param=name)
    return _accumulate(model, batches, params=params, reduce=lambda g, w: torch.einsum("bi,bj,b->ij", g, g, w),
                       shape=lambda p: (p.shape[0], p.shape[0]), stat="blockwise_fisher", labels=labels, seed=seed,
                       device=device, progress=progress, max_new_tokens=max_new_tokens, vectorize=vectorize,
                       sums=sums)
