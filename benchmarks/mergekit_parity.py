"""The same mergekit configurations through `blockmerge mergekit-yaml` and mergekit's `mergekit-yaml`, compared tensor
by tensor, on a locally built Llama family (float32 and bfloat16 checkpoints).

Builds a base (hidden 64, 4 layers, 4 heads / 2 KV heads, MLP 176, vocab 512, untied head, with a word-level
tokenizer) and three fine-tunes (base + N(0, 2e-3²)), saved by transformers in float32 and again in bfloat16.
Each configuration below (every merge method of mergekit, per-model parameters, layer gradients with name
filters, slices and tokenizer sources) is written as one YAML file and run by both tools (mergekit from its own
virtual environment, `--random-seed 0`). For each it prints the worst per-tensor relative error of blockmerge's
change to the base against mergekit's, ‖Δ_blockmerge − Δ_mergekit‖₂ / ‖Δ_mergekit‖₂ (of the tensors themselves
for configurations without a base) and the fraction of entries whose bits differ; for random methods (DARE,
DELLA) the fraction of entries each tool changes and the ratio of their L1 changes instead, as their masks come
from different generators. A configuration blockmerge refuses shows its one-line error. Results:
benchmarks/results/mergekit_parity.{md,json}.

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5
    python benchmarks/mergekit_parity.py --mergekit /tmp/mkvenv/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
DELTA_STD = 2e-3
NUM_MODELS = 3
DETERMINISTIC_BOUND = 1e-4  # worst relative error of a deterministic float32 merge
KEPT_FRACTION_BOUND = 0.005  # |blockmerge's changed fraction − mergekit's| of a random merge
FAMILY_VERSION = 2


@dataclass(frozen=True)
class Case:
    """One configuration: its label, whether its masks are random, and the YAML (with {base}, {m0}.. placeholders)."""

    label: str
    config: dict[str, Any]
    random: bool = False
    note: str = ""


def model(name: str, **parameters: Any) -> dict[str, Any]:
    return {"model": name, "parameters": parameters} if parameters else {"model": name}


ATTN_MLP = [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
            {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]}, {"value": 0.5}]
TA = {"base_model": "{base}",
      "models": [model("{m0}", weight=0.5), model("{m1}", weight=0.3), model("{m2}", weight=0.2)]}

CASES = [
    Case("linear, weights by filter and layer", {"merge_method": "linear", "models": [
        model("{m0}", weight=[{"filter": "self_attn", "value": [1.0, 0.2]}, {"value": 0.5}]),
        model("{m1}", weight=0.3), model("{m2}", weight=0.2)]}),
    Case("linear, normalize false", {"merge_method": "linear", "parameters": {"normalize": False},
                                     "models": [model("{m0}", weight=0.6), model("{m1}", weight=0.6)]}),
    Case("slerp, t by filter and layer", {"merge_method": "slerp", "base_model": "{m0}",
                                          "models": [model("{m0}"), model("{m1}")], "parameters": {"t": ATTN_MLP}}),
    Case("nuslerp of task vectors", {"merge_method": "nuslerp", "base_model": "{base}",
                                     "models": [model("{m0}", weight=0.7), model("{m1}", weight=0.3)]}),
    Case("nuslerp, rows", {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False},
                           "models": [model("{m0}", weight=0.4), model("{m1}", weight=0.6)]}),
    Case("task_arithmetic, lambda by layer", {**TA, "merge_method": "task_arithmetic",
                                              "parameters": {"lambda": [0.8, 1.2]}}),
    Case("task_arithmetic, normalize", {**TA, "merge_method": "task_arithmetic", "parameters": {"normalize": True}}),
    Case("ties, densities per model and filter", {"merge_method": "ties", "base_model": "{base}", "models": [
        model("{m0}", weight=0.5, density=[{"filter": "mlp", "value": [0.2, 0.6]}, {"value": 0.4}]),
        model("{m1}", weight=0.3, density=0.5), model("{m2}", weight=0.2, density=0.3)],
        "parameters": {"lambda": 0.9}}),
    Case("ties, normalize false", {**TA, "merge_method": "ties", "parameters": {"density": 0.3, "normalize": False}}),
    Case("breadcrumbs", {**TA, "merge_method": "breadcrumbs", "parameters": {"density": 0.8, "gamma": 0.05}}),
    Case("breadcrumbs_ties", {**TA, "merge_method": "breadcrumbs_ties",
                              "parameters": {"density": 0.7, "gamma": [0.02, 0.1]}}),
    Case("dare_linear", {**TA, "merge_method": "dare_linear", "parameters": {"density": 0.3}}, random=True),
    Case("dare_ties", {**TA, "merge_method": "dare_ties", "parameters": {"density": [0.3, 0.6]}}, random=True),
    Case("della", {**TA, "merge_method": "della", "parameters": {"density": 0.5, "epsilon": 0.15}}, random=True),
    Case("della_linear", {**TA, "merge_method": "della_linear", "parameters": {"density": 0.6, "epsilon": 0.2}},
         random=True),
    Case("model_stock", {"merge_method": "model_stock", "base_model": "{base}",
                         "models": [model("{m0}"), model("{m1}"), model("{m2}")]}),
    Case("nearswap", {"merge_method": "nearswap", "base_model": "{base}", "models": [model("{m0}")],
                      "parameters": {"t": 0.002}}),
    Case("multislerp", {"merge_method": "multislerp", "base_model": "{base}",
                        "models": [model("{m0}", weight=0.5), model("{m1}", weight=0.3), model("{m2}", weight=0.2)]}),
    Case("karcher", {"merge_method": "karcher", "models": [model("{m0}"), model("{m1}"), model("{m2}")]}),
    Case("sce", {**TA, "merge_method": "sce", "parameters": {"select_topk": 0.5}}),
    Case("arcee_fusion", {"merge_method": "arcee_fusion", "base_model": "{base}", "models": [model("{m0}")]}),
    Case("ram", {**TA, "merge_method": "ram"}),
    Case("ramplus_tl", {**TA, "merge_method": "ramplus_tl"}),
    Case("passthrough, slices (frankenmerge)", {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "{m0}", "layer_range": [0, 3]}]},
        {"sources": [{"model": "{m1}", "layer_range": [1, 4]}]}]}),
    Case("linear, tokenizer_source union", {"merge_method": "linear", "tokenizer_source": "union",
                                            "models": [model("{m0}", weight=0.5), model("{m1}", weight=0.5)]}),
    Case("linear, tokenizer_source a model", {"merge_method": "linear", "tokenizer_source": "{m1}",
                                              "models": [model("{m0}", weight=0.5), model("{m1}", weight=0.5)]}),
    Case("linear, union of different vocabularies", {"merge_method": "linear", "tokenizer_source": "union", "models": [
        model("{m0}", weight=0.5), model("{v1}", weight=0.3), model("{v2}", weight=0.2)]}),
    Case("task_arithmetic, union of different vocabularies", {
        "merge_method": "task_arithmetic", "base_model": "{base}", "tokenizer_source": "union",
        "models": [model("{m0}", weight=0.5), model("{v1}", weight=0.3), model("{v2}", weight=0.2)]}),
    Case("linear, tokenizer: a model's vocabulary, token rules, padding", {
        "merge_method": "linear", "models": [model("{m0}", weight=0.5), model("{v1}", weight=0.3),
                                             model("{v2}", weight=0.2)],
        "tokenizer": {"source": "{v2}", "pad_to_multiple_of": 64, "tokens": {
            "y3": {"source": "{v1}"}, "w5": {"source": {"kind": "zero"}, "force": True},
            "x7": {"source": {"kind": "model_token", "model": "{m0}", "token": "w9"}}}}}),
]
# Models of other vocabularies: v1 has m1's weights and the words w128.. plus y0..y127; v2 has m2's weights and
# the words ..w0 (reversed) plus x0..x127.
VOCABULARIES = {"v1": ("m1", [f"w{i}" for i in range(128, 512)] + [f"y{i}" for i in range(128)]),
                "v2": ("m2", [f"w{i}" for i in range(384)][::-1] + [f"x{i}" for i in range(128)])}


def build_family(root: Path, dtype: str) -> dict[str, Path]:
    """base/ and m0..m2/ as Hugging Face directories in `dtype`, with the base's tokenizer, and v1, v2 (weights of
    m1, m2 with other vocabularies); reused when complete."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    stamp = root / "family.json"
    identity = {"version": FAMILY_VERSION, "dtype": dtype, "delta_std": DELTA_STD}
    dirs = {"base": root / "base", **{f"m{t}": root / f"m{t}" for t in range(NUM_MODELS)}}
    others = {name: root / name for name in VOCABULARIES}
    if stamp.is_file() and json.loads(stamp.read_text()) == identity:
        return {**dirs, **others}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(getattr(torch, dtype))
    def word_level(words: list[str]) -> Any:
        model = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
        model.pre_tokenizer = WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=model)

    tokenizer = word_level([f"w{i}" for i in range(config.vocab_size)])
    generator = torch.Generator().manual_seed(1)
    state = {n: t.float() for n, t in base.state_dict().items()}
    for name, d in dirs.items():
        if name != "base":
            with torch.no_grad():
                for n, p in base.named_parameters():
                    p.copy_(state[n] + DELTA_STD * torch.randn(p.shape, generator=generator))
        base.save_pretrained(d)
        tokenizer.save_pretrained(d)
    for name, (weights, words) in VOCABULARIES.items():
        shutil.copytree(dirs[weights], others[name])
        for f in others[name].iterdir():
            if "token" in f.name:
                f.unlink()
        word_level(words).save_pretrained(others[name])
    stamp.write_text(json.dumps(identity))
    return {**dirs, **others}


def write_config(case: Case, dirs: dict[str, Path], dtype: str, path: Path) -> Path:
    import yaml

    text = json.dumps(case.config)
    for name, d in dirs.items():
        text = text.replace("{" + name + "}", str(d))
    config = {**json.loads(text), "dtype": "float32"}
    if dtype != "float32":
        config["out_dtype"] = dtype
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(argv: list[str]) -> tuple[int, float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    return done.returncode, time.perf_counter() - start, done.stdout + done.stderr


def load(d: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for p in sorted(d.glob("*.safetensors")):
        tensors.update(load_file(p))
    return tensors


@dataclass
class Row:
    dtype: str
    label: str
    method: str
    random: bool
    status: str = "compared"
    worst_relative_error: float | None = None
    worst_tensor: str | None = None
    changed_fraction: dict[str, float] = field(default_factory=dict)
    l1_change_ratio: float | None = None
    differing_fraction: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def vocabulary(d: Path) -> dict[str, int] | None:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d).get_vocab() if (d / "tokenizer_config.json").is_file() else None


def in_our_order(a: dict[str, Any], b: dict[str, Any], reference: dict[str, Any], ours: Path, theirs: Path,
                 base: Path | None) -> None:
    """mergekit's embedding rows put in blockmerge's token order where the two order the same tokens differently
    (mergekit's union follows the order of a set), and the base's rows in that order where its vocabulary is
    another (rows of tokens the base lacks: zero)."""
    import torch

    va, vb = vocabulary(ours), vocabulary(theirs)
    if va is None or vb is None or set(va) != set(vb):
        return
    vbase = vocabulary(base) if base is not None else None
    for name, x in a.items():
        if x.dim() != 2 or x.shape[0] < len(va) or name not in b or b[name].shape != x.shape:
            continue
        if va != vb:
            rows = list(range(x.shape[0]))
            for token, i in va.items():
                rows[i] = vb[token]
            b[name] = b[name][rows]
        if name in reference and vbase is not None and reference[name].shape != x.shape:
            rebuilt = torch.zeros_like(x)
            for token, i in va.items():
                if token in vbase and vbase[token] < reference[name].shape[0]:
                    rebuilt[i] = reference[name][vbase[token]]
            reference[name] = rebuilt


def compare(row: Row, ours: Path, theirs: Path, base: Path | None) -> None:
    """Fill the row's error (deterministic) or changed fractions and L1 ratio (random) from the two outputs."""
    a, b = load(ours), load(theirs)
    reference = load(base) if base is not None else {}
    in_our_order(a, b, reference, ours, theirs, base)
    if set(a) != set(b):
        row.status, row.error = "different tensors", f"only blockmerge: {sorted(set(a) - set(b))[:3]}, " \
                                                     f"only mergekit: {sorted(set(b) - set(a))[:3]}"
        return
    worst, changed, l1 = 0.0, {"blockmerge": 0, "mergekit": 0}, {"blockmerge": 0.0, "mergekit": 0.0}
    total = differing = 0
    for name in sorted(a):
        x, y = a[name].double(), b[name].double()
        if x.shape != y.shape:
            row.status, row.error = "different shapes", f"{name}: {list(x.shape)} vs {list(y.shape)}"
            return
        zero = reference[name].double() if name in reference and reference[name].shape == x.shape else 0 * y
        dx, dy = x - zero, y - zero
        error = float((dx - dy).norm() / dy.norm()) if float(dy.norm()) > 0 else float((dx - dy).norm())
        if error > worst:
            worst, row.worst_tensor = error, name
        differing += int((a[name] != b[name]).sum())
        changed["blockmerge"] += int((dx != 0).sum())
        changed["mergekit"] += int((dy != 0).sum())
        l1["blockmerge"] += float(dx.abs().sum())
        l1["mergekit"] += float(dy.abs().sum())
        total += x.numel()
    row.worst_relative_error = worst
    row.changed_fraction = {k: v / total for k, v in changed.items()}
    row.l1_change_ratio = l1["blockmerge"] / l1["mergekit"] if l1["mergekit"] else None
    row.differing_fraction = differing / total


def reason(line: str) -> str:
    """An error line without the tool's prefix, the file's path and the list of what is supported."""
    line = re.sub(r"^blockmerge: error: \S+\.yml: ", "", line)
    return re.sub(r" \(supported: [^)]*\)", "", line)


def one_case(case: Case, dirs: dict[str, Path], dtype: str, work: Path, mergekit: str) -> Row:
    config = write_config(case, dirs, dtype, work / "config.yml")
    row = Row(dtype, case.label, case.config["merge_method"], case.random)
    outs = {"blockmerge": work / "blockmerge", "mergekit": work / "mergekit"}
    for o in outs.values():
        shutil.rmtree(o, ignore_errors=True)
    argv = {"blockmerge": [sys.executable, "-m", "blockmerge", "mergekit-yaml", str(config), str(outs["blockmerge"]),
                           "--random-seed", "0", "--quiet"],
            "mergekit": [mergekit, str(config), str(outs["mergekit"]), "--random-seed", "0", "--quiet"]}
    for tool in ("blockmerge", "mergekit"):
        code, seconds, text = run(argv[tool])
        row.seconds[tool] = seconds
        if code != 0:
            lines = [ln for ln in text.strip().splitlines() if ln.strip()]
            row.status = "refused by blockmerge" if tool == "blockmerge" else "mergekit failed"
            row.error = reason(lines[-1]) if lines else f"exit {code}"
            return row
    base = dirs["base"] if "base_model" in case.config else None
    compare(row, outs["blockmerge"], outs["mergekit"], base)
    return row


def verdict(row: Row) -> str:
    if row.status != "compared":
        return row.status
    if row.random:
        gap = abs(row.changed_fraction["blockmerge"] - row.changed_fraction["mergekit"])
        return "ok" if gap <= KEPT_FRACTION_BOUND else "over"
    if row.dtype != "float32":
        return "-"
    return "ok" if row.worst_relative_error <= DETERMINISTIC_BOUND else "over"


def markdown(rows: list[Row], version: str) -> str:
    lines = [f"# blockmerge vs mergekit {version}: the same configurations, tensor by tensor", "",
             f"Deterministic merges: worst per-tensor relative error of the change to the base (≤ "
             f"{DETERMINISTIC_BOUND:g} in float32). Random merges (DARE, DELLA): the fraction of entries each tool "
             f"changes (within {KEPT_FRACTION_BOUND:.1%} of each other) and the ratio of their L1 changes.", "",
             "| dtype | configuration | worst rel. error | entries that differ | changed: blockmerge / mergekit | "
             "L1 ratio | time (s) blockmerge / mergekit | verdict |", "|" + " --- |" * 8]
    for r in rows:
        if r.status != "compared":
            lines.append(f"| {r.dtype} | {r.label} | {r.status}: `{r.error}` | | | | | |")
            continue
        changed = f"{r.changed_fraction['blockmerge']:.4f} / {r.changed_fraction['mergekit']:.4f}"
        ratio = f"{r.l1_change_ratio:.4f}" if r.l1_change_ratio is not None else "-"
        error = "-" if r.random else f"{r.worst_relative_error:.2e}"
        times = f"{r.seconds['blockmerge']:.1f} / {r.seconds['mergekit']:.1f}"
        lines.append(f"| {r.dtype} | {r.label} | {error} | {r.differing_fraction:.2e} | {changed} | {ratio} | {times} "
                     f"| {verdict(r)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", required=True, help="mergekit-yaml of mergekit's own virtual environment")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/blockmerge-parity"))
    parser.add_argument("--only", nargs="*", help="labels (substrings) of the configurations to run")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args()
    pip = Path(args.mergekit).parent / "pip"
    shown = subprocess.run([str(pip), "show", "mergekit"], capture_output=True, text=True).stdout
    version = next((ln.split(":", 1)[1].strip() for ln in shown.splitlines() if ln.startswith("Version:")), "?")
    rows = []
    for dtype in args.dtypes:
        dirs = build_family(args.work / f"family-{dtype}", dtype)
        for case in CASES:
            if args.only and not any(o in case.label for o in args.only):
                continue
            row = one_case(case, dirs, dtype, args.work, args.mergekit)
            rows.append(row)
            shown_error = f"{row.worst_relative_error:.2e}" if row.worst_relative_error is not None else row.error
            print(f"{dtype:9s} {case.label:40s} {row.status:22s} {shown_error} {verdict(row)}", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "mergekit_parity.md").write_text(markdown(rows, version))
    (args.results / "mergekit_parity.json").write_text(json.dumps(
        {"mergekit": version, "bounds": {"deterministic": DETERMINISTIC_BOUND, "kept_fraction": KEPT_FRACTION_BOUND},
         "rows": [r.__dict__ for r in rows]}, indent=1))
    print(markdown(rows, version))


if __name__ == "__main__":
    main()
