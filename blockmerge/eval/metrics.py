"""Evaluation metrics and their accumulation over batches of model outputs.

Classification (the class predicted is the argmax of the logits):

* ``accuracy``: the fraction of examples whose predicted class is the gold label;
* ``macro_f1``: the unweighted mean over classes of ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``, over every class
  that occurs among the labels or the predictions (a gold class never predicted counts with F1 = 0).

Sequence-to-sequence and causal LM, over the target tokens of each example (padding never counts; for a causal LM
the logits at position ``l`` predict token ``l + 1`` and only the target's tokens count, docs/methods.md §9):

* ``exact_match``: the fraction of examples whose every target token is the argmax given the target tokens before
  it (teacher forcing) — exactly the examples that greedy decoding reproduces token for token (the EOS token
  included where the tokenizer appends one to targets);
* ``token_accuracy``: the fraction of target tokens that are the argmax;
* ``token_loss``: the mean cross-entropy (nats) per target token over the whole split, ``Σ CE / #tokens``.

A task's score is the mean of its metric values with ``token_loss`` counted negatively (higher is better).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
SEQUENCE_METRICS = ("exact_match", "token_accuracy", "token_loss")
METRICS = CLASSIFICATION_METRICS + SEQUENCE_METRICS
LOWER_IS_BETTER = frozenset({"token_loss"})


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label."""
    return sum(int(p) == int(y) for p, y in zip(predictions, labels, strict=True)) / len(labels)


def macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Unweighted mean F1 over the classes present among labels or predictions."""
    pairs = [(int(p), int(y)) for p, y in zip(predictions, labels, strict=True)]
    classes = sorted({c for pair in pairs for c in pair})
    scores = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in pairs)
        fp = sum(p == c and y != c for p, y in pairs)
        fn = sum(p != c and y == c for p, y in pairs)
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def token_targets(logits: torch.Tensor, batch: Mapping[str, torch.Tensor],
                  kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits ``[B, L, V]``, target ids ``[B, L]``, mask ``[B, L]``) aligned so that logits[b, l] predicts
    targets[b, l]; the mask marks the target tokens that count."""
    if kind == "seq2seq":
        targets = batch["labels"].long()
        return logits, targets.clamp(min=0), targets != -100
    if kind == "causal_lm":
        return logits[:, :-1], batch["input_ids"][:, 1:].long(), batch["target_mask"][:, 1:].bool()
    raise ValueError(f"no target tokens for model kind {kind!r}")


class Tally:
    """Running sums over a split from which every metric of the model's kind is read."""

    def __init__(self, kind: str):
        self.kind = kind
        self.examples = 0
        self.predictions: list[int] = []
        self.labels: list[int] = []
        self.loss = 0.0
        self.tokens = 0
        self.correct_tokens = 0
        self.exact = 0

    @torch.no_grad()
    def add(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        """Count one batch: the model's logits and the batch they were computed from."""
        self.examples += int(logits.shape[0])
        if self.kind == "classification":
            self.predictions += logits.argmax(-1).tolist()
            self.labels += batch["labels"].tolist()
            return
        logits, targets, mask = token_targets(logits, batch, self.kind)
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        correct = (logits.argmax(-1) == targets) & mask
        self.loss += float(nll.double()[mask].sum())
        self.tokens += int(mask.sum())
        self.correct_tokens += int(correct.sum())
        self.exact += int((correct | ~mask).all(-1).sum())

    def values(self, metrics: Iterable[str]) -> dict[str, float]:
        """The named metrics of everything counted so far."""
        out = {}
        for name in metrics:
            if name == "accuracy":
                out[name] = accuracy(self.predictions, self.labels)
            elif name == "macro_f1":
                out[name] = macro_f1(self.predictions, self.labels)
            elif name == "exact_match":
                out[name] = self.exact / self.examples
            elif name == "token_accuracy":
                out[name] = self.correct_tokens / self.tokens
            elif name == "token_loss":
                out[name] = self.loss / self.tokens
            else:
                raise ValueError(f"unknown metric {name!r}")
        return out


def score(values: Mapping[str, float]) -> float:
    """Mean of metric values, losses negated: higher is better."""
    return sum(-v if name in LOWER_IS_BETTER else v for name, v in values.items()) / len(values)
