"""mergekit's tokenizer settings: the output vocabulary (a model's, the base's, or the union of the models'), and
each model's embedding rows put in its order, as mergekit defines them.

A token a model lacks takes, in this order: the `tokens:` setting for it; the row of the only model that has it;
the base's row; the mean of the rows of the models that have it; zero if none has it. Rows past the vocabulary
(`pad_to_multiple_of`) are the mean of the model's rows. The union lists the base's tokens (the first model's
without a base), then every other token in the order of the configuration's models and of their ids, added tokens last.
Embedding tensors are the weights of the input and output embeddings of the model the config describes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .engine.gathered import GatheredCheckpoint, GatheredRows, RowTerm
from .engine.sources import Checkpoint, copy_model_files, is_tokenizer_file, open_checkpoint
from .engine.tensors import TensorSpec
from .errors import BlockmergeError

ZERO = "zero"


@dataclass(frozen=True)
class TokenSource:
    """Where one token's row comes from: a model's row of that token, another token's row of a model
    (`token` or `token_id` in its own vocabulary), or zero (`model` None)."""

    model: str | None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenizerSettings:
    """`source`: "union", "base" or a model directory; `tokens`: token -> (its source or None, force);
    `pad_to_multiple_of`: the vocabulary's size is rounded up to it."""

    source: str
    tokens: dict[str, tuple[TokenSource | None, bool]]
    pad_to_multiple_of: int | None = None


def settings(config: dict[str, Any], model_path: Any) -> TokenizerSettings | None:
    """The tokenizer settings of a configuration (`tokenizer_source`, or the `tokenizer:` mapping), with model
    references made paths by `model_path`."""
    legacy, block = config.get("tokenizer_source"), config.get("tokenizer")
    if legacy is not None and block is not None:
        raise BlockmergeError("mergekit config: give either tokenizer_source or tokenizer, not both")
    if block is None:
        return None if legacy is None else TokenizerSettings(_source(legacy, model_path), {})
    if not isinstance(block, dict) or set(block) - {"source", "tokens", "pad_to_multiple_of"}:
        raise BlockmergeError(f"mergekit config: tokenizer takes source, tokens and pad_to_multiple_of, got {block!r}")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise BlockmergeError(f"mergekit config: tokenizer pad_to_multiple_of must be a positive integer, got {pad!r}")
    tokens = {}
    for token, entry in (block.get("tokens") or {}).items():
        if not isinstance(entry, dict) or set(entry) - {"source", "force"}:
            raise BlockmergeError(f"mergekit config: tokenizer token {token!r} takes source and force, got {entry!r}")
        tokens[str(token)] = (_token_source(token, entry.get("source"), model_path), bool(entry.get("force", False)))
    return TokenizerSettings(_source(block.get("source", "union"), model_path), tokens, pad)


def _source(value: Any, model_path: Any) -> str:
    return value if value in ("union", "base") else model_path(value)


def _token_source(token: str, value: Any, model_path: Any) -> TokenSource | None:
    if value is None:
        return None
    if isinstance(value, dict) and value.get("kind") == ZERO:
        return TokenSource(None)
    if isinstance(value, dict) and value.get("kind") == "model_token":
        if (value.get("token") is None) == (value.get("token_id") is None):
            raise BlockmergeError(f"mergekit config: tokenizer token {token!r}: give one of token and token_id")
        return TokenSource(model_path(value.get("model")), value.get("token"), value.get("token_id"))
    return TokenSource(model_path(value))


@dataclass
class Vocabulary:
    """A model's tokenizer and its token -> row map (tokens past its `vocab_size` left out)."""

    directory: str
    tokenizer: Any
    rows: dict[str, int]
    vocab_size: int


def vocabulary(directory: str) -> Vocabulary:
    """The tokenizer of a model directory and the rows of its tokens."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise BlockmergeError(f"mergekit config: the tokenizer settings need each model's tokenizer "
                              f"({str(err).splitlines()[0]})", path=directory) from None
    config = Path(directory) / "config.json"
    size = json.loads(config.read_text()).get("vocab_size") if config.is_file() else None
    size = size if isinstance(size, int) else len(tokenizer)
    return Vocabulary(directory, tokenizer, {t: i for t, i in tokenizer.get_vocab().items() if i < size}, size)


def output_tokenizer(setting: TokenizerSettings, vocabularies: dict[str, Vocabulary], first: str) -> Any:
    """The merged model's tokenizer (loaded afresh: the models' own are not changed)."""
    from transformers import AutoTokenizer

    chosen = first if setting.source in ("base", "union") else setting.source
    tokenizer = AutoTokenizer.from_pretrained(chosen, local_files_only=True)
    if setting.source == "union":
        known = set(tokenizer.get_vocab())
        added: dict[str, Any] = {}
        for v in vocabularies.values():
            specials = {t.content: t for i, t in v.tokenizer.added_tokens_decoder.items() if i < v.vocab_size}
            for token in sorted(v.rows, key=v.rows.__getitem__):
                if token not in specials and token not in known:
                    tokenizer.add_tokens(token)
                    known.add(token)
            for content, info in specials.items():
                added.setdefault(content, info)
        for info in added.values():
            tokenizer.add_tokens(info)
    for token in setting.tokens:
        tokenizer.add_tokens(token)
    return tokenizer


def _positions(vocab: dict[str, int], rows: dict[str, int], size: int) -> torch.Tensor:
    """For each output id, the model's row of that token, or -1."""
    p = torch.full((size,), -1, dtype=torch.long)
    for token, i in vocab.items():
        row = rows.get(token)
        if row is not None:
            p[i] = row
    return p


def embedding_names(directory: str, ckpt: Checkpoint) -> list[str]:
    """The tensors indexed by token: the weights of the input and output embeddings of the model its config
    describes (built on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
    except (OSError, ValueError) as err:
        raise BlockmergeError(f"mergekit config: the tokenizer settings need the model's embeddings, and its config "
                              f"does not give them ({str(err).splitlines()[0]})", path=directory) from None
    weights = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return [n for n, p in model.named_parameters(remove_duplicate=False)
            if any(p is w for w in weights) and n in ckpt.specs]


@dataclass
class Aligned:
    """The models put in the output vocabulary's order (path -> its view) and the output's other files."""

    views: dict[str, Checkpoint]
    files: list[Path]


def align(setting: TokenizerSettings, directories: list[str], base: str | None, workdir: Path) -> Aligned | None:
    """The models of `directories` (`base` among them, or None) as views in the output vocabulary, and the
    output's config and tokenizer files written in `workdir`; None where every model already has the output's
    vocabulary in its order and nothing is padded or set per token."""
    first = base or directories[0]
    vocabularies = {d: vocabulary(d) for d in directories}
    tokenizer = output_tokenizer(setting, vocabularies, first)
    vocab = tokenizer.get_vocab()
    size = len(vocab)
    if setting.pad_to_multiple_of and size % setting.pad_to_multiple_of:
        size += setting.pad_to_multiple_of - size % setting.pad_to_multiple_of
    positions = {d: _positions(vocab, v.rows, size) for d, v in vocabularies.items()}
    identity = torch.cat([torch.arange(len(vocab)), torch.full((size - len(vocab),), -1)])
    if not setting.tokens and all(torch.equal(p, identity) and v.vocab_size == size
                                  for (d, v), p in zip(vocabularies.items(), positions.values())):
        return None
    checkpoints = {d: open_checkpoint(d, d) for d in directories}
    names = {d: embedding_names(d, checkpoints[d]) for d in directories}
    if len({tuple(n) for n in names.values()}) != 1 or not names[first]:
        raise BlockmergeError("mergekit config: the tokenizer settings need the same embedding tensors in every "
                              "model", path=first)
    defaults = _default_rows(setting, vocab, positions, vocabularies, base)
    forced = torch.zeros(size, dtype=torch.bool)
    forced[[vocab[t] for t, (_, force) in setting.tokens.items() if force]] = True
    files = _output_files(first, tokenizer, size, workdir)
    views = {}
    for d in directories:
        gathered = {}
        for name in names[d]:
            spec = checkpoints[d].specs[name]
            gathered[name] = _gathered(name, TensorSpec((size, *spec.shape[1:]), spec.dtype), d,
                                       positions[d], forced, defaults, checkpoints, len(vocab))
        views[d] = GatheredCheckpoint(checkpoints[d], gathered, d, files)
    return Aligned(views, files)


Row = list[tuple[str, int]]  # (model directory, its row) pairs whose mean is a token's row; empty: zero


def _default_rows(setting: TokenizerSettings, vocab: dict[str, int], positions: dict[str, torch.Tensor],
                  vocabularies: dict[str, Vocabulary], base: str | None) -> dict[int, Row]:
    """For each output id, the row a model lacking the token takes (and a forced token takes in every model)."""
    present = torch.stack(list(positions.values())) >= 0
    directories = list(positions)
    rows: dict[int, Row] = {}
    for token, i in vocab.items():
        if token in setting.tokens and setting.tokens[token][0] is not None:
            rows[i] = _token_row(token, i, setting.tokens[token][0], positions, vocabularies)
            continue
        having = [d for d, has in zip(directories, present[:, i].tolist()) if has]
        if len(having) == 1:
            rows[i] = [(having[0], int(positions[having[0]][i]))]
        elif base is not None and base in having:
            rows[i] = [(base, int(positions[base][i]))]
        else:
            rows[i] = [(d, int(positions[d][i])) for d in having]
    return rows


def _token_row(token: str, i: int, source: TokenSource, positions: dict[str, torch.Tensor],
               vocabularies: dict[str, Vocabulary]) -> Row:
    if source.model is None:
        return []
    if source.model not in positions:
        raise BlockmergeError(f"mergekit config: tokenizer token {token!r}: its source is not one of the models "
                              "merged", path=source.model)
    v = vocabularies[source.model]
    if source.token is None and source.token_id is None:
        row = int(positions[source.model][i])
        if row < 0:
            raise BlockmergeError(f"mergekit config: tokenizer token {token!r} is not in its source's vocabulary",
                                  path=source.model)
        return [(source.model, row)]
    row = v.rows.get(source.token, -1) if source.token is not None else source.token_id
    if not 0 <= row < v.vocab_size:
        raise BlockmergeError(f"mergekit config: tokenizer token {token!r}: its source token "
                              f"{source.token or source.token_id!r} is not in that model's vocabulary",
                              path=source.model)
    return [(source.model, row)]


def _gathered(name: str, spec: TensorSpec, directory: str, own: torch.Tensor, forced: torch.Tensor,
              defaults: dict[int, Row], checkpoints: dict[str, Checkpoint], real: int) -> GatheredRows:
    """One model's embedding tensor in the output order: its own rows, the default rows of the tokens it lacks
    (or that are forced), then padding rows (the mean of the others)."""
    keep = (own >= 0) & ~forced
    ids = torch.nonzero(keep).flatten()
    entries: dict[str, tuple[list[int], list[int]]] = {directory: (ids.tolist(), own[ids].tolist())}
    divisors = torch.ones(own.shape[0])
    for i in torch.nonzero(~keep[:real]).flatten().tolist():
        row = defaults[i]
        divisors[i] = max(len(row), 1)
        for d, r in row:
            out, src = entries.setdefault(d, ([], []))
            out.append(i)
            src.append(r)
    terms = []
    for d, (out, src) in entries.items():
        if out:
            order = sorted(range(len(out)), key=out.__getitem__)
            terms.append(RowTerm(checkpoints[d], name, torch.tensor([out[k] for k in order]),
                                 torch.tensor([src[k] for k in order])))
    return GatheredRows(spec, tuple(terms), divisors, mean_from=real if real < own.shape[0] else None)


def _output_files(first: str, tokenizer: Any, size: int, workdir: Path) -> list[Path]:
    """The first model's other files with `vocab_size` set to `size` in its config, and the output tokenizer."""
    workdir.mkdir(parents=True, exist_ok=True)
    copy_model_files(Path(first), workdir, lambda config: config.update(vocab_size=size), skip=is_tokenizer_file)
    tokenizer.save_pretrained(workdir)
    return sorted(f for f in workdir.iterdir() if f.is_file())


NAMED_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def with_chat_template(donor: str, template: str, directories: list[str], workdir: Path) -> str:
    """A directory holding the tokenizer of `donor` with the chat template set: `auto` (the template most of the
    models' tokenizers have, the first of equals in the configuration's order; none: left as it is) or a Jinja
    template's text."""
    from transformers import AutoTokenizer

    if template in NAMED_TEMPLATES:
        raise BlockmergeError(f"mergekit config: chat_template {template!r}: mergekit's named templates are not "
                              "supported yet (give the template's text, or auto)")
    if template == "auto":
        found = [t.strip() for t in (_chat_template(d) for d in directories) if t]
        if not found:
            return donor
        template = max(found, key=found.count)
    elif len(template) < 20 or "{" not in template:
        raise BlockmergeError(f"mergekit config: chat_template {template!r} is not a Jinja template")
    tokenizer = AutoTokenizer.from_pretrained(donor, local_files_only=True)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(workdir)
    return str(workdir)


def _chat_template(directory: str) -> str | None:
    template = vocabulary(directory).tokenizer.chat_template
    return template.get("default") if isinstance(template, dict) else template
