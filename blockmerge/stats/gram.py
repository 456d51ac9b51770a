"""Input and output-gradient Gram matrices of every ``nn.Linear`` (docs/methods.md §6.2, §7.5, §9, §16).

For a Linear module with weight ``W[out, in]``, stored under ``"<module name>.weight"``:

* ``gram_in``  ``[in, in]``:   ``G = Σ_{n,l} m_{n,l} x_{n,l} x_{n,l}ᵀ / Σ_{n,l} m_{n,l}`` — ``x`` the module's input
  (a forward hook on ``input[0]``, float32);
* ``gram_out`` ``[out, out]``: ``B = Σ_{n,l} m_{n,l} g_{n,l} g_{n,l}ᵀ / Σ_{n,l} m_{n,l}`` — ``g`` the gradient of
  ``log p(y_n|x_n)`` (minus the mean target-token loss of example n, :mod:`blockmerge.stats.models`) with
  respect to the module's output (a full backward hook on ``grad_output[0]``); not for the output
  embeddings (``lm_head``), as MaTS.

Masks (MaTS / REALISTIC): in a seq2seq model, modules on the encoder side use the input (encoder)
``attention_mask`` and all others the target (decoder) mask ``labels != -100``; in classification and causal
LM models every module uses the ``attention_mask``. Padding never enters. The encoder side is MaTS's
``.*encoder.*|.*decoder.*EncDecAttention.(k|v).*`` (T5's names, :data:`ENCODER_MODULES`) when
``encoder_modules`` is given as that regex; by default (None) it is found from the model whatever its naming:
the modules inside ``model.get_encoder()`` and those whose input is the encoder's output tensor (the
cross-attention keys and values) — for T5 the same modules as the regex. The normalizer is the number of
unmasked rows the module saw, i.e. the total unmasked tokens of its side; an input without a sequence axis
(``[B, in]``, e.g. a pooler or classifier head) contributes one row per example.

Only ``torch.nn.Linear`` modules are hooked (MaTS): transformers' ``Conv1D`` (GPT-2, weight ``[in, out]``)
gets no Gram, with a warning.

Each example is its own: ``Σ_n log p(y_n|x_n)`` is back-propagated once per batch, which gives every
example's output gradients exactly as a batch of one would (examples do not interact in eval mode).
With ``max_memory`` the accumulators are split into groups that fit, one pass over the data per group,
and ``spill(kind, name, tensor)`` receives each finished tensor.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BlockmergeError
from .fisher import Statistics, mean
from .models import (
    check_class_labels,
    check_label_mode,
    count_tokens,
    log_likelihood,
    logits,
    model_kind,
    prepare,
    sample_labels,
    target_mask,
    to_device,
)

ENCODER_MODULES = r".*encoder.*|.*decoder.*EncDecAttention.(k|v).*"

Spill = Callable[[str, str, torch.Tensor], None]


@dataclass
class _Unit:
    kind: str            # "gram_in" | "gram_out"
    name: str            # module name
    module: nn.Linear
    side: str | None     # "input" | "target"; None: found on the first forward
    size: int            # bytes of the float32 accumulator
    total: torch.Tensor | None = None
    rows: int = 0
    calls: int = 0

    @property
    def key(self) -> str:
        return f"{self.name}.weight"


def _rows(t: torch.Tensor, mask: torch.Tensor | None, unit: _Unit) -> torch.Tensor:
    """The unmasked rows ``[R, d]`` of a module input / output gradient, in float32."""
    t = t.detach()
    if t.dim() == 2:  # [B, d]: one row per example
        return t.float()
    if t.dim() == 3 and mask is not None:
        if tuple(t.shape[:2]) != tuple(mask.shape):
            raise BlockmergeError(f"{unit.kind}: module input/gradient of shape {list(t.shape)} does not match the "
                                  f"{unit.side} mask of shape {list(mask.shape)}; is encoder_modules right for "
                                  "this model?", param=unit.key)
        return t[mask.bool()].float()
    return t.reshape(-1, t.shape[-1]).float()


def _linear_units(model: nn.Module, kind: str, inputs: bool, outputs: bool, modules: str | None,
                  encoder_modules: str | None) -> list[_Unit]:
    try:
        select = re.compile(modules) if modules is not None else None
        encoder = re.compile(encoder_modules) if encoder_modules is not None else None
    except re.error as e:
        raise BlockmergeError(f"bad module regex: {e}") from e
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    units = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (select is not None and not select.fullmatch(name)):
            continue
        if kind != "seq2seq":
            side: str | None = "input"
        elif encoder is not None:
            side = "input" if encoder.fullmatch(name) else "target"
        else:
            side = None
        if inputs:
            units.append(_Unit("gram_in", name, module, side, 4 * module.in_features ** 2))
        if outputs and module is not head and name.split(".")[-1] != "lm_head":
            units.append(_Unit("gram_out", name, module, side, 4 * module.out_features ** 2))
    conv1d = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    if conv1d:
        warnings.warn(f"{len(conv1d)} transformers Conv1D modules (weight [in, out], e.g. {conv1d[0]}) get no Gram "
                      "matrix: only torch.nn.Linear is hooked", RuntimeWarning, stacklevel=3)
    if not units:
        raise BlockmergeError(f"{type(model).__name__} has no nn.Linear module to compute Gram matrices of"
                              + (f" matching {modules!r}" if modules is not None else ""))
    return units


def _groups(units: list[_Unit], max_memory: int | None) -> list[list[_Unit]]:
    if max_memory is None or sum(u.size for u in units) <= max_memory:
        return [units]
    groups: list[list[_Unit]] = [[]]
    used = 0
    for u in units:
        if groups[-1] and used + u.size > max_memory:
            groups.append([])
            used = 0
        groups[-1].append(u)
        used += u.size
    return groups


def gram(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, inputs: bool = True,
         outputs: bool = False, labels: str = "empirical", seed: int = 0, device: str | torch.device = "cpu",
         progress: bool = False, max_memory: int | None = None, spill: Spill | None = None,
         modules: str | None = None, encoder_modules: str | None = None,
         max_new_tokens: int = 64, sums: bool = False) -> Statistics:
    """``gram_in`` (``inputs``) and/or ``gram_out`` (``outputs``) of every ``nn.Linear`` (see the module docstring).

    ``labels`` (``empirical`` or ``sampled``, seeded per example by ``seed``) picks the targets that the
    output gradients — and the decoder inputs of a seq2seq model — are taken at. ``modules`` restricts to
    Linear modules whose name fully matches the regex; ``encoder_modules`` (a regex, e.g.
    :data:`ENCODER_MODULES`) fixes which modules of a seq2seq model use the encoder mask (default: found).
    ``max_memory`` (bytes) bounds the accumulators alive at
    once: the Linear layers are processed in groups that fit, one pass over the data per group (``batches``
    is then read once and kept, with any sampled labels). ``spill(kind, name, tensor)``, when given, receives
    every finished float32 CPU tensor, which is then dropped instead of returned in ``Statistics.tensors``.
    With ``sums`` the tensors are the sums over rows, not divided by their count (see
    :func:`blockmerge.stats.fisher.mean` and ``Statistics.counts``).
    """
    if not inputs and not outputs:
        raise BlockmergeError("gram: nothing to compute (inputs and outputs are both false)")
    if max_memory is not None and max_memory <= 0:
        raise BlockmergeError(f"max_memory must be positive, got {max_memory}")
    kind = model_kind(model)
    check_label_mode(labels, kind)
    if labels == "exact":
        raise BlockmergeError("Gram statistics take one label per example: labels must be 'empirical' or 'sampled'")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    model.to(device)
    units = _linear_units(model, kind, inputs, outputs, modules, encoder_modules)
    groups = _groups(units, max_memory)
    num_classes = int(getattr(model.config, "num_labels", 0) or 0) if kind == "classification" else 0

    def resolved() -> Iterator[dict[str, torch.Tensor]]:
        offset = 0
        for raw in batches:
            batch = to_device(raw, device)
            if kind == "classification" and outputs and labels == "empirical":
                check_class_labels(model, batch, num_classes)
            if labels == "sampled":
                batch = sample_labels(model, batch, kind, seed=seed, max_new_tokens=max_new_tokens, offset=offset)
            offset += int(batch["input_ids"].shape[0])
            yield prepare(model, batch, kind)

    data: Iterable[dict[str, torch.Tensor]] = resolved()
    if len(groups) > 1:
        data = list(data)
    stats = Statistics(labels=labels)
    from tqdm.auto import tqdm

    try:
        for number, group in enumerate(groups):
            first = number == 0
            desc = "gram" if len(groups) == 1 else f"gram {number + 1}/{len(groups)}"
            _run_pass(model, kind, group, tqdm(data, desc=desc, unit="batch", disable=not progress), stats, first)
            for u in group:
                if u.calls == 0:  # the module never ran: no statistic, like a parameter without gradient
                    continue
                stats.counts.setdefault(u.kind, {})[u.key] = u.rows
                tensor = u.total.cpu() if sums else mean(u.total, u.rows)
                u.total = None
                if spill is not None:
                    spill(u.kind, u.key, tensor)
                else:
                    stats.tensors.setdefault(u.kind, {})[u.key] = tensor
    finally:
        model.train(was_training)
    if stats.examples == 0:
        raise BlockmergeError("no examples: the batches are empty")
    return stats


def _run_pass(model: nn.Module, kind: str, group: list[_Unit], data: Iterable[dict[str, torch.Tensor]],
              stats: Statistics, count: bool) -> None:
    masks: dict[str, torch.Tensor | None] = {}
    active = False
    leaves: list[torch.Tensor] = []
    handles = []
    backward = any(u.kind == "gram_out" for u in group)

    def add(u: _Unit, t: torch.Tensor) -> None:
        if not active:  # a forward of the label sampler, not of this pass
            return
        rows = _rows(t, masks[u.side], u)
        if u.total is None:
            u.total = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device)
        u.total.addmm_(rows.T, rows)
        u.rows += rows.shape[0]
        u.calls += 1

    unresolved = kind == "seq2seq" and any(u.side is None for u in group)
    encoder = model.get_encoder() if unresolved and hasattr(model, "get_encoder") else None
    if unresolved and encoder is None:
        raise BlockmergeError(f"{type(model).__name__} has no get_encoder(): pass encoder_modules")
    in_encoder = {id(m) for m in encoder.modules()} if encoder is not None else set()
    encoder_out: list[torch.Tensor] = []

    def encoder_hook(module: nn.Module, args: tuple, output: object) -> None:
        if active:
            encoder_out[:] = [output[0]]

    def resolve(u: _Unit, module: nn.Module, x: torch.Tensor) -> None:
        if u.side is None and active:
            out = encoder_out[0] if encoder_out else None
            from_encoder = out is not None and (x is out or (x.data_ptr() == out.data_ptr() and x.shape == out.shape))
            u.side = "input" if id(module) in in_encoder or from_encoder else "target"

    def forward_hook(u: _Unit) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            resolve(u, module, args[0])
            add(u, args[0])
        return hook

    def side_hook(u: _Unit) -> Callable:
        return lambda module, args, output: resolve(u, module, args[0])

    def backward_hook(u: _Unit) -> Callable:
        return lambda module, grad_input, grad_output: add(u, grad_output[0])

    def leaf(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not active:
            return None
        output = output.detach().requires_grad_(True)  # a leaf: the backward reaches every Linear, no param grads
        leaves.append(output)
        return output

    try:
        for u in group:
            if u.kind == "gram_in":
                handles.append(u.module.register_forward_hook(forward_hook(u)))
            else:
                handles.append(u.module.register_full_backward_hook(backward_hook(u)))
                if u.side is None:
                    handles.append(u.module.register_forward_hook(side_hook(u)))
        if encoder is not None:
            handles.append(encoder.register_forward_hook(encoder_hook))
        if backward:
            handles += [m.register_forward_hook(leaf) for m in model.modules() if isinstance(m, nn.Embedding)]
        for batch in data:
            tmask = target_mask(batch, kind)
            masks["input"] = batch["attention_mask"]
            masks["target"] = tmask if tmask is not None else batch["attention_mask"]
            leaves.clear()
            encoder_out.clear()
            active = True
            if backward:
                with torch.enable_grad():
                    total = log_likelihood(model, batch, kind).sum()
                    if not leaves:
                        raise BlockmergeError(f"{type(model).__name__}: gram_out needs an nn.Embedding input layer")
                    torch.autograd.grad(total, leaves, allow_unused=True)
            else:
                with torch.no_grad():
                    logits(model, batch, kind)
            active = False
            if count:
                tokens, target_tokens = count_tokens(batch, kind)
                stats.examples += int(batch["input_ids"].shape[0])
                stats.tokens += tokens
                stats.target_tokens += target_tokens
    finally:
        for h in handles:
            h.remove()
        leaves.clear()
        encoder_out.clear()

