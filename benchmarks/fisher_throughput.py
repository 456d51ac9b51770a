"""Throughput of the diagonal Fisher: vmap over per-example gradients at a batch size vs the batch-1 loop.

    python benchmarks/fisher_throughput.py --batch-sizes 1 4 16 --examples 128

Builds a small BERT-style classifier from a config (no downloads), writes a table to
benchmarks/results/fisher_throughput.md and checks that every batch size gives the same Fisher.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from blockmerge.stats.fisher import fisher

RESULTS = Path(__file__).parent / "results"


def build(hidden: int, layers: int, vocab: int, seq_len: int, examples: int, seed: int) -> tuple:
    """A random BertForSequenceClassification and a list of single examples."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 32), intermediate_size=4 * hidden, num_labels=4)
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (examples,), generator=g)
    rows = []
    for i, n in enumerate(lengths.tolist()):
        ids = torch.zeros(seq_len, dtype=torch.long)
        ids[:n] = torch.randint(5, vocab, (n,), generator=g)
        mask = (torch.arange(seq_len) < n).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(i % 4),
                     "index": torch.tensor(i)})
    return model, rows


def batched(rows: list[dict], size: int) -> list[dict[str, torch.Tensor]]:
    return [{k: torch.stack([r[k] for r in rows[i:i + size]]) for k in rows[0]} for i in range(0, len(rows), size)]


def measure(model, rows: list[dict], batch_size: int, repeats: int) -> tuple[float, dict]:
    """Best-of-`repeats` seconds and the Fisher at one batch size (batch 1 is the plain per-example loop)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fisher(model, batched(rows, batch_size), vectorize=batch_size > 1)
        best = min(best, time.perf_counter() - start)
    return best, result.tensors["fisher"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, rows = build(args.hidden, args.layers, args.vocab, args.seq_len, args.examples, seed=0)
    params = sum(p.numel() for p in model.parameters())
    timings, reference = {}, None
    for size in args.batch_sizes:
        seconds, tensors = measure(model, rows, size, args.repeats)
        if reference is None:
            reference, max_diff = tensors, 0.0
        else:
            scale = max(float(t.abs().max()) for t in reference.values())
            max_diff = max(float((tensors[n] - reference[n]).abs().max()) for n in reference) / scale
        timings[size] = (seconds, max_diff)
        print(f"batch {size:3d}: {seconds:7.2f} s, {args.examples / seconds:7.1f} examples/s, "
              f"max difference to batch {args.batch_sizes[0]} (relative to the largest entry): {max_diff:.1e}")
    base = timings[args.batch_sizes[0]][0]
    lines = ["# Diagonal Fisher throughput", "",
             f"`python benchmarks/fisher_throughput.py {' '.join(sys.argv[1:])}`",
             "",
             f"BertForSequenceClassification from a config: hidden {args.hidden}, {args.layers} layers, vocab "
             f"{args.vocab}, {params / 1e6:.2f} M parameters, {args.examples} examples of up to {args.seq_len} "
             f"tokens; best of {args.repeats}. {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}.", "",
             "| batch size | seconds | examples/s | speed-up vs batch 1 loop | max difference / largest entry |",
             "|---:|---:|---:|---:|---:|"]
    for size, (seconds, diff) in timings.items():
        lines.append(f"| {size} | {seconds:.2f} | {args.examples / seconds:.1f} | {base / seconds:.2f}× | {diff:.1e} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fisher_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
