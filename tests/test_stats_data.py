"""Task loading and batching for statistics (blockmerge.stats.data), and the tiny models/tokenizers the
statistics tests share (built offline from small configs; nothing is downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from blockmerge.errors import BlockmergeError
from blockmerge.stats.data import TaskSpec, batches, load_task

WORDS = "the a cat dog sat on mat ran fast slow red blue green big small happy sad yes no maybe".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
VOCAB = len(SPECIAL) + len(WORDS)
PAD, CLS, SEP, EOS = 0, 2, 3, 4
KINDS = ("classification", "seq2seq", "causal_lm")


def tiny_tokenizer(kind: str):
    """A word-level fast tokenizer over WORDS: BERT-style [CLS]/[SEP] for classification, '</s>' appended for
    seq2seq, nothing added for causal LM (its EOS is '</s>')."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(SPECIAL + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    if kind == "classification":
        tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]",
                                       model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    if kind == "seq2seq":
        tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>",
                                   model_input_names=["input_ids", "attention_mask"])


def tiny_model(kind: str, seed: int = 0):
    """BertForSequenceClassification (3 labels), T5ForConditionalGeneration or GPT2LMHeadModel, d=16, 1 layer."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(seed)
    if kind == "classification":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64, num_labels=3, pad_token_id=PAD))
    elif kind == "seq2seq":
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
            decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=128,
                                           bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD))
    return model.eval()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Examples of different lengths (so batches are padded), labels in {0, 1, 2}, short target texts."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choices(WORDS, k=rng.randint(1, 9))), "label": rng.randint(0, 2),
             "target": " ".join(rng.choices(WORDS, k=rng.randint(1, 5))),
             "pair": " ".join(rng.choices(WORDS, k=rng.randint(1, 3)))} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task(tmp_path: Path, kind: str, n: int = 6, seed: int = 0) -> tuple:
    """(dataset, tokenizer, spec) of a JSONL task written to tmp_path."""
    spec = TaskSpec(data=str(write_jsonl(tmp_path / f"{kind}.jsonl", make_rows(n, seed))),
                    target_column=None if kind == "classification" else "target")
    return load_task(spec), tiny_tokenizer(kind), spec


# --- loading ---------------------------------------------------------------------------------------------


def test_load_jsonl_csv_parquet_and_slices(tmp_path):
    rows = make_rows(10)
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = load_task(TaskSpec(data=str(jsonl)))
    assert len(ds) == 10 and ds[3]["text"] == rows[3]["text"]
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    assert load_task(TaskSpec(data=str(csv)))["label"] == [r["label"] for r in rows]
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert len(load_task(TaskSpec(data=str(tmp_path / "d.parquet"), split="validation"))) == 10
    assert load_task(TaskSpec(data=str(jsonl), split="train[2:5]"))["text"] == [r["text"] for r in rows[2:5]]
    assert load_task(TaskSpec(data=str(jsonl), split="train[-3:]"))["text"] == [r["text"] for r in rows[-3:]]
    assert len(load_task(TaskSpec(data=str(jsonl), split="train[:50%]"))) == 5


def test_save_to_disk_and_task_file(tmp_path):
    import datasets

    rows = make_rows(4)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_task(TaskSpec(data=str(tmp_path / "dd"), split="validation"))) == 2
    with pytest.raises(BlockmergeError, match=r"dd.*unknown split 'test'"):
        load_task(TaskSpec(data=str(tmp_path / "dd"), split="test"))
    write_jsonl(tmp_path / "t.jsonl", rows)
    (tmp_path / "task.yaml").write_text("data: t.jsonl\nsplit: train[:3]\ntarget_column: target\nmax_length: 16\n")
    spec = TaskSpec.from_file(tmp_path / "task.yaml")
    assert spec.data == str(tmp_path / "t.jsonl") and spec.max_length == 16
    assert len(load_task(spec)) == 3
    (tmp_path / "bad.yaml").write_text("data: t.jsonl\ntext_colum: x\n")
    with pytest.raises(BlockmergeError, match="bad.yaml.*unknown task keys.*text_colum"):
        TaskSpec.from_file(tmp_path / "bad.yaml")


def test_missing_file(tmp_path):
    with pytest.raises(BlockmergeError, match=r"nope\.jsonl: data file not found"):
        load_task(TaskSpec(data=str(tmp_path / "nope.jsonl")))
    with pytest.raises(BlockmergeError, match="unknown data format"):
        load_task(TaskSpec(data=str(write_jsonl(tmp_path / "d.txt", make_rows(2)))))


def test_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", make_rows(3))
    with pytest.raises(BlockmergeError, match=r"d\.jsonl: column 'sentence' not found"):
        load_task(TaskSpec(data=str(path), text_column="sentence"))
    with pytest.raises(BlockmergeError, match=r"d\.jsonl: column 'answer' not found"):
        load_task(TaskSpec(data=str(path), target_column="answer"))
    ds = load_task(TaskSpec(data=str(path)))  # batches checks the columns of its own spec too
    with pytest.raises(BlockmergeError, match=r"d\.jsonl: a seq2seq task needs a target_column"):
        next(batches(ds, tiny_tokenizer("seq2seq"), TaskSpec(data=str(path)), "seq2seq", 2))


def test_empty_split(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(BlockmergeError, match=r"empty\.jsonl: split 'train' is empty"):
        load_task(TaskSpec(data=str(tmp_path / "empty.jsonl")))
    path = write_jsonl(tmp_path / "d.jsonl", make_rows(3))
    with pytest.raises(BlockmergeError, match=r"d\.jsonl: split 'train\[5:\]' is empty"):
        load_task(TaskSpec(data=str(path), split="train[5:]"))


def test_labels_out_of_range_for_the_head(tmp_path):
    rows = make_rows(5)
    rows[3]["label"] = 3
    spec = TaskSpec(data=str(write_jsonl(tmp_path / "d.jsonl", rows)))
    ds = load_task(spec)
    with pytest.raises(BlockmergeError, match=r"d\.jsonl: column 'label': example 3 has label 3, outside the 3 class"):
        next(batches(ds, tiny_tokenizer("classification"), spec, "classification", 2, num_labels=3))
    rows[3]["label"] = "pos"
    spec = TaskSpec(data=str(write_jsonl(tmp_path / "s.jsonl", rows)))
    with pytest.raises(BlockmergeError, match=r"s\.jsonl: column 'label': example 3 has label 'pos', not an integer"):
        next(batches(load_task(spec), tiny_tokenizer("classification"), spec, "classification", 2))
    # the model checks too, without a data file: fisher names the example
    from blockmerge.stats.fisher import fisher

    bad = {"input_ids": torch.tensor([[CLS, 5, SEP]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
           "labels": torch.tensor([7]), "index": torch.tensor([0])}
    with pytest.raises(BlockmergeError, match="example 0: label 7 is outside the 3 classes"):
        fisher(tiny_model("classification"), [bad])


# --- batching --------------------------------------------------------------------------------------------


def test_classification_batches(tmp_path):
    ds, tok, spec = task(tmp_path, "classification", n=5)
    out = list(batches(ds, tok, spec, "classification", 2, num_examples=5))
    assert [b["input_ids"].shape[0] for b in out] == [2, 2, 1]
    rows = make_rows(5)
    for b, start in zip(out, (0, 2, 4)):
        assert b["index"].tolist() == list(range(start, start + b["input_ids"].shape[0]))
        assert b["labels"].tolist() == [r["label"] for r in rows[start:start + 2]]
        for i, row in enumerate(rows[start:start + 2]):
            n = len(row["text"].split()) + 2
            assert b["attention_mask"][i].sum() == n
            assert b["input_ids"][i, 0] == CLS and b["input_ids"][i, n - 1] == SEP
            assert (b["input_ids"][i, n:] == PAD).all()
    pair = list(batches(ds, tok, TaskSpec(data=spec.data, text_pair_column="pair"), "classification", 3, 3))
    assert (pair[0]["token_type_ids"].sum(1) > 0).all()
    assert sum(b["input_ids"].shape[0] for b in batches(ds, tok, spec, "classification", 4, 3)) == 3


def test_seq2seq_batches(tmp_path):
    ds, tok, spec = task(tmp_path, "seq2seq", n=4)
    (b,) = batches(ds, tok, spec, "seq2seq", 4)
    rows = make_rows(4)
    for i, row in enumerate(rows):
        n = len(row["target"].split()) + 1  # + '</s>'
        assert b["decoder_attention_mask"][i].sum() == n
        assert b["labels"][i, n - 1] == EOS and (b["labels"][i, n:] == -100).all()
        assert b["attention_mask"][i].sum() == len(row["text"].split()) + 1


def test_causal_lm_batches_mask_only_the_target(tmp_path):
    ds, tok, spec = task(tmp_path, "causal_lm", n=4)
    (b,) = batches(ds, tok, spec, "causal_lm", 4)
    rows = make_rows(4)
    for i, row in enumerate(rows):
        p, t = len(row["text"].split()), len(row["target"].split()) + 1  # + EOS
        assert b["attention_mask"][i].sum() == p + t
        assert b["target_mask"][i].tolist() == [0] * p + [1] * t + [0] * (b["input_ids"].shape[1] - p - t)
        assert tok.decode(b["input_ids"][i, p:p + t - 1].tolist()) == row["target"]
        assert b["input_ids"][i, p + t - 1] == EOS
    short = TaskSpec(data=spec.data, target_column="target", max_length=4)  # the prompt is cut from the left
    for b in batches(ds, tok, short, "causal_lm", 2):
        assert b["input_ids"].shape[1] <= 4
        assert (b["attention_mask"] - b["target_mask"]).sum(1).min() >= 1
