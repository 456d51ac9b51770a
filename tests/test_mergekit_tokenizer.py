"""mergekit's tokenizer settings over models of different vocabularies: embedding rows aligned by token, checked
against a plainly written reference that works token by token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_mergekit_config import merged_tensors, run_config

from blockmerge.engine.gathered import GatheredCheckpoint, GatheredRows, RowTerm
from blockmerge.engine.sources import MappingCheckpoint
from blockmerge.engine.tensors import TensorSpec

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
VOCABULARIES = {"base": [f"w{i}" for i in range(32)],
                "a": [f"w{i}" for i in range(32)],
                "b": [f"w{i}" for i in range(20)][::-1] + [f"x{i}" for i in range(12)],
                "c": [f"w{i}" for i in range(10, 30)] + [f"x{i}" for i in range(6)] + [f"y{i}" for i in range(6)]}


@pytest.fixture(scope="module")
def family(llamas, tmp_path_factory) -> dict[str, Path]:
    """The Llamas (vocab_size 32) with word-level tokenizers: base and a share one vocabulary; b orders some of
    its words otherwise and has new ones; c has others again. c's weights are b's."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("vocabularies")
    out = {}
    for name, words in VOCABULARIES.items():
        d = root / name
        d.mkdir()
        for f in llamas["b" if name == "c" else name].iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        vocabulary = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
        vocabulary.pre_tokenizer = WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=vocabulary).save_pretrained(d)
        out[name] = d
    return out


def rows_by_token(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    """Each embedding tensor's rows by token, in float64."""
    tensors = load_file(directory / "model.safetensors")
    return {n: {w: tensors[n][i].double().numpy() for i, w in enumerate(VOCABULARIES[directory.name])}
            for n in EMBEDDINGS}


def output_vocabulary(out: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out).get_vocab()


def reference_rows(family: dict[str, Path], models: list[str], base: str | None, vocab: list[str],
                   tokens: dict | None = None) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """name -> model -> token -> row: a model's own row; else a `tokens` rule; else the only model's row that
    has the token; else the base's; else the mean of those that have it; zero where none has it."""
    tokens = tokens or {}
    rows = {m: rows_by_token(family[m]) for m in dict.fromkeys([*([base] if base else []), *models])}
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for name in EMBEDDINGS:
        out[name] = {}
        for m in rows:
            out[name][m] = {}
            for w in vocab:
                rule = tokens.get(w)
                having = [k for k in rows if w in rows[k][name]]
                if w in rows[m][name] and not (rule and rule.get("force")):
                    row = rows[m][name][w]
                elif rule and rule.get("source") == "zero":
                    row = np.zeros(16)
                elif rule and "from" in rule:
                    source_model, source_token = rule["from"]
                    row = rows[source_model][name][source_token]
                elif len(having) == 1:
                    row = rows[having[0]][name][w]
                elif base in having:
                    row = rows[base][name][w]
                elif having:
                    row = sum(rows[k][name][w] for k in having) / len(having)
                else:
                    row = np.zeros(16)
                out[name][m][w] = row
    return out


def union_order(models: list[str]) -> list[str]:
    order: list[str] = []
    for m in models:
        order += [w for w in VOCABULARIES[m] if w not in order]
    return order


def test_union_of_different_vocabularies_aligns_the_embedding_rows_by_token(family, tmp_path):
    from transformers import AutoModelForCausalLM

    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    config = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
              "models": [{"model": str(family[m]), "parameters": {"weight": w}} for m, w in weights.items()]}
    code, output, out = run_config(tmp_path, config)
    assert code == 0, output
    vocab = output_vocabulary(out)
    assert sorted(vocab, key=vocab.get) == union_order(["a", "b", "c"])  # the first model's, then the new words
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vocab) == 50
    got = merged_tensors(out)
    expected = reference_rows(family, list(weights), None, list(vocab))
    for name in EMBEDDINGS:
        for w, i in vocab.items():
            want = sum(weights[m] * expected[name][m][w] for m in weights)
            np.testing.assert_allclose(got[name][i].double().numpy(), want, rtol=1e-6, atol=1e-7, err_msg=f"{name} {w}")
    layer = "model.layers.0.mlp.up_proj.weight"  # one row per word of the MLP: not an embedding, not reordered
    want = sum(weights[m] * load_file(family[m] / "model.safetensors")[layer].double() for m in weights)
    np.testing.assert_allclose(got[layer].double().numpy(), want.numpy(), rtol=1e-6, atol=1e-7)
    AutoModelForCausalLM.from_pretrained(out)


def test_token_rules_padding_and_a_model_as_the_source_with_a_base(family, tmp_path):
    tokens = {"x1": {"source": str(family["b"])},
              "w12": {"source": {"kind": "zero"}, "force": True},
              "w15": {"source": {"kind": "model_token", "model": str(family["a"]), "token": "w3"}},
              "z9": {"source": {"kind": "model_token", "model": str(family["b"]), "token_id": 4}}}
    weights = {"a": 0.5, "b": 0.7, "c": 0.3}
    config = {"merge_method": "task_arithmetic", "dtype": "float32", "base_model": str(family["base"]),
              "tokenizer": {"source": str(family["c"]), "pad_to_multiple_of": 16, "tokens": tokens},
              "models": [{"model": str(family[m]), "parameters": {"weight": w}} for m, w in weights.items()]}
    code, output, out = run_config(tmp_path, config)
    assert code == 0, output
    vocab = output_vocabulary(out)
    assert sorted(vocab, key=vocab.get) == [*VOCABULARIES["c"], "z9"]  # c's words, then the token rules' new one
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 48
    rules = {"x1": {"from": ("b", "x1")}, "w12": {"source": "zero", "force": True}, "w15": {"from": ("a", "w3")},
             "z9": {"from": ("b", VOCABULARIES["b"][4])}}
    expected = reference_rows(family, list(weights), "base", list(vocab), rules)
    got = merged_tensors(out)
    for name in EMBEDDINGS:
        merged = {w: expected[name]["base"][w] + sum(weights[m] * (expected[name][m][w] - expected[name]["base"][w])
                                                     for m in weights) for w in vocab}
        for w, i in vocab.items():
            np.testing.assert_allclose(got[name][i].double().numpy(), merged[w], rtol=1e-6, atol=1e-7,
                                       err_msg=f"{name} {w}")
        means = {m: np.mean([expected[name][m][w] for w in vocab], axis=0) for m in ["base", *weights]}
        padded = means["base"] + sum(weights[m] * (means[m] - means["base"]) for m in weights)
        for i in range(len(vocab), 48):  # padding: each model's mean row, merged as any other row
            np.testing.assert_allclose(got[name][i].double().numpy(), padded, rtol=1e-5, atol=1e-7)


def test_a_shared_vocabulary_needs_no_alignment_and_keeps_the_tensors(family, tmp_path):
    config = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
              "models": [{"model": str(family[m]), "parameters": {"weight": 0.5}} for m in ("a", "base")]}
    code, output, out = run_config(tmp_path, config, "--no-copy-tokenizer")
    assert code == 0, output
    assert sorted(output_vocabulary(out), key=output_vocabulary(out).get) == VOCABULARIES["a"]  # written regardless
    a, base = load_file(family["a"] / "model.safetensors"), load_file(family["base"] / "model.safetensors")
    for name in EMBEDDINGS:
        torch.testing.assert_close(merged_tensors(out)[name], (a[name] + base[name]) / 2)


@pytest.mark.parametrize("config, message", [
    ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, "either tokenizer_source or tokenizer"),
    ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "pad_to_multiple_of must be a positive integer"),
    ({"tokenizer": {"tokens": {"x1": {"source": {"kind": "model_token", "model": "{a}"}}}}},
     "give one of token and token_id"),
    ({"tokenizer": {"tokens": {"q": {"source": "{base}"}}}}, "its source is not one of the models merged"),
    ({"tokenizer": {"tokens": {"q": {"source": "{a}"}}}}, "is not in its source's vocabulary"),
    ({"tokenizer": {"tokens": {"q": {"source": {"kind": "model_token", "model": "{a}", "token": "x3"}}}}},
     "its source token 'x3' is not in that model's vocabulary"),
])
def test_bad_tokenizer_settings_are_one_line(family, tmp_path, config, message):
    text = json.dumps(config).replace("{a}", str(family["a"])).replace("{base}", str(family["base"]))
    full = {"merge_method": "linear", **json.loads(text),
            "models": [{"model": str(family[m]), "parameters": {"weight": 0.5}} for m in ("a", "b")]}
    code, output, _ = run_config(tmp_path, full)
    assert code != 0 and message in output and len(output.strip().splitlines()) == 1, output


def test_slices_over_different_vocabularies_are_refused_in_one_line(family, tmp_path):
    config = {"merge_method": "passthrough", "tokenizer_source": "union",
              "slices": [{"sources": [{"model": str(family["a"]), "layer_range": [0, 1]}]},
                         {"sources": [{"model": str(family["b"]), "layer_range": [1, 2]}]}]}
    code, output, _ = run_config(tmp_path, config)
    assert code != 0 and "different vocabularies" in output and len(output.strip().splitlines()) == 1, output


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_gathered_rows_read_in_any_blocks_equal_the_whole_gathering(data):
    rows, width = data.draw(st.integers(1, 12)), 3
    sources = [torch.randn(data.draw(st.integers(1, 40)), width) for _ in range(2)]
    checkpoints = [MappingCheckpoint({"e": s}, f"s{k}") for k, s in enumerate(sources)]
    real = data.draw(st.integers(1, rows))
    terms, expected_sum, counts = [], torch.zeros(rows, width, dtype=torch.float64), torch.zeros(rows)
    for k, s in enumerate(sources):
        pairs = st.tuples(st.integers(0, real - 1), st.integers(0, len(s) - 1))
        picks = data.draw(st.lists(pairs, unique_by=lambda p: p[0]))
        picks.sort()
        for out_row, source_row in picks:
            expected_sum[out_row] += s[source_row].double()
            counts[out_row] += 1
        if picks:
            terms.append(RowTerm(checkpoints[k], "e", torch.tensor([p[0] for p in picks]),
                                 torch.tensor([p[1] for p in picks])))
    divisors = counts.clamp(min=1)
    expected = expected_sum / divisors[:, None].double()
    expected[real:] = expected[:real].mean(0)
    view = GatheredCheckpoint(checkpoints[0], {"e": GatheredRows(TensorSpec((rows, width), "float32"), tuple(terms),
                                                                 divisors, real if real < rows else None)}, "v", [])
    cuts = sorted(set(data.draw(st.lists(st.integers(1, rows - 1), max_size=4)) if rows > 1 else []))
    bounds = [0, *cuts, rows]
    got = torch.cat([view.read("e", lo, hi) for lo, hi in zip(bounds, bounds[1:])])
    np.testing.assert_allclose(got.double().numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)


TEMPLATE_A = "{% for m in messages %}A: {{ m['content'] }}\n{% endfor %}"
TEMPLATE_B = "{% for m in messages %}B: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def chatty(family, tmp_path_factory) -> dict[str, Path]:
    """base and a with chat template A, b with B (one shared vocabulary: base's)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chat")
    out = {}
    for name, template in (("base", TEMPLATE_A), ("a", TEMPLATE_A), ("b", TEMPLATE_B)):
        d = root / name
        d.mkdir()
        for f in family["a" if name == "b" else name].iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        tokenizer = AutoTokenizer.from_pretrained(d)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(d)
        out[name] = d
    return out


@pytest.mark.parametrize("template, expected", [("auto", TEMPLATE_A), (TEMPLATE_B, TEMPLATE_B)])
def test_chat_template_auto_takes_the_most_common_and_a_text_is_set_as_given(chatty, tmp_path, template, expected):
    from transformers import AutoTokenizer

    config = {"merge_method": "linear", "chat_template": template,
              "models": [{"model": str(chatty[m]), "parameters": {"weight": 1.0}} for m in ("b", "a", "base")]}
    code, output, out = run_config(tmp_path, config)
    assert code == 0, output
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == expected
    said = tokenizer.apply_chat_template([{"role": "user", "content": "w3"}], tokenize=False)
    assert said == ("A: w3\n" if expected == TEMPLATE_A else "B: w3\n")


@pytest.mark.parametrize("template, message", [("chatml", "named templates are not supported yet"),
                                               ("hello", "is not a Jinja template")])
def test_a_chat_template_blockmerge_cannot_set_is_one_line(chatty, tmp_path, template, message):
    config = {"merge_method": "linear", "chat_template": template,
              "models": [{"model": str(chatty[m]), "parameters": {"weight": 1.0}} for m in ("a", "b")]}
    code, output, _ = run_config(tmp_path, config)
    assert code != 0 and message in output and len(output.strip().splitlines()) == 1, output


@pytest.mark.parametrize("config", [
    {"merge_method": "linear", "tokenizer": {"source": "union", "pad_to_multiple_of": 16},
     "models": [{"model": "{a}", "parameters": {"weight": 0.5}}, {"model": "{b}", "parameters": {"weight": 0.5}}]},
    {"merge_method": "passthrough", "slices": [{"sources": [{"model": "{a}", "layer_range": [0, 1]}]},
                                              {"sources": [{"model": "{b}", "layer_range": [0, 2]}]}]},
], ids=["aligned vocabularies", "slices"])
def test_assembled_inputs_merge_on_dask_to_the_local_bytes(family, tmp_path, cluster, config):
    from click.testing import CliRunner

    from blockmerge.cli import main

    path = tmp_path / "config.yml"
    path.write_text(json.dumps(config).replace("{a}", str(family["a"])).replace("{b}", str(family["b"])))
    outs = {}
    for executor in ("local", "dask"):
        outs[executor] = tmp_path / executor
        remote = ["--executor", "dask", "--scheduler", cluster[0].scheduler_address] if executor == "dask" else []
        result = CliRunner().invoke(main, ["merge", "-c", str(path), "--out", str(outs[executor]), "-q",
                                           "--block-size", "2KiB", *remote])
        assert result.exit_code == 0, result.output
    local, remote = merged_tensors(outs["local"]), merged_tensors(outs["dask"])
    assert local.keys() == remote.keys()
    for name in local:
        assert torch.equal(local[name], remote[name]), name
