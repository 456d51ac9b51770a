"""Model kinds, per-example log-likelihoods and label sampling for statistics (docs/methods.md §5.5, §9).

``log p(y|x)`` of one example (docs/methods.md §9):

* classification: ``log_softmax(logits)[y]``;
* seq2seq and causal LM: minus the mean over the target tokens of the token cross-entropy,
  ``−Σ_l m_l CE(logits_l, y_l) / Σ_l m_l`` (MaTS/REALISTIC ``EncoderDecoderWrapper``; the model's own
  ``labels`` loss is not used). For a causal LM the logits at position ``l`` predict token ``l + 1``
  and only target tokens (the ``target_mask`` of :func:`blockmerge.stats.data.batches`) count.

Logits are cast to float32 before the softmax. Every function takes batches of examples and treats each
example on its own, so the result of an example never depends on the others in its batch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import BlockmergeError

LABEL_MODES = ("empirical", "sampled", "exact")
# keys of a batch that are model inputs, per kind (token_type_ids only where forward names it)
_INPUTS = {
    "classification": ("input_ids", "attention_mask", "token_type_ids"),
    "seq2seq": ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"),
    "causal_lm": ("input_ids", "attention_mask"),
}


def model_kind(model: nn.Module) -> str:
    """``classification``, ``seq2seq`` or ``causal_lm``, from the transformers class and config."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if name.endswith("ForSequenceClassification"):
        return "classification"
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        )
    except ImportError:  # pragma: no cover - very old transformers
        seq_cls, seq2seq, causal = set(), set(), set()
    else:
        seq_cls = set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())
        seq2seq = set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values())
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if name in seq_cls:
        return "classification"
    if name in seq2seq or name.endswith(("ForConditionalGeneration", "Seq2SeqLM")) or (
            config is not None and getattr(config, "is_encoder_decoder", False)):
        return "seq2seq"
    if name in causal or name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    raise BlockmergeError(f"cannot tell the kind of model {name}: expected a transformers *ForSequenceClassification, "
                          "*ForConditionalGeneration / Seq2SeqLM or *ForCausalLM / *LMHeadModel")


def check_label_mode(labels: str, kind: str) -> None:
    if labels not in LABEL_MODES:
        raise BlockmergeError(f"unknown label mode {labels!r} (expected one of {list(LABEL_MODES)})")
    if labels == "exact" and kind != "classification":
        raise BlockmergeError(f"labels='exact' (expectation over classes) needs a classification model, not {kind}")


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def prepare(model: nn.Module, batch: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Add what the forward needs beyond the data: seq2seq ``decoder_input_ids`` (labels shifted right) and
    ``decoder_attention_mask`` (the target mask, as MaTS passes it)."""
    batch = dict(batch)
    if kind == "seq2seq":
        labels = batch["labels"]
        batch["decoder_attention_mask"] = (labels != -100).long()
        if "decoder_input_ids" not in batch:
            if hasattr(model, "prepare_decoder_input_ids_from_labels"):
                batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
            else:
                from transformers.models.bart.modeling_bart import shift_tokens_right

                cfg = model.config
                start = cfg.decoder_start_token_id
                if start is None:
                    raise BlockmergeError(f"{type(model).__name__}: config has no decoder_start_token_id")
                batch["decoder_input_ids"] = shift_tokens_right(labels, cfg.pad_token_id or 0, start)
    return batch


def model_class(path: str | os.PathLike, what: str = "model directory") -> tuple[Any, Any]:
    """(the `transformers` class that ``path/config.json`` names, that config), never from the hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise BlockmergeError(f"not a {what} ({str(err).splitlines()[0]})", path=path) from None
    architecture = (config.architectures or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    if cls is None:
        raise BlockmergeError(f"config names no known transformers architecture ({architecture!r})", path=path)
    return cls, config


def forward_names(model: nn.Module) -> set[str]:
    """Argument names of ``model.forward``."""
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return set()


def model_inputs(model: nn.Module, batch: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The batch entries passed to ``model.forward``."""
    names = forward_names(model)
    out = {}
    for key in _INPUTS[kind]:
        if key in batch and (key != "token_type_ids" or key in names):
            out[key] = batch[key]
    return out


def logits(model: nn.Module, batch: Mapping[str, torch.Tensor], kind: str,
           params: Mapping[str, torch.Tensor] | None = None,
           inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits for a prepared batch; with ``params``, a ``torch.func.functional_call``;
    with ``inputs_embeds``, those replace the input embeddings of ``input_ids``."""
    inputs = model_inputs(model, batch, kind)
    if inputs_embeds is not None:
        del inputs["input_ids"]
        inputs["inputs_embeds"] = inputs_embeds
    if params is None:
        out = model(**inputs, use_cache=False) if kind != "classification" else model(**inputs)
    else:
        kwargs = dict(inputs, use_cache=False) if kind != "classification" else inputs
        out = torch.func.functional_call(model, dict(params), (), kwargs)
    return out.logits if hasattr(out, "logits") else out[0]


def example_log_likelihood(logits: torch.Tensor, batch: Mapping[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Per-example ``log p(y|x)`` ``[B]`` from the logits (cast to float32) and the batch's labels/targets."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if kind == "classification":
        return logp.gather(-1, batch["labels"].long().unsqueeze(-1)).squeeze(-1)
    if kind == "seq2seq":
        targets = batch["labels"].long()
        mask = targets != -100
    elif kind == "causal_lm":
        logp = logp[:, :-1]
        targets = batch["input_ids"][:, 1:].long()
        mask = batch["target_mask"][:, 1:].bool()
    else:
        raise BlockmergeError(f"unknown model kind {kind!r}")
    token = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = mask.to(token.dtype)
    return (token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def log_likelihood(model: nn.Module, batch: Mapping[str, torch.Tensor], kind: str,
                   params: Mapping[str, torch.Tensor] | None = None,
                   inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example ``log p(y|x)`` ``[B]`` of a prepared batch (see the module docstring)."""
    return example_log_likelihood(logits(model, batch, kind, params, inputs_embeds), batch, kind)


def target_mask(batch: Mapping[str, torch.Tensor], kind: str) -> torch.Tensor | None:
    """The decoder-side token mask: seq2seq ``labels != -100``; None for other kinds."""
    if kind == "seq2seq":
        return (batch["labels"] != -100).long()
    return None


def count_tokens(batch: Mapping[str, torch.Tensor], kind: str) -> tuple[int, int]:
    """(input tokens, target tokens that enter the loss) of a batch."""
    tokens = int(batch["attention_mask"].sum())
    if kind == "seq2seq":
        return tokens, int((batch["labels"] != -100).sum())
    if kind == "causal_lm":
        return tokens, int(batch["target_mask"][:, 1:].sum())
    return tokens, 0


def check_class_labels(model: nn.Module, batch: Mapping[str, torch.Tensor], num_classes: int) -> None:
    labels = batch["labels"]
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        index = int(batch["index"][i]) if "index" in batch else i
        raise BlockmergeError(f"example {index}: label {int(labels[i])} is outside the {num_classes} classes of "
                              f"{type(model).__name__}'s head")


def example_seed(seed: int, index: int) -> int:
    """A 63-bit seed for example ``index``: sampling does not depend on batch size or order."""
    key = hashlib.blake2b(f"blockmerge-labels\0{seed}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(key, "little") >> 1


def _indices(batch: Mapping[str, torch.Tensor], offset: int) -> list[int]:
    n = batch["input_ids"].shape[0]
    if "index" in batch:
        return [int(i) for i in batch["index"]]
    return list(range(offset, offset + n))


def _pad_rows(rows: list[torch.Tensor], value: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), value, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _generation_config(model: nn.Module, max_new_tokens: int) -> Any:
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None) or GenerationConfig()
    cfg = model.config
    eos = base.eos_token_id if base.eos_token_id is not None else getattr(cfg, "eos_token_id", None)
    pad = base.pad_token_id if base.pad_token_id is not None else getattr(cfg, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    start = base.decoder_start_token_id
    if start is None:
        start = getattr(cfg, "decoder_start_token_id", None)
    # plain ancestral sampling from the model's distribution (no top-k/top-p/temperature from the checkpoint)
    return GenerationConfig(do_sample=True, max_new_tokens=max_new_tokens, top_k=0, top_p=1.0, temperature=1.0,
                            num_beams=1, eos_token_id=eos, pad_token_id=pad if pad is not None else 0,
                            bos_token_id=base.bos_token_id, decoder_start_token_id=start)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def sample_labels(model: nn.Module, batch: Mapping[str, torch.Tensor], kind: str, *, seed: int,
                  max_new_tokens: int = 64, offset: int = 0) -> dict[str, torch.Tensor]:
    """Replace the batch's labels/targets by one draw per example from the model (docs/methods.md §5.5, §9).

    Classification: a class drawn from ``softmax(logits)`` by inverse CDF with a uniform from a generator
    seeded by (seed, example index). Seq2seq / causal LM: ``generate(do_sample=True, max_new_tokens=...)``
    per example (unpadded), with the global RNG forked and seeded by (seed, example index); the generated
    non-pad tokens become the target (for a causal LM whose pad token is its EOS token, every generated token).
    """
    batch = dict(batch)
    indices = _indices(batch, offset)
    device = batch["input_ids"].device
    if kind == "classification":
        probs = torch.softmax(logits(model, prepare(model, batch, kind), kind).float(), -1).double().cpu()
        drawn = []
        for b, index in enumerate(indices):
            gen = torch.Generator().manual_seed(example_seed(seed, index))
            u = torch.rand((), generator=gen, dtype=torch.float64)
            cdf = probs[b].cumsum(0)
            drawn.append(min(int(torch.searchsorted(cdf, u * cdf[-1], right=True)), probs.shape[1] - 1))
        batch["labels"] = torch.tensor(drawn, dtype=torch.long, device=device)
        return batch
    gcfg = _generation_config(model, max_new_tokens)
    pad = gcfg.pad_token_id
    eos = gcfg.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    limit = getattr(model.config, "max_position_embeddings", None)
    targets, prompts = [], []
    for b, index in enumerate(indices):
        keep = batch["attention_mask"][b].bool()
        if kind == "causal_lm":
            keep = keep & ~batch["target_mask"][b].bool()
        prompt = batch["input_ids"][b][keep]
        cfg = gcfg
        if kind == "causal_lm" and limit is not None:  # never past the model's position table
            cfg = copy.deepcopy(gcfg)
            cfg.max_new_tokens = max(1, min(max_new_tokens, int(limit) - prompt.numel()))
        with _seeded(example_seed(seed, index), device):
            out = model.generate(input_ids=prompt[None], attention_mask=torch.ones_like(prompt)[None],
                                 generation_config=cfg)
        new = out[0, 1:] if kind == "seq2seq" else out[0, prompt.numel():]
        prompts.append(prompt)
        targets.append(new)
    if kind == "seq2seq":
        rows = [torch.where(t == pad, torch.full_like(t, -100), t) for t in targets]
        batch["labels"] = _pad_rows(rows, -100, device)
        batch.pop("decoder_input_ids", None)
        batch["decoder_attention_mask"] = (batch["labels"] != -100).long()
        return batch
    seqs = [torch.cat([p, t]) for p, t in zip(prompts, targets)]
    masks = []
    for p, t in zip(prompts, targets):
        real = torch.ones_like(t) if pad in eos_ids else (t != pad).long()
        masks.append(torch.cat([torch.zeros_like(p), real]))
    batch["input_ids"] = _pad_rows(seqs, pad, device)
    batch["attention_mask"] = _pad_rows([torch.ones_like(s) for s in seqs], 0, device)
    batch["target_mask"] = _pad_rows(masks, 0, device)
    return batch


@contextlib.contextmanager
def functional_mode(model: nn.Module) -> Iterator[None]:
    """Make a transformers model traceable by ``torch.func.vmap`` for the duration.

    transformers' mask builders skip the mask when it has no padding (``padding_mask.all()``), a
    data-dependent branch ``vmap`` cannot take; they are made to always build the mask (same values).
    SDPA/flash attention have no batching rule, so attention is switched to ``eager`` (same function).
    The model's own settings are restored afterwards.
    """
    patches = []
    try:
        import transformers.masking_utils as mu
    except ImportError:  # pragma: no cover
        mu = None
    if mu is not None:
        for name in ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa"):
            if hasattr(mu, name):
                patches.append((mu, name, getattr(mu, name)))
                setattr(mu, name, lambda *args, **kwargs: False)
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switched = False
    if previous not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
            switched = True
        except Exception:  # noqa: BLE001 - a model that cannot switch keeps its attention
            switched = False
    try:
        yield
    finally:
        for module, name, value in patches:
            setattr(module, name, value)
        if switched:
            model.set_attn_implementation(previous)
