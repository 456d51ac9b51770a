"""Evaluation, sweeps and Fisher coefficient search (blockmerge.eval) on tiny real transformers models and task
files written here; metrics against plainly written references."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_stats_data import SPECIAL, WORDS, tiny_model, tiny_tokenizer

import blockmerge
from blockmerge.errors import BlockmergeError
from blockmerge.eval import (
    Task,
    accuracy,
    candidates,
    dirichlet_weights,
    evaluate,
    macro_f1,
    parse_grid,
    search,
    simplex_grid,
    sweep,
)
from blockmerge.eval.metrics import Tally
from blockmerge.stats import write_statistics

NUM_SPECIAL = len(SPECIAL)


# --- plainly written references ------------------------------------------------------------------------------


def reference_accuracy(predictions: list[int], labels: list[int]) -> float:
    hits = 0
    for p, y in zip(predictions, labels):
        if p == y:
            hits += 1
    return hits / len(labels)


def reference_macro_f1(predictions: list[int], labels: list[int]) -> float:
    """Per class precision and recall (0 when undefined), F1 = 2PR/(P+R) (0 when P+R = 0), over every class seen."""
    classes = sorted(set(predictions) | set(labels))
    total = 0.0
    for c in classes:
        predicted = [y for p, y in zip(predictions, labels) if p == c]
        actual = [p for p, y in zip(predictions, labels) if y == c]
        precision = sum(1 for y in predicted if y == c) / len(predicted) if predicted else 0.0
        recall = sum(1 for p in actual if p == c) / len(actual) if actual else 0.0
        total += 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return total / len(classes)


def token_nll(row: list[float], target: int) -> float:
    """-log softmax(row)[target] in float64."""
    top = max(row)
    return top + math.log(sum(math.exp(v - top) for v in row)) - row[target]


# --- tiny models and data ------------------------------------------------------------------------------------


def plain_tokenizer():
    """Word-level tokenizer over SPECIAL + WORDS that adds no token (no EOS): targets are exactly their words."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(SPECIAL + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def sentences(n: int, seed: int, lo: int = 1, hi: int = 8) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(lo, hi))) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_task(path: Path, **keys) -> Path:
    path.write_text(json.dumps(keys))
    return path


def tiny_classifier(seed: int):
    """tiny_model's BERT classifier with its matrices drawn at unit scale, so that its predictions vary with the
    input (at BERT's initial scale the tiny model predicts one class everywhere)."""
    model = tiny_model("classification", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0, generator=g)
    return model


def save(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A saved tiny BERT classifier (3 labels) and a task file with validation/test files."""
    tmp = tmp_path_factory.mktemp("cls")
    directory = save(tiny_classifier(9), tiny_tokenizer("classification"), tmp / "model")
    rng = random.Random(1)
    for split, n in (("validation", 10), ("test", 14)):
        write_jsonl(tmp / f"{split}.jsonl", [{"sentence": s, "y": rng.randint(0, 2)} for s in sentences(n, n)])
    task = write_task(tmp / "cls.json", name="cls", data={"validation": "validation.jsonl", "test": "test.jsonl"},
                      text_column="sentence", label_column="y", metric=["accuracy", "macro_f1"])
    return tmp, directory, task


@torch.no_grad()
def greedy(model, kind: str, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding of `steps` tokens, one unpadded forward per step."""
    if kind == "seq2seq":
        out = [model.config.decoder_start_token_id]
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([out])).logits
            out.append(int(logits[0, -1].argmax()))
        return out[1:]
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def generators(tmp_path_factory):
    """Saved tiny T5 and GPT-2 with an EOS-free tokenizer, and per kind a task whose targets are partly the
    model's own greedy continuations (so exact match is neither 0 nor 1)."""
    tmp = tmp_path_factory.mktemp("gen")
    tokenizer = plain_tokenizer()
    out = {}
    for kind in ("seq2seq", "causal_lm"):
        model = tiny_model(kind)
        with torch.no_grad():  # T5's small initial output layer would decode padding everywhere
            model.get_output_embeddings().weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(4))
        directory = save(model, tokenizer, tmp / kind)
        rows = []
        rng = random.Random(2)
        for i, text in enumerate(sentences(12, 3)):
            made = greedy(model, kind, tokenizer(text)["input_ids"], 2)
            words = [tokenizer.convert_ids_to_tokens(t) for t in made]
            if i % 2 == 0 and min(made) >= NUM_SPECIAL:
                target = " ".join(words)
            else:
                target = " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))
            rows.append({"text": text, "target": target})
        write_jsonl(tmp / f"{kind}.jsonl", rows)
        task = write_task(tmp / f"{kind}.yaml", data=f"{kind}.jsonl", splits={"test": "test"}, label_column=None,
                          target_column="target", metric=["exact_match", "token_accuracy", "token_loss"])
        out[kind] = (model, directory, task, rows)
    return tmp, out


# --- metrics ---------------------------------------------------------------------------------------------------


def test_accuracy_and_macro_f1_on_a_worked_case() -> None:
    labels, predictions = [0, 0, 1, 2], [0, 0, 0, 0]
    assert accuracy(predictions, labels) == 0.5
    # class 0: P = 2/4, R = 1, F1 = 2/3; classes 1 and 2 never predicted: F1 = 0
    assert macro_f1(predictions, labels) == pytest.approx(2 / 9)
    # a predicted class absent from the labels counts too (F1 = 0)
    assert macro_f1([0, 3], [0, 0]) == pytest.approx((2 / 3 + 0) / 2)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30).flatmap(lambda n: st.tuples(st.lists(st.integers(0, 4), min_size=n, max_size=n),
                                                      st.lists(st.integers(0, 4), min_size=n, max_size=n))))
def test_accuracy_and_macro_f1_match_plain_references(pair) -> None:
    predictions, labels = pair
    assert accuracy(predictions, labels) == pytest.approx(reference_accuracy(predictions, labels))
    assert macro_f1(predictions, labels) == pytest.approx(reference_macro_f1(predictions, labels))


@pytest.mark.parametrize("kind", ["seq2seq", "causal_lm"])
def test_token_metrics_match_a_manual_per_token_computation(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    b, length, vocab = 5, 7, 6
    logits = torch.randn(b, length, vocab, generator=g) * 2
    lengths = [7, 3, 1, 5, 2]
    ids = torch.randint(0, vocab, (b, length), generator=g)
    if kind == "seq2seq":
        labels = ids.clone()
        for i, n in enumerate(lengths):
            labels[i, n:] = -100
        labels[1, :3] = logits[1, :3].argmax(-1)  # one example predicted exactly
        batch = {"labels": labels}
        positions = [[(t, int(labels[i, t])) for t in range(n)] for i, n in enumerate(lengths)]
    else:
        prompt = [2, 1, 3, 1, 4]
        mask = torch.zeros(b, length, dtype=torch.long)
        for i, (p, n) in enumerate(zip(prompt, lengths)):
            mask[i, p:min(p + n, length)] = 1
        ids[0, 2:] = logits[0, 1:-1].argmax(-1)  # example 0's targets (tokens 2..6, predicted at 1..5) made greedy
        batch = {"input_ids": ids, "target_mask": mask}
        positions = [[(t - 1, int(ids[i, t])) for t in range(1, length) if mask[i, t]] for i in range(b)]
    tally = Tally(kind)
    tally.add(logits, batch)
    values = tally.values(["exact_match", "token_accuracy", "token_loss"])

    rows = logits.double().tolist()
    losses, hits, exact = [], 0, 0
    for i, tokens in enumerate(positions):
        right = [max(range(vocab), key=lambda v: rows[i][t][v]) == y for t, y in tokens]
        losses += [token_nll(rows[i][t], y) for t, y in tokens]
        hits += sum(right)
        exact += all(right)
    assert values["token_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert values["token_accuracy"] == hits / len(losses)
    assert values["exact_match"] == exact / b
    assert 0 < exact < b


# --- evaluate --------------------------------------------------------------------------------------------------


@torch.no_grad()
def classifier_predictions(model, texts: list[str], tokenizer) -> list[int]:
    return [int(model(**tokenizer(t, return_tensors="pt")).logits[0].argmax()) for t in texts]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_classifier_matches_a_per_example_reference(classifier, tmp_path) -> None:
    tmp, directory, task = classifier
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(directory).eval()
    tokenizer = tiny_tokenizer("classification")
    results = {}
    for split in ("validation", "test"):
        rows = rows_of(tmp / f"{split}.jsonl")
        predicted = classifier_predictions(model, [r["sentence"] for r in rows], tokenizer)
        labels = [r["y"] for r in rows]
        result = evaluate(directory, [task], split=split, batch_size=3)
        got = result["tasks"]["cls"]
        assert got["examples"] == len(rows)
        assert got["metrics"]["accuracy"] == pytest.approx(reference_accuracy(predicted, labels))
        assert got["metrics"]["macro_f1"] == pytest.approx(reference_macro_f1(predicted, labels))
        assert got["score"] == pytest.approx((got["metrics"]["accuracy"] + got["metrics"]["macro_f1"]) / 2)
        assert result["score"] == got["score"] and result["split"] == split
        results[split] = result
    # the same weights as a .safetensors file (architecture from config=) and as a blockmerge store
    blockmerge.api.convert(directory, tmp_path / "m.store", format="store")
    for checkpoint in (directory / "model.safetensors", tmp_path / "m.store"):
        again = evaluate(checkpoint, [task], split="test", config=directory, batch_size=5)
        assert again["tasks"] == results["test"]["tasks"]


@pytest.mark.parametrize("kind", ["seq2seq", "causal_lm"])
def test_evaluate_generators_match_greedy_decoding_and_per_token_loss(generators, kind: str) -> None:
    _, by_kind = generators
    model, directory, task, rows = by_kind[kind]
    tokenizer = plain_tokenizer()
    losses, hits, exact = [], 0, 0
    with torch.no_grad():
        for row in rows:
            prompt, target = tokenizer(row["text"])["input_ids"], tokenizer(row["target"])["input_ids"]
            if kind == "seq2seq":
                decoder = [model.config.decoder_start_token_id] + target[:-1]
                logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([decoder])).logits[0]
            else:
                logits = model(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1:-1]
            rows64 = logits.double().tolist()
            losses += [token_nll(r, y) for r, y in zip(rows64, target)]
            hits += sum(int(logits[i].argmax()) == y for i, y in enumerate(target))
            exact += greedy(model, kind, prompt, len(target)) == target
    got = evaluate(directory, [task], batch_size=4)["tasks"][task.stem]["metrics"]
    assert got["token_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert got["token_accuracy"] == hits / len(losses)
    assert got["exact_match"] == exact / len(rows)
    assert 0 < exact < len(rows)


# --- per-task heads --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heads(classifier):
    """An encoder-only checkpoint (the classifier removed) and heads: two constant ones (always class 0 / 2,
    over another encoder) and a random one."""
    tmp, directory, _ = classifier
    state = load_file(directory / "model.safetensors")
    encoder = tmp / "encoder.safetensors"
    save_file({n: t for n, t in state.items() if not n.startswith("classifier.")}, encoder)
    tokenizer = tiny_tokenizer("classification")
    dirs = {}
    for name, seed in (("always0", 8), ("always2", 8), ("random", 7)):
        model = tiny_classifier(seed)
        if name.startswith("always"):
            with torch.no_grad():
                model.classifier.weight.zero_()
                model.classifier.bias.copy_(torch.nn.functional.one_hot(torch.tensor(int(name[-1])), 3) * 10.0)
        dirs[name] = save(model, tokenizer, tmp / name)
    return encoder, dirs


def head_task(tmp: Path, name: str, head: Path) -> Path:
    return write_task(tmp / f"{name}.json", name=name, data={"test": "test.jsonl"}, text_column="sentence",
                      label_column="y", head=str(head))


def test_each_task_uses_its_named_head(classifier, heads) -> None:
    tmp, directory, _ = classifier
    encoder, dirs = heads
    labels = [r["y"] for r in rows_of(tmp / "test.jsonl")]
    tasks = [head_task(tmp, name, dirs[name]) for name in ("always0", "always2", "random")]
    result = evaluate(encoder, tasks, batch_size=4)["tasks"]
    # a constant head predicts its class everywhere: accuracy is that class's share of the labels
    assert result["always0"]["metrics"]["accuracy"] == pytest.approx(labels.count(0) / len(labels))
    assert result["always2"]["metrics"]["accuracy"] == pytest.approx(labels.count(2) / len(labels))
    assert labels.count(0) != labels.count(2)
    # the random head over the evaluated encoder, as one model built by hand
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(directory).eval()
    own = BertForSequenceClassification.from_pretrained(dirs["random"]).eval()
    model.classifier.load_state_dict(own.classifier.state_dict())
    texts = [r["sentence"] for r in rows_of(tmp / "test.jsonl")]
    predicted = classifier_predictions(model, texts, tiny_tokenizer("classification"))
    assert result["random"]["metrics"]["accuracy"] == pytest.approx(reference_accuracy(predicted, labels))
    assert len(set(predicted)) > 1
    # the head's own encoder would score differently: the encoder is the evaluated checkpoint's
    theirs = classifier_predictions(own, texts, tiny_tokenizer("classification"))
    assert reference_accuracy(theirs, labels) != reference_accuracy(predicted, labels)


def test_head_parameters_regex_and_missing_head(classifier, heads) -> None:
    tmp, directory, _ = classifier
    encoder, dirs = heads
    labels = [r["y"] for r in rows_of(tmp / "test.jsonl")]
    task = write_task(tmp / "bias_only.json", name="bias_only", data={"test": "test.jsonl"}, text_column="sentence",
                      label_column="y", head=str(dirs["always2"]), head_parameters=r"classifier\..*")
    got = evaluate(directory / "model.safetensors", [task])["tasks"]["bias_only"]["metrics"]["accuracy"]
    assert got == pytest.approx(labels.count(2) / len(labels))
    plain = write_task(tmp / "plain.json", name="plain", data={"test": "test.jsonl"}, text_column="sentence",
                       label_column="y")
    with pytest.raises(BlockmergeError, match=r"encoder.safetensors: parameter 'classifier\.(weight|bias)': "
                                              r"missing.*'head'") as err:
        evaluate(encoder, [plain], config=directory)
    assert "\n" not in str(err.value)


# --- sweep and search ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_family(tmp_path_factory):
    """A tiny GPT-2 base, two noisy fine-tunes (HF directories) and a causal-LM task (validation/test slices)."""
    tmp = tmp_path_factory.mktemp("family")
    tokenizer = plain_tokenizer()
    base = tiny_model("causal_lm")
    dirs = [save(base, tokenizer, tmp / "base")]
    g = torch.Generator().manual_seed(5)
    for i in range(2):
        model = tiny_model("causal_lm")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        dirs.append(save(model, tokenizer, tmp / f"ft{i}"))
    texts = sentences(16, 11)
    write_jsonl(tmp / "lm.jsonl", [{"text": t, "target": u} for t, u in zip(texts, sentences(16, 12, 1, 3))])
    task = write_task(tmp / "lm.yaml", name="lm", data="lm.jsonl", splits={"validation": "train[:8]",
                      "test": "train[8:]"}, label_column=None, target_column="target", metric="token_loss")
    return tmp, dirs[0], dirs[1:], task


def test_sweep_checks_its_output_before_the_first_merge(lm_family, tmp_path) -> None:
    """Never onto or into an input, even with overwrite (refused before any candidate is merged); missing
    parent directories are created."""
    tmp, base, models, task = lm_family
    tasks = [Task.from_file(task)]
    before = {p: p.read_bytes() for p in tmp.rglob("*") if p.is_file()}
    for out in (models[0], models[0] / "config.json", tmp):
        with pytest.raises(BlockmergeError, match="input (directory )?of this run"):
            sweep("task_arithmetic", models, tasks, {"scaling_factor": [0.5]}, base=base, out=out, overwrite=True)
    assert {p: p.read_bytes() for p in tmp.rglob("*") if p.is_file()} == before
    out = tmp_path / "new" / "best.safetensors"
    sweep("task_arithmetic", models, tasks, {"scaling_factor": [0.5]}, base=base, out=out, batch_size=4,
          report_split=None)
    assert sorted(p.name for p in out.parent.iterdir()) == ["best.safetensors"]


def test_grid_parsing_and_product() -> None:
    grid = parse_grid(["scaling_factor=0.1:1.0:0.1", "density=0.2,0.5", "num_iterations=10:30:10",
                       "weights=[[0.5, 0.5], [1, 0]]"])
    assert len(grid["scaling_factor"]) == 10
    assert grid["scaling_factor"] == pytest.approx([0.1 * i for i in range(1, 11)])
    assert grid["density"] == ["0.2", "0.5"] and grid["num_iterations"] == [10, 20, 30]
    assert grid["weights"] == [[0.5, 0.5], [1, 0]]
    combos = candidates({"a": [1, 2], "b": ["x", "y", "z"]})
    assert len(combos) == 6 and combos[0] == {"a": 1, "b": "x"} and combos[1] == {"a": 1, "b": "y"}
    for bad in ("x=1:0:1", "x", "x=1:2", "x=a:b:c", "x=0:1:0"):
        with pytest.raises(BlockmergeError, match="--grid"):
            parse_grid([bad])
    with pytest.raises(BlockmergeError, match="twice"):
        parse_grid(["x=1,2", "x=3"])


def test_sweep_keeps_the_argmax_of_validation_scores_and_writes_it(lm_family, tmp_path) -> None:
    _, base, models, task = lm_family
    tasks = [Task.from_file(task)]
    grid = {"scaling_factor": [0.0, 0.4, 0.8, 1.2]}
    out = tmp_path / "best.safetensors"
    result = sweep("task_arithmetic", models, tasks, grid, base=base, out=out, batch_size=4)
    independent = []
    for row, value in zip(result["candidates"], grid["scaling_factor"]):
        merged = blockmerge.merge("task_arithmetic", models, base=base, scaling_factor=value)
        scores = evaluate(merged, tasks, split="validation", config=base, batch_size=4)
        assert row["hyperparameters"] == {"scaling_factor": value}
        assert row["score"] == pytest.approx(scores["score"], rel=1e-9)
        assert row["tasks"]["lm"]["metrics"] == pytest.approx(scores["tasks"]["lm"]["metrics"], rel=1e-9)
        independent.append(scores["score"])
    best = max(range(len(independent)), key=independent.__getitem__)
    assert len(set(independent)) == len(independent)  # the argmax is not a tie
    assert result["best"]["index"] == best and result["best"]["hyperparameters"] == {"scaling_factor":
                                                                                     grid["scaling_factor"][best]}
    written = load_file(out)
    expected = blockmerge.merge("task_arithmetic", models, base=base, scaling_factor=grid["scaling_factor"][best])
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    report = evaluate(out, tasks, split="test", config=base, batch_size=4)
    assert result["best"]["report"]["tasks"] == report["tasks"] and result["out"] == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]  # no candidate left behind
    with pytest.raises(BlockmergeError, match="already exists"):
        sweep("task_arithmetic", models, tasks, grid, base=base, out=out)
    with pytest.raises(BlockmergeError, match="both fixed and in the grid"):
        sweep("task_arithmetic", models, tasks, grid, base=base, scaling_factor=1.0)
    with pytest.raises(BlockmergeError, match="hyperparameter scaling_factor"):
        sweep("task_arithmetic", models, tasks, {"scaling_factor": ["x"]}, base=base)


def test_dirichlet_weights_are_valid_and_reproducible() -> None:
    from scipy import stats

    draws = dirichlet_weights(3, 2000, seed=4)
    assert all(len(w) == 3 and min(w) >= 0 and math.isclose(sum(w), 1.0, abs_tol=1e-12) for w in draws)
    assert dirichlet_weights(3, 2000, seed=4) == draws and dirichlet_weights(3, 5, seed=5) != draws[:5]
    # Dirichlet(1, 1, 1): each weight is Beta(1, 2) distributed
    for i in range(3):
        assert stats.kstest([w[i] for w in draws], stats.beta(1, 2).cdf).pvalue > 1e-3
    pairs = simplex_grid(2, 51)  # FISHER's (1, 0), (0.98, 0.02), ..., (0, 1)
    assert len(pairs) == 51 and [w for pair in pairs for w in pair] == pytest.approx(
        [w for k in range(51) for w in (1 - k / 50, k / 50)], abs=1e-15)
    grid = simplex_grid(3, 3)
    assert len(grid) == 6 and (1.0, 0.0, 0.0) == grid[0] and all(math.isclose(sum(w), 1.0) for w in grid)
    with pytest.raises(BlockmergeError, match="num_samples"):
        search(["a", "b", "c"], [])


def fisher_stores(tmp: Path, models: list[Path]) -> list[str]:
    """Random positive Fisher statistics of every tensor of each model, as statistics stores."""
    g = torch.Generator().manual_seed(6)
    stores = []
    for i, directory in enumerate(models):
        state = load_file(directory / "model.safetensors")
        fisher = {n: torch.rand(t.shape, generator=g) + 0.01 for n, t in state.items() if t.is_floating_point()}
        stores.append(str(write_statistics({"fisher": fisher}, tmp / f"fisher{i}.store", {})))
    return stores


def start_cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "blockmerge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return stdout


def test_search_command_scores_seeded_dirichlet_weights(lm_family, tmp_path) -> None:
    from click.testing import CliRunner

    from blockmerge.cli import main

    _, base, models, task = lm_family
    stores = fisher_stores(tmp_path, models)
    args = ["search", "--model", str(models[0]), "--model", str(models[1]), "--stats", f"0={stores[0]}",
            "--stats", f"1={stores[1]}", "--task", str(task), "--num-samples", "3", "--seed", "7",
            "--config", str(base), "--json-out", str(tmp_path / "search.json"), "--out", str(tmp_path / "best"),
            "--format", "hf", "--quiet"]
    done = CliRunner().invoke(main, args)  # in-process; test_eval_and_sweep_cli runs the command line for real
    assert done.exit_code == 0, done.output
    result = json.loads((tmp_path / "search.json").read_text())
    weights = dirichlet_weights(2, 3, seed=7)
    assert [c["hyperparameters"]["weights"] for c in result["candidates"]] == [list(w) for w in weights]
    assert result["search"] == {"mode": "dirichlet", "num_samples": 3, "seed": 7}
    scores = [c["score"] for c in result["candidates"]]
    assert result["best"]["index"] == scores.index(max(scores))
    # the candidates are the fisher merges of those weights
    for c, w in zip(result["candidates"], weights):
        merged = blockmerge.merge("fisher", models, stats=stores, weights=list(w))
        assert c["score"] == pytest.approx(evaluate(merged, [task], split="validation", config=base)["score"])
    assert (tmp_path / "best" / "config.json").is_file()
    assert "best merge written to" in done.output and "lm" in done.output


def test_eval_and_sweep_cli(classifier, lm_family, tmp_path) -> None:
    _, directory, task = classifier
    _, base, models, lm_task = lm_family
    evaluation = start_cli("eval", str(directory), "--task", str(task), "--batch-size", "4", "--json-out",
                           str(tmp_path / "eval.json"), "--quiet")
    sweeping = start_cli("sweep", "--method", "task_arithmetic", "--base", str(base), "--model", str(models[0]),
                         "--model", str(models[1]), "--task", str(lm_task), "--grid", "scaling_factor=0.5:1.0:0.5",
                         "--out", str(tmp_path / "best.safetensors"), "--json-out", str(tmp_path / "sweep.json"),
                         "--quiet")
    printed = finish(evaluation)
    assert json.loads((tmp_path / "eval.json").read_text()) == evaluate(directory, [task], batch_size=4)
    assert "cls" in printed and "macro_f1" in printed
    printed = finish(sweeping)
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert [c["hyperparameters"]["scaling_factor"] for c in result["candidates"]] == [0.5, 1.0]
    best = result["candidates"][result["best"]["index"]]
    assert best["score"] == max(c["score"] for c in result["candidates"]) and "best (scaling_factor=" in printed
    written = load_file(tmp_path / "best.safetensors")
    expected = blockmerge.merge("task_arithmetic", models, base=base, **best["hyperparameters"])
    assert all(torch.equal(written[n], t) for n, t in expected.items())


# --- bad task files --------------------------------------------------------------------------------------------


def test_bad_task_files_give_one_line_errors(classifier, generators, tmp_path) -> None:
    tmp, directory, _ = classifier
    data = {"test": str(tmp / "test.jsonl")}
    cases = [
        ({"data": data, "text_column": "sentence", "label_column": "missing"}, r"column 'missing' not found"),
        ({"data": data, "text_column": "sentence", "label_column": "y", "metric": "bleu"}, r"unknown metric 'bleu'"),
        ({"data": data, "text_column": "sentence", "label_column": "y", "splits": {"validation": "validation"}},
         r"split 'validation' has no file"),
        ({"data": str(tmp / "test.jsonl"), "splits": {"validation": "validation"}, "text_column": "sentence",
          "label_column": "y"}, r"has no split 'test' \(declared: validation\)"),
        ({"data": data, "text_column": "sentence", "label_column": "y", "colour": "red"}, r"unknown task key 'colour'"),
        ({"data": data, "text_column": "sentence", "label_column": "y", "metric": ["accuracy", "token_loss"]},
         r"mix classification and sequence"),
        ({"data": data, "text_column": "sentence", "label_column": "y", "metric": "token_loss"},
         r"needs a target_column"),
        ({"data": data, "text_column": "sentence", "target_column": "sentence", "metric": "exact_match"},
         r"does not apply to a classification model"),
    ]
    for i, (keys, message) in enumerate(cases):
        path = write_task(tmp_path / f"bad{i}.json", **keys)
        with pytest.raises(BlockmergeError, match=message) as err:
            evaluate(directory, [path])
        message = str(err.value)
        assert "\n" not in message and (path.name in message or "test.jsonl" in message), message
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows_of(tmp / "test.jsonl"))}).save_to_disk(
        str(tmp_path / "dd"))
    path = write_task(tmp_path / "dd.json", data="dd", text_column="sentence", label_column="y")
    with pytest.raises(BlockmergeError, match=r"dd: unknown split 'test' \(available: \['train'\]\)"):
        evaluate(directory, [path])

    from click.testing import CliRunner

    from blockmerge.cli import main

    result = CliRunner().invoke(main, ["eval", str(directory), "--task", str(tmp_path / "bad1.json")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "unknown metric 'bleu'" in result.output
