"""`blockmerge stats` end to end: a saved transformers model and a data file in, a statistics store out."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from test_stats_data import tiny_model, tiny_tokenizer

from blockmerge.cli import main
from blockmerge.engine.sources import open_statistics
from blockmerge.stats.data import TaskSpec, batches, load_task
from blockmerge.stats.fisher import fisher
from blockmerge.stats.gram import gram

SENTENCES = ["the cat sat on the mat", "a dog ran fast", "big red dog", "the small happy cat sat",
             "yes", "no maybe", "green mat", "a sad blue dog ran slow on the mat"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats-cli")
    out = {}
    for kind in ("classification", "seq2seq"):
        model, tokenizer = tiny_model(kind), tiny_tokenizer(kind)
        model.save_pretrained(tmp / kind)
        tokenizer.save_pretrained(tmp / kind)
        out[kind] = tmp / kind
    with open(tmp / "cls.jsonl", "w") as f:
        for i, s in enumerate(SENTENCES):
            f.write(json.dumps({"text": s, "label": i % 3}) + "\n")
    with open(tmp / "s2s.jsonl", "w") as f:
        for i, s in enumerate(SENTENCES):
            f.write(json.dumps({"text": s, "target": SENTENCES[(i + 1) % len(SENTENCES)]}) + "\n")
    return tmp, out


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result


def read_all(store) -> dict[str, dict[str, torch.Tensor]]:
    return {k: {n: c.read(n, 0, c.specs[n].rows) for n in c.specs} for k, c in open_statistics(store, "s").items()}


def test_stats_fisher_and_gram_of_a_classifier_match_the_python_api(saved):
    tmp, dirs = saved
    task = TaskSpec(data=str(tmp / "cls.jsonl"))
    invoke("stats", "fisher", "--model", str(dirs["classification"]), "--data", task.data, "--batch-size", "3",
           "--out", str(tmp / "f.store"))
    invoke("stats", "gram", "--model", str(dirs["classification"]), "--data", task.data, "--outputs",
           "--out", str(tmp / "g.store"))
    model, tokenizer = tiny_model("classification"), tiny_tokenizer("classification")
    data = list(batches(load_task(task), tokenizer, task, "classification", 1))
    want_f = fisher(model, data).tensors
    want_g = gram(model, data, inputs=True, outputs=True).tensors
    got_f, got_g = read_all(tmp / "f.store"), read_all(tmp / "g.store")
    assert set(got_f) == {"fisher"} and set(got_g) == {"gram_in", "gram_out"}
    for got, want in ((got_f, want_f), (got_g, want_g)):
        for kind in want:
            assert set(got[kind]) == set(want[kind])
            for name, t in want[kind].items():
                torch.testing.assert_close(got[kind][name], t, rtol=1e-5, atol=1e-7)
    meta = json.loads((tmp / "f.store" / "blockmerge.json").read_text())["metadata"]["statistics"]
    assert meta["examples"] == len(SENTENCES) and meta["labels"] == "empirical" and len(meta["model_sha256"]) == 64


def test_stats_of_a_seq2seq_model_from_a_task_file(saved, tmp_path):
    tmp, dirs = saved
    (tmp_path / "task.yaml").write_text(f"data: {tmp / 's2s.jsonl'}\ntarget_column: target\nlabel_column: null\n")
    invoke("stats", "fisher", "--model", str(dirs["seq2seq"]), "--task", str(tmp_path / "task.yaml"),
           "--labels", "sampled", "--num-examples", "4", "--out", str(tmp_path / "f"))
    invoke("stats", "gram", "--model", str(dirs["seq2seq"]), "--task", str(tmp_path / "task.yaml"),
           "--outputs", "--max-memory", "4KiB", "--out", str(tmp_path / "g"))
    f, g = read_all(tmp_path / "f"), read_all(tmp_path / "g")
    assert f["fisher"] and all(bool((t >= 0).all()) for t in f["fisher"].values())
    assert g["gram_in"] and g["gram_out"]
    meta = json.loads((tmp_path / "f" / "blockmerge.json").read_text())["metadata"]["statistics"]
    assert meta["examples"] == 4 and meta["labels"] == "sampled" and meta["target_tokens"] > 0


def test_bad_statistics_input_is_one_line_and_leaves_no_store(saved, tmp_path):
    tmp, dirs = saved
    result = CliRunner().invoke(main, ["stats", "fisher", "--model", str(dirs["classification"]),
                                       "--data", str(tmp / "cls.jsonl"), "--label-column", "missing",
                                       "--out", str(tmp_path / "f")])
    assert result.exit_code == 2 and "missing" in result.output and "cls.jsonl" in result.output
    assert list(tmp_path.iterdir()) == []
    not_a_model = tmp_path / "not-a-model"  # (an output inside the model directory would be refused first)
    not_a_model.mkdir()
    result = CliRunner().invoke(main, ["stats", "fisher", "--model", str(not_a_model), "--data",
                                       str(tmp / "cls.jsonl"), "--out", str(tmp_path / "f")])
    assert result.exit_code == 2 and "not a model directory" in result.output


def test_stats_gram_modules_restricts_the_linear_layers(saved):
    tmp, dirs = saved
    task = TaskSpec(data=str(tmp / "cls.jsonl"))
    invoke("stats", "gram", "--model", str(dirs["classification"]), "--data", task.data, "--outputs",
           "--modules", ".*query|(?!classifier).*dense", "--out", str(tmp / "gm.store"))
    got = read_all(tmp / "gm.store")
    model, tokenizer = tiny_model("classification"), tiny_tokenizer("classification")
    data = list(batches(load_task(task), tokenizer, task, "classification", 1))
    want = gram(model, data, inputs=True, outputs=True, modules=".*query|(?!classifier).*dense").tensors
    assert set(got) == {"gram_in", "gram_out"} and set(got["gram_in"]) == set(want["gram_in"])
    names = set(got["gram_in"])
    assert names and all(n.endswith((".query.weight", ".dense.weight")) for n in names)
    assert not any(n.startswith("classifier") for n in names)
    everything = gram(model, data, inputs=True).tensors["gram_in"]
    assert names < set(everything)
    for kind in want:
        for name, t in want[kind].items():
            torch.testing.assert_close(got[kind][name], t, rtol=1e-5, atol=1e-7)
    bad = CliRunner().invoke(main, ["stats", "gram", "--model", str(dirs["classification"]), "--data", task.data,
                                    "--modules", "(unclosed", "--out", str(tmp / "bad.store")])
    assert bad.exit_code != 0 and "bad modules regex" in bad.output and len(bad.output.strip().splitlines()) == 1
