"""A tiny model family for trying blockmerge with git-theta (used by examples/git_theta_walkthrough.sh).

    python3 -m blockmerge.gittheta.example DIR --tasks a b c

writes DIR/base/ (a small `LlamaForCausalLM` with a word-level tokenizer, as a Hugging Face directory) and,
per task, DIR/task-a.jsonl (its sequences, `prompt`/`target` columns) and DIR/task-a/model.safetensors (the
base fine-tuned on them for a few steps). Task `a`, `b`, `c`, ... maps each token to the one shifted by
1, 2, 3, ... (mod the vocabulary). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VOCAB = 32
LENGTH = 8


def base(directory: Path, seed: int = 0) -> None:
    """Save a freshly initialised tiny model and its tokenizer to `directory`."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=2 * LENGTH,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)
    words = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    words.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", eos_token="t0").save_pretrained(directory)


def task_rows(task: str, count: int, seed: int = 0) -> list[dict[str, str]]:
    """`count` sequences of a task: a random first token, then x -> x + shift (mod VOCAB)."""
    import torch

    shift = ord(task) - ord("a") + 1
    generator = torch.Generator().manual_seed(seed + shift)
    rows = []
    for start in torch.randint(0, VOCAB, (count,), generator=generator).tolist():
        words = [f"t{(start + i * shift) % VOCAB}" for i in range(LENGTH)]
        rows.append({"prompt": words[0], "target": " ".join(words[1:])})
    return rows


def finetune(directory: Path, task: str, data: Path, out: Path, steps: int = 10, count: int = 32) -> None:
    """Write the task's data file, train the model in `directory` on it for a few steps, save the weights to `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    rows = task_rows(task, count)
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = LlamaForCausalLM.from_pretrained(directory)
    ids = torch.tensor([tokenizer(f"{r['prompt']} {r['target']}")["input_ids"] for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for step in range(steps):
        batch = ids[(step * 8) % count:][:8]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m blockmerge.gittheta.example")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--tasks", nargs="+", default=["a", "b", "c"], help="task names (single letters)")
    args = parser.parse_args()
    base(args.directory / "base")
    for task in args.tasks:
        (args.directory / f"task-{task}").mkdir(parents=True, exist_ok=True)
        finetune(args.directory / "base", task, args.directory / f"task-{task}.jsonl",
                 out=args.directory / f"task-{task}")


if __name__ == "__main__":
    main()
