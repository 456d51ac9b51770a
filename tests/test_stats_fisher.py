"""Diagonal / blockwise Fisher (blockmerge.stats.fisher) against plain autograd references (docs/methods.md §5.5)."""

from __future__ import annotations

import pytest
import torch
from test_stats_data import KINDS, task, tiny_model

from blockmerge.errors import BlockmergeError
from blockmerge.stats.data import batches
from blockmerge.stats.fisher import blockwise_fisher, fisher
from blockmerge.stats.models import model_kind, sample_labels


def reference_log_likelihood(model, batch, kind):
    """log p(y|x) of a batch of ONE example, from the model's own loss (HF `labels` loss = mean target CE)."""
    if kind == "classification":
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        return torch.log_softmax(model(**kwargs).logits.double(), -1)[0, batch["labels"][0]]
    if kind == "seq2seq":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    else:
        labels = batch["input_ids"].masked_fill(batch["target_mask"] == 0, -100)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    return -out.loss


def reference_grads(model, batch, kind):
    model.zero_grad()
    reference_log_likelihood(model, batch, kind).backward()
    return {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_fisher(model, examples, kind, exact=False):
    """(1/N) Σ_n g_n² with one .backward() per example (batch size 1); exact: Σ_c p(c|x) g_c²."""
    total = {}
    for batch in examples:
        if exact:
            with torch.no_grad():
                probs = torch.softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                            token_type_ids=batch["token_type_ids"]).logits.double(), -1)[0]
            terms = [(probs[c], reference_grads(model, dict(batch, labels=torch.tensor([c])), kind))
                     for c in range(probs.numel())]
        else:
            terms = [(1.0, reference_grads(model, batch, kind))]
        for weight, grads in terms:
            for n, g in grads.items():
                total[n] = total.get(n, 0) + weight * g * g
    return {n: t / len(examples) for n, t in total.items()}


def assert_close(got: dict, want: dict, atol: float = 1e-6):
    assert sorted(got) == sorted(want)
    for n in want:
        assert got[n].dtype == torch.float32 and got[n].shape == want[n].shape, n
        torch.testing.assert_close(got[n].double(), want[n], atol=atol, rtol=1e-5, msg=n)


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_batch_equals_per_example_backward_loop(tmp_path, kind):
    ds, tok, spec = task(tmp_path, kind, n=6)
    model = tiny_model(kind)
    assert model_kind(model) == kind
    stats = fisher(model, batches(ds, tok, spec, kind, 4), labels="empirical")
    assert stats.examples == 6 and stats.labels == "empirical"
    one_by_one = list(batches(ds, tok, spec, kind, 1))
    assert stats.tokens == sum(int(b["attention_mask"].sum()) for b in one_by_one)
    if kind == "seq2seq":
        assert stats.target_tokens == sum(int((b["labels"] != -100).sum()) for b in one_by_one)
    assert_close(stats.tensors["fisher"], reference_fisher(model, one_by_one, kind))
    assert model.config._attn_implementation == "sdpa" and not model.training  # settings restored
    loop = fisher(model, batches(ds, tok, spec, kind, 3), vectorize=False)
    assert_close(loop.tensors["fisher"], {n: t.double() for n, t in stats.tensors["fisher"].items()})


def test_exact_fisher_is_the_expectation_over_classes(tmp_path):
    ds, tok, spec = task(tmp_path, "classification", n=5)
    model = tiny_model("classification")
    stats = fisher(model, batches(ds, tok, spec, "classification", 3), labels="exact")
    want = reference_fisher(model, list(batches(ds, tok, spec, "classification", 1)), "classification", exact=True)
    assert_close(stats.tensors["fisher"], want)
    with pytest.raises(BlockmergeError, match="exact.*classification"):
        ds2, tok2, spec2 = task(tmp_path, "seq2seq", n=2)
        fisher(tiny_model("seq2seq"), batches(ds2, tok2, spec2, "seq2seq", 2), labels="exact")


def test_sampled_labels_are_seeded_per_example(tmp_path):
    ds, tok, spec = task(tmp_path, "classification", n=12)
    model = tiny_model("classification")
    gold = torch.cat([b["labels"] for b in batches(ds, tok, spec, "classification", 12)])
    drawn = [torch.cat([sample_labels(model, b, "classification", seed=s)["labels"]
                        for b in batches(ds, tok, spec, "classification", bs)]) for s, bs in ((1, 4), (1, 5), (2, 4))]
    assert torch.equal(drawn[0], drawn[1])          # same seed, any batch size: same labels
    assert not torch.equal(drawn[0], gold)          # not the gold labels
    assert not torch.equal(drawn[0], drawn[2])      # another seed, other labels
    a = fisher(model, batches(ds, tok, spec, "classification", 4), labels="sampled", seed=1)
    b = fisher(model, batches(ds, tok, spec, "classification", 6), labels="sampled", seed=1)
    e = fisher(model, batches(ds, tok, spec, "classification", 4), labels="empirical")
    assert a.labels == "sampled"
    assert_close(a.tensors["fisher"], {n: t.double() for n, t in b.tensors["fisher"].items()})
    assert any(not torch.allclose(a.tensors["fisher"][n], e.tensors["fisher"][n]) for n in e.tensors["fisher"])


@pytest.mark.parametrize("kind", ["seq2seq", "causal_lm"])
def test_sampled_sequences_are_reproducible(tmp_path, kind):
    ds, tok, spec = task(tmp_path, kind, n=3)
    model = tiny_model(kind)
    runs = [fisher(model, batches(ds, tok, spec, kind, bs), labels="sampled", seed=7, max_new_tokens=6)
            for bs in (3, 2)]
    assert_close(runs[0].tensors["fisher"], {n: t.double() for n, t in runs[1].tensors["fisher"].items()})
    assert runs[0].target_tokens == runs[1].target_tokens > 0
    gold = fisher(model, batches(ds, tok, spec, kind, 3))
    assert any(not torch.allclose(t, runs[0].tensors["fisher"][n]) for n, t in gold.tensors["fisher"].items())
    (b,) = batches(ds, tok, spec, kind, 3)
    s = sample_labels(model, b, kind, seed=7, max_new_tokens=6)
    if kind == "causal_lm":  # the prompt is kept, the target is the generated continuation
        p = int((b["attention_mask"][0] - b["target_mask"][0]).sum())
        assert torch.equal(s["input_ids"][0, :p], b["input_ids"][0, :p]) and s["target_mask"][0, :p].sum() == 0
        assert 1 <= s["target_mask"][0].sum() <= 6
    else:
        assert s["labels"].shape[1] <= 6


def test_parameters_regex_and_blockwise_fisher(tmp_path):
    ds, tok, spec = task(tmp_path, "classification", n=5)
    model = tiny_model("classification")
    diag = fisher(model, batches(ds, tok, spec, "classification", 5), parameters=r".*LayerNorm\.weight")
    names = sorted(diag.tensors["fisher"])
    assert names == sorted(n for n, _ in model.named_parameters() if n.endswith("LayerNorm.weight"))
    block = blockwise_fisher(model, batches(ds, tok, spec, "classification", 2), parameters=r".*LayerNorm\.weight")
    assert sorted(block.tensors["blockwise_fisher"]) == names
    want: dict = {}
    for b in batches(ds, tok, spec, "classification", 1):
        for n, g in reference_grads(model, b, "classification").items():
            if n in names:
                want[n] = want.get(n, 0) + torch.outer(g, g) / 5
    assert_close(block.tensors["blockwise_fisher"], want)
    for n in names:
        torch.testing.assert_close(block.tensors["blockwise_fisher"][n].diagonal(), diag.tensors["fisher"][n])
    with pytest.raises(BlockmergeError, match=r"parameter 'classifier.weight'.*needs vectors"):
        blockwise_fisher(model, batches(ds, tok, spec, "classification", 2), parameters="classifier.*")
    with pytest.raises(BlockmergeError, match="no trainable parameter matches"):
        fisher(model, batches(ds, tok, spec, "classification", 2), parameters="nothing")


def test_nonfinite_gradient_names_parameter_and_example(tmp_path):
    ds, tok, spec = task(tmp_path, "classification", n=4)
    model = tiny_model("classification")
    with torch.no_grad():
        model.classifier.bias[1] = float("inf")
    with pytest.raises(BlockmergeError, match=r"parameter '.*': non-finite gradient of log p\(y\|x\) at example 0"):
        fisher(model, batches(ds, tok, spec, "classification", 2))


def test_model_kind_rejects_other_models():
    with pytest.raises(BlockmergeError, match="cannot tell the kind of model Linear"):
        model_kind(torch.nn.Linear(2, 2))


def test_embedding_gradient_kept_per_token_equals_dense(tmp_path):
    """The per-token embedding path (repeated tokens in one example, padding, an untied LM) equals batch-1 backward."""
    from test_stats_data import EOS, PAD, VOCAB
    from transformers import GPT2Config, GPT2LMHeadModel

    from blockmerge.stats.fisher import _input_embedding

    ds, tok, spec = task(tmp_path, "classification", n=8, seed=3)
    bert = tiny_model("classification")
    params = dict(bert.named_parameters())
    assert _input_embedding(bert, "classification", params)[0] == "bert.embeddings.word_embeddings.weight"
    batch = next(iter(batches(ds, tok, spec, "classification", 8)))
    ids = batch["input_ids"]
    assert any(len(set(row.tolist()) - {PAD}) < int((row != PAD).sum()) for row in ids)  # a repeated token
    assert bool((ids == PAD).any())  # padding in the batch
    stats = fisher(bert, batches(ds, tok, spec, "classification", 8))
    assert_close(stats.tensors["fisher"], reference_fisher(bert, list(batches(ds, tok, spec, "classification", 1)),
                                                           "classification"))

    torch.manual_seed(0)
    untied = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=128,
                                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
                                        tie_word_embeddings=False)).eval()
    assert _input_embedding(untied, "causal_lm", dict(untied.named_parameters()))[0] == "transformer.wte.weight"
    tied = tiny_model("causal_lm")
    assert _input_embedding(tied, "causal_lm", dict(tied.named_parameters())) is None
    t5 = tiny_model("seq2seq")
    assert _input_embedding(t5, "seq2seq", dict(t5.named_parameters())) is None
    ds, tok, spec = task(tmp_path, "causal_lm", n=6, seed=4)
    stats = fisher(untied, batches(ds, tok, spec, "causal_lm", 6))
    assert_close(stats.tensors["fisher"], reference_fisher(untied, list(batches(ds, tok, spec, "causal_lm", 1)),
                                                           "causal_lm"))


def test_a_partial_selection_keeps_no_autograd_graph(tmp_path):
    """Parameters left out still require grad: the statistic must be plain values, equal to the full run's."""
    ds, tok, spec = task(tmp_path, "classification", n=6)
    model = tiny_model("classification")
    full = fisher(model, batches(ds, tok, spec, "classification", 3)).tensors["fisher"]
    for vectorize in (True, False):
        part = fisher(model, batches(ds, tok, spec, "classification", 3), parameters=r"bert\.encoder\..*",
                      vectorize=vectorize).tensors["fisher"]
        assert part and all(n.startswith("bert.encoder.") for n in part)
        for name, t in part.items():
            assert not t.requires_grad and t.grad_fn is None, name
            torch.testing.assert_close(t, full[name], rtol=1e-5, atol=1e-8)
