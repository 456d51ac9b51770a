"""LoRA adapters merged as streamed inputs: peak memory against one materialised model, and the same merges of the
materialised models.

Builds a float32 base of `--size` GiB (the Llama-shaped family of `peak_memory.py`) and `--adapters` PEFT LoRA
adapters of it (rank `--rank`, lora_alpha 2 × rank, on every attention and MLP projection, factors N(0, σ²)
with σ chosen so an update is about 1 % of its weight), each an `adapter_config.json` and an
`adapter_model.safetensors`. Each adapter is materialised into a full model by blockmerge itself (`average` of
that one adapter: W + s·B·A, exactly what the adapter reads as). Then, each in a fresh process with the page
cache dropped first (`--warm`: kept), every method of `--methods` merges the adapters, and again their
materialised models; task arithmetic also writes a merged adapter, exact and truncated to `--rank`. Recorded per
run: wall time, peak RSS above the process's RSS after its imports (VmHWM), and the maximum merged difference
between the adapters' merge and the materialised models' merge.

    python benchmarks/lora.py --size 1 --adapters 3 --rank 16

Targets (reported): every merge of adapters peaks below one materialised model's size, and equals the merge of
the materialised models to 1e-6. Results: benchmarks/results/lora.{md,json} (`--results DIR`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peak_memory as pm  # noqa: E402

MiB = 2**20
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
DEFAULT_METHODS = ["task_arithmetic", "ties", "dare", "model_stock", "slerp", "average"]
UPDATE_SCALE = 0.01  # an update's RMS relative to its weight's (INIT_STD)
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def write_adapter(directory: Path, base: Path, family: pm.Family, rank: int, index: int) -> None:
    """A PEFT LoRA adapter of every projection, factors from a generator seeded by `index`."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(7 + index)
    alpha = 2 * rank
    scale = alpha / rank
    # RMS of s·B·A with B, A ~ N(0, σ²): s σ² √rank; set it to UPDATE_SCALE × INIT_STD
    sigma = (UPDATE_SCALE * pm.INIT_STD / (scale * rank**0.5)) ** 0.5
    tensors = {}
    for name, spec in family.specs().items():
        module = name.removesuffix(".weight")
        if not module.endswith(PROJECTIONS):
            continue
        rows, cols = spec.shape
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, cols, generator=generator) * sigma
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(rows, rank, generator=generator) * sigma
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(PROJECTIONS),
              "base_model_name_or_path": str(base.parent), "use_rslora": False, "fan_in_fan_out": False,
              "bias": "none", "lora_dropout": 0.0, "task_type": "CAUSAL_LM", "blockmerge-bench": index}
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def drop_caches(paths: list[Path]) -> None:
    for path in paths:
        for f in ([path] if path.is_file() else sorted(path.iterdir())):
            pm.drop_cache(f)


def worst_difference(a: Path, b: Path) -> float:
    from safetensors import safe_open

    worst = 0.0
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        for name in fa.keys():
            worst = max(worst, float((fa.get_tensor(name).double() - fb.get_tensor(name).double()).abs().max()))
    return worst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=float, default=1.0, help="base model size in GiB of float32")
    p.add_argument("--adapters", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--warm", action="store_true", help="keep the inputs' page cache between runs")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/blockmerge-lora"))
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    pm.compile_blockmerge()
    import blockmerge

    family = pm.family_for(args.size)
    base, _, _ = pm.ensure_family(args.workdir, family, 0, regenerate=False)
    model_bytes = base.stat().st_size
    folder = base.parent
    adapters, materialised = [], []
    for i in range(args.adapters):
        adapter, full = folder / f"adapter-{i}-r{args.rank}", folder / f"materialised-{i}-r{args.rank}.safetensors"
        if not (adapter / "adapter_config.json").is_file():
            write_adapter(adapter, base, family, args.rank, i)
        if not full.is_file():
            blockmerge.merge("average", [str(adapter)], base=str(base), out=str(full))
        adapters.append(adapter)
        materialised.append(full)
    rows = []
    for method in args.methods:
        count = pm.merge_plan(method, {}, args.adapters)["models"]
        outputs = {}
        for source, models in (("adapters", adapters[:count]), ("materialised", materialised[:count])):
            out = folder / f"out-{method}-{source}.safetensors"
            if not args.warm:
                drop_caches([base, *models])
            result = pm.run_child({"method": method, "models": [str(m) for m in models], "base": str(base),
                                   "out": str(out)})
            outputs[source] = out
            rows.append({"method": method, "inputs": source, "models": count, "wall_s": result["wall_s"],
                         "delta_bytes": result["delta_bytes"], "vmhwm_bytes": result["vmhwm_bytes"],
                         "bytes_read": result["summary"]["bytes_read"]})
            print(f"  {method:16} {source:12} wall {result['wall_s']:6.2f} s  peak RSS above imports "
                  f"{result['delta_bytes'] / MiB:6.0f} MiB  (VmHWM {result['vmhwm_bytes'] / MiB:.0f} MiB)", flush=True)
        rows[-2]["max_abs_difference"] = worst_difference(outputs["adapters"], outputs["materialised"])
        for out in outputs.values():
            out.unlink(missing_ok=True)
    for rank in (None, args.rank):
        out = folder / f"out-adapter-{rank or 'exact'}"
        started = time.perf_counter()
        report = blockmerge.merge("task_arithmetic", [str(a) for a in adapters], base=str(base), out=str(out),
                                  format="adapter", adapter_rank=rank, overwrite=True)
        rows.append({"method": "task_arithmetic", "inputs": "adapters", "models": len(adapters),
                     "output": f"adapter, rank {'Σr' if rank is None else rank}",
                     "wall_s": time.perf_counter() - started,
                     "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size,
                     "relative_error": report["relative_error"]})
        shutil.rmtree(out)
    write_report(args, family, model_bytes, rows)


def write_report(args: argparse.Namespace, family: pm.Family, model_bytes: int, rows: list[dict[str, Any]]) -> None:
    machine = pm.machine_description()
    lines = [f"# LoRA adapters as merge inputs ({args.adapters} adapters of rank {args.rank}, base "
             f"{model_bytes / MiB:.0f} MiB float32, hidden {family.hidden}, {family.layers} layers)", "",
             f"Machine: {machine['cpu']}, {machine['nproc']} cores; blockmerge {machine['blockmerge_commit']}; "
             f"page cache {'kept' if args.warm else 'dropped before each run'}.", "",
             "| method | inputs | models | wall s | peak RSS above imports MiB | ÷ one model | max abs difference "
             "(adapters vs materialised) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "output" in r:
            continue
        diff = f"{r['max_abs_difference']:.1e}" if "max_abs_difference" in r else ""
        lines.append(f"| {r['method']} | {r['inputs']} | {r['models']} | {r['wall_s']:.2f} | "
                     f"{r['delta_bytes'] / MiB:.0f} | {r['delta_bytes'] / model_bytes:.2f} | {diff} |")
    lines += ["", "| merged adapter | wall s | file MiB | relative Frobenius error (worst matrix) |",
              "| --- | ---: | ---: | ---: |"]
    for r in rows:
        if "output" in r:
            lines.append(f"| {r['output']} | {r['wall_s']:.2f} | {r['adapter_bytes'] / MiB:.1f} | "
                         f"{r['relative_error']:.3g} |")
    merges = [r for r in rows if r.get("inputs") == "adapters" and "output" not in r]
    below = all(r["delta_bytes"] < model_bytes for r in merges)
    equal = all(r["max_abs_difference"] <= 1e-6 for r in merges)
    lines += ["", f"- {'PASS' if below else 'FAIL'}: every merge of adapters peaks below one materialised model "
                  f"({model_bytes / MiB:.0f} MiB)",
              f"- {'PASS' if equal else 'FAIL'}: every merge of adapters equals the merge of the materialised models "
              "to 1e-6", ""]
    report = "\n".join(lines)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "lora.md").write_text(report)
    (args.results / "lora.json").write_text(json.dumps({"machine": machine, "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "model_bytes": model_bytes,
        "rows": rows}, indent=1))
    print(report)


if __name__ == "__main__":
    main()
