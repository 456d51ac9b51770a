"""Input / output-gradient Gram matrices (blockmerge.stats.gram) against hooks written here
(docs/methods.md §6.2, §7.5)."""

from __future__ import annotations

import re

import pytest
import torch
from test_stats_data import task, tiny_model

from blockmerge.errors import BlockmergeError
from blockmerge.stats.data import batches
from blockmerge.stats.gram import ENCODER_MODULES, gram

T5_ENCODER_SIDE = {"encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.1.DenseReluDense.wo",
                   "decoder.block.0.layer.1.EncDecAttention.k", "decoder.block.0.layer.1.EncDecAttention.v"}
T5_DECODER_SIDE = {"decoder.block.0.layer.0.SelfAttention.v", "decoder.block.0.layer.1.EncDecAttention.q",
                   "decoder.block.0.layer.2.DenseReluDense.wi", "lm_head"}


def hf_forward(model, batch, kind):
    """The model's own forward and loss (labels argument), nothing from blockmerge."""
    if kind == "classification":
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        out = model(**kwargs)
        return out, torch.log_softmax(out.logits.double(), -1).gather(1, batch["labels"][:, None])[:, 0]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out, -out.loss


def side_mask(batch, kind, name):
    cross_kv = ("EncDecAttention.k", "EncDecAttention.v", "encoder_attn.k_proj", "encoder_attn.v_proj")
    decoder_side = name == "lm_head" or (re.search(r"(^|\.)decoder\.", name) is not None
                                         and not name.endswith(cross_kv))
    assert name not in T5_ENCODER_SIDE | T5_DECODER_SIDE or decoder_side == (name in T5_DECODER_SIDE)
    if kind == "seq2seq" and decoder_side:
        return batch["labels"] != -100
    return batch["attention_mask"].bool()


def reference_gram_in(model, data, kind, names):
    """Σ x xᵀ over unmasked rows / #rows, with inputs captured by forward hooks registered here."""
    captured: dict[str, list] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: captured[n].append(a[0].detach().double()))
               for n in names]
    sums, rows = {n: 0 for n in names}, {n: 0 for n in names}
    try:
        for batch in data:
            for n in names:
                captured[n].clear()
            with torch.no_grad():
                hf_forward(model, batch, kind)
            for n in names:
                (x,) = captured[n]
                x = x[side_mask(batch, kind, n)] if x.dim() == 3 else x  # padding dropped by hand
                sums[n] = sums[n] + x.T @ x
                rows[n] += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    return {f"{n}.weight": sums[n] / rows[n] for n in names}


def reference_gram_out(model, data, kind, names):
    """Σ g gᵀ / #rows, g = d log p(y|x) / d output, one .backward() per example (batches of one, no padding)."""
    captured: dict[str, list] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_full_backward_hook(
        lambda m, gi, go, n=n: captured[n].append(go[0].detach().double())) for n in names]
    sums, rows = {n: 0 for n in names}, {n: 0 for n in names}
    try:
        for batch in data:
            assert batch["input_ids"].shape[0] == 1
            for n in names:
                captured[n].clear()
            model.zero_grad()
            hf_forward(model, batch, kind)[1].sum().backward()
            for n in names:
                (g,) = captured[n]
                g = g.reshape(-1, g.shape[-1])
                sums[n] = sums[n] + g.T @ g
                rows[n] += g.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.zero_grad()
    return {f"{n}.weight": sums[n] / rows[n] for n in names}


def check(got: dict, want: dict):
    for key, w in want.items():
        assert got[key].dtype == torch.float32, key
        torch.testing.assert_close(got[key].double(), w, atol=1e-6, rtol=1e-5, msg=key)


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_gram_in_bert_masks_padding(tmp_path):
    ds, tok, spec = task(tmp_path, "classification", n=7)
    model = tiny_model("classification")
    stats = gram(model, batches(ds, tok, spec, "classification", 4))
    data = list(batches(ds, tok, spec, "classification", 4))
    assert data[0]["attention_mask"].sum(1).unique().numel() > 1  # really padded
    names = linear_names(model)
    assert sorted(stats.tensors["gram_in"]) == sorted(f"{n}.weight" for n in names)
    assert "gram_out" not in stats.tensors
    check(stats.tensors["gram_in"], reference_gram_in(model, data, "classification", names))
    assert stats.examples == 7 and stats.tokens == sum(int(b["attention_mask"].sum()) for b in data)
    # padding does not count: batch size changes nothing
    check(gram(model, batches(ds, tok, spec, "classification", 1)).tensors["gram_in"],
          {k: t.double() for k, t in stats.tensors["gram_in"].items()})


def test_gram_in_t5_encoder_and_decoder_masks(tmp_path):
    ds, tok, spec = task(tmp_path, "seq2seq", n=7)
    model = tiny_model("seq2seq")
    stats = gram(model, batches(ds, tok, spec, "seq2seq", 4))
    data = list(batches(ds, tok, spec, "seq2seq", 4))
    names = sorted(T5_ENCODER_SIDE | T5_DECODER_SIDE)
    want = reference_gram_in(model, data, "seq2seq", names)
    check(stats.tensors["gram_in"], want)
    assert len(stats.tensors["gram_in"]) == len(linear_names(model))
    assert stats.target_tokens == sum(int((b["labels"] != -100).sum()) for b in data)
    assert stats.tokens != stats.target_tokens  # a wrong side would change the normalizer too
    by_regex = gram(model, batches(ds, tok, spec, "seq2seq", 4), encoder_modules=ENCODER_MODULES)  # MaTS's rule
    for key, t in stats.tensors["gram_in"].items():
        assert torch.equal(by_regex.tensors["gram_in"][key], t), key


def test_gram_sides_found_in_bart(tmp_path):
    """BART's names defeat T5's regex (decoder `encoder_attn.q_proj` contains 'encoder'); the default finds
    the sides from the model: encoder modules and cross-attention keys/values read the encoder output."""
    from test_stats_data import EOS, PAD, VOCAB
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS, decoder_start_token_id=EOS)).eval()
    ds, tok, spec = task(tmp_path, "seq2seq", n=5)
    stats = gram(model, batches(ds, tok, spec, "seq2seq", 3), outputs=True)
    data = list(batches(ds, tok, spec, "seq2seq", 3))
    check(stats.tensors["gram_in"], reference_gram_in(model, data, "seq2seq", linear_names(model)))
    names = [n for n in linear_names(model) if n != "lm_head"]
    check(stats.tensors["gram_out"], reference_gram_out(model, list(batches(ds, tok, spec, "seq2seq", 1)),
                                                         "seq2seq", names))
    assert all((b["labels"] != -100).sum(1).unique().numel() > 1 for b in data[:1])  # targets padded too


@pytest.mark.parametrize("kind", ["classification", "seq2seq"])
def test_gram_out_equals_per_example_backward_hooks(tmp_path, kind):
    ds, tok, spec = task(tmp_path, kind, n=5)
    model = tiny_model(kind)
    stats = gram(model, batches(ds, tok, spec, kind, 3), inputs=True, outputs=True)
    names = [n for n in linear_names(model) if n != "lm_head"]
    assert sorted(stats.tensors["gram_out"]) == sorted(f"{n}.weight" for n in names)
    data = list(batches(ds, tok, spec, kind, 1))
    check(stats.tensors["gram_out"], reference_gram_out(model, data, kind, names))
    check(stats.tensors["gram_in"], reference_gram_in(model, data, kind, linear_names(model)))
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients were accumulated


def test_max_memory_spills_the_same_tensors(tmp_path):
    ds, tok, spec = task(tmp_path, "seq2seq", n=5)
    model = tiny_model("seq2seq")
    whole = gram(model, batches(ds, tok, spec, "seq2seq", 2), inputs=True, outputs=True)
    spilled: dict = {}
    reads = []

    def counted():
        for b in batches(ds, tok, spec, "seq2seq", 2):
            reads.append(1)
            yield b

    forwards = []
    handle = model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    grouped = gram(model, counted(), inputs=True, outputs=True, max_memory=6000,
                   spill=lambda kind, name, t: spilled.setdefault(kind, {}).__setitem__(name, t))
    handle.remove()
    assert len(forwards) > 3 and len(forwards) % 3 == 0  # several passes over the 3 batches
    assert grouped.tensors == {} and grouped.examples == 5 and len(reads) == 3  # a generator is read once
    assert {k: sorted(v) for k, v in spilled.items()} == {k: sorted(v) for k, v in whole.tensors.items()}
    for kind, tensors in whole.tensors.items():
        for name, t in tensors.items():
            torch.testing.assert_close(spilled[kind][name], t, atol=1e-7, rtol=1e-6)
    kept = gram(model, batches(ds, tok, spec, "seq2seq", 2), inputs=True, outputs=False, max_memory=5000)
    for name, t in whole.tensors["gram_in"].items():
        torch.testing.assert_close(kept.tensors["gram_in"][name], t, atol=1e-7, rtol=1e-6)


def test_sampled_labels_and_bad_requests(tmp_path):
    ds, tok, spec = task(tmp_path, "classification", n=6)
    model = tiny_model("classification")
    a = gram(model, batches(ds, tok, spec, "classification", 4), outputs=True, labels="sampled", seed=3)
    b = gram(model, batches(ds, tok, spec, "classification", 3), outputs=True, labels="sampled", seed=3)
    for name, t in a.tensors["gram_out"].items():
        torch.testing.assert_close(b.tensors["gram_out"][name], t, atol=1e-7, rtol=1e-6)
    empirical = gram(model, batches(ds, tok, spec, "classification", 4), outputs=True)
    for name, t in empirical.tensors["gram_in"].items():  # inputs do not depend on the labels (nor the sampler)
        torch.testing.assert_close(a.tensors["gram_in"][name], t, atol=1e-7, rtol=1e-6)
    assert any(not torch.allclose(a.tensors["gram_out"][n], t) for n, t in empirical.tensors["gram_out"].items())
    with pytest.raises(BlockmergeError, match="one label per example"):
        gram(model, batches(ds, tok, spec, "classification", 4), outputs=True, labels="exact")
    with pytest.raises(BlockmergeError, match="nothing to compute"):
        gram(model, batches(ds, tok, spec, "classification", 4), inputs=False)
    ds2, tok2, spec2 = task(tmp_path, "seq2seq", n=2)
    with pytest.raises(BlockmergeError, match="does not match the input mask.*encoder_modules"):
        gram(tiny_model("seq2seq"), batches(ds2, tok2, spec2, "seq2seq", 2), encoder_modules=".*")
