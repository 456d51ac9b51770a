"""Every configuration in a mergekit checkout (its `examples/*.yml`, and the complete configurations in its
Markdown docs) through `blockmerge mergekit-yaml`, each model name replaced by a local model of the same
architecture (Mistral where the name says so, else Llama) with as many layers as the configuration's layer
ranges need (hidden 64, untied head, base + N(0, 2e-3²) per name). With `--mergekit` the same files also run
through mergekit, asked for float32 arithmetic as blockmerge does (mergekit computes in the file's `dtype`,
so `dtype: float16` becomes `dtype: float32, out_dtype: float16` for it), and the outputs are compared as
benchmarks/mergekit_parity.py compares them.
Results: benchmarks/results/mergekit_examples.{md,json}.

    git clone https://github.com/arcee-ai/mergekit /tmp/mergekit-src
    python benchmarks/mergekit_examples.py --mergekit-repo /tmp/mergekit-src --mergekit /tmp/mkvenv/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import mergekit_parity as parity
import yaml

MIN_LAYERS = 4


def configurations(repo: Path) -> list[tuple[str, dict[str, Any]]]:
    """(label, configuration) of every example file and every complete configuration in the Markdown files."""
    found = []
    for path in sorted((repo / "examples").glob("*.y*ml")):
        found.append((f"examples/{path.name}", yaml.safe_load(path.read_text())))
    for path in sorted([*repo.glob("*.md"), *repo.glob("docs/*.md")]):
        for i, block in enumerate(re.findall(r"```ya?ml\n(.*?)```", path.read_text(), re.S)):
            try:
                config = yaml.safe_load(block)
            except yaml.YAMLError:
                continue
            if isinstance(config, dict) and "merge_method" in config:
                found.append((f"{path.relative_to(repo)} block {i + 1}", config))
    return found


def references(node: Any) -> set[str]:
    """The model names a configuration mentions."""
    if isinstance(node, dict):
        names = {v for k, v in node.items() if k in ("model", "base_model") and isinstance(v, str)}
        return names | {n for v in node.values() for n in references(v)}
    if isinstance(node, list):
        return {n for v in node for n in references(v)}
    return set()


def replaced(node: Any, paths: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: paths[v] if k in ("model", "base_model") and isinstance(v, str) else replaced(v, paths)
                for k, v in node.items()}
    if isinstance(node, list):
        return [replaced(v, paths) for v in node]
    return node


def layer_count(node: Any) -> int:
    if isinstance(node, dict):
        own = node["layer_range"][1] if isinstance(node.get("layer_range"), list) else 0
        return max([own, *(layer_count(v) for v in node.values())])
    if isinstance(node, list):
        return max([0, *(layer_count(v) for v in node)])
    return 0


def local_models(names: set[str], layers: int, root: Path) -> dict[str, str]:
    """A local directory for each name: one architecture and layer count for the whole configuration."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    mistral = any("mistral" in n.lower() for n in names)
    kind, config_class, model_class = (("mistral", MistralConfig, MistralForCausalLM) if mistral
                                       else ("llama", LlamaConfig, LlamaForCausalLM))
    family = root / f"{kind}-{layers}"
    config = config_class(hidden_size=64, intermediate_size=176, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = model_class(config)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    paths = {}
    for name in sorted(names):
        target = family / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        if not (target / "config.json").is_file():
            seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(state[n] + parity.DELTA_STD * torch.randn(p.shape, generator=generator))
            model.save_pretrained(target)
        paths[name] = str(target)
    return paths


def float32_arithmetic(config: dict[str, Any], paths: dict[str, str], work: Path) -> Path:
    """The configuration for mergekit with float32 arithmetic (blockmerge's) and the file's output dtype."""
    changed = replaced(config, paths)
    if changed.get("dtype") not in (None, "float32"):
        changed["out_dtype"] = changed.get("out_dtype") or changed["dtype"]
        changed["dtype"] = "float32"
    path = work / "config-float32-arithmetic.yml"
    path.write_text(yaml.safe_dump(changed, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-repo", type=Path, required=True, help="a checkout of mergekit's repository")
    parser.add_argument("--mergekit", help="mergekit-yaml of mergekit's own virtual environment (to compare)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/blockmerge-examples"))
    parser.add_argument("--results", type=Path, default=parity.DEFAULT_RESULTS)
    args = parser.parse_args()
    rows = []
    for label, config in configurations(args.mergekit_repo):
        names = references(config)
        layers = max(MIN_LAYERS, layer_count(config))
        paths = local_models(names, layers, args.work / "models")
        work = args.work / re.sub(r"[^A-Za-z0-9_.-]", "_", label)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        path = work / "config.yml"
        path.write_text(yaml.safe_dump(replaced(config, paths), sort_keys=False))
        row = {"configuration": label, "method": config.get("merge_method"), "layers": layers}
        out = work / "blockmerge"
        code, seconds, text = parity.run([sys.executable, "-m", "blockmerge", "mergekit-yaml", str(path), str(out),
                                          "--quiet"])
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        row.update(status="ran" if code == 0 else "refused", seconds=round(seconds, 2),
                   error=None if code == 0 else parity.reason(lines[-1] if lines else f"exit {code}"))
        if code == 0 and args.mergekit:
            theirs = work / "mergekit"
            mk_code, _, mk_text = parity.run([args.mergekit, str(float32_arithmetic(config, paths, work)), str(theirs),
                                              "--random-seed", "0", "--quiet"])
            if mk_code == 0:
                compared = parity.Row("-", label, row["method"], row["method"] in ("dare_ties", "dare_linear", "della",
                                                                                   "della_linear"))
                base = config.get("base_model")
                parity.compare(compared, out, theirs, Path(paths[base]) if base else None)
                row.update(worst_relative_error=compared.worst_relative_error,
                           differing_fraction=compared.differing_fraction)
            else:
                row["mergekit_error"] = mk_text.strip().splitlines()[-1] if mk_text.strip() else f"exit {mk_code}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["# mergekit's own configurations through `blockmerge mergekit-yaml`", "",
             "Model names replaced by local models of the same architecture; the rest of each file unchanged. "
             "mergekit ran each file with float32 arithmetic (blockmerge's) and the file's output dtype.", "",
             "| configuration | method | layers | blockmerge | worst rel. error vs mergekit | entries that differ |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        status = "ran" if r["status"] == "ran" else f"refused: `{r['error']}`"
        error = f"{r['worst_relative_error']:.2e}" if r.get("worst_relative_error") is not None else "-"
        differ = f"{r['differing_fraction']:.2e}" if r.get("differing_fraction") is not None else "-"
        lines.append(f"| {r['configuration']} | {r['method']} | {r['layers']} | {status} | {error} | {differ} |")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "mergekit_examples.md").write_text("\n".join(lines) + "\n")
    (args.results / "mergekit_examples.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
