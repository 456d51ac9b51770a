"""PEFT LoRA adapters as merge inputs (W + s·B·A read block by block) and merged adapters as outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from blockmerge import api
from blockmerge.adapter_merge import truncated
from blockmerge.engine.adapters import open_model
from blockmerge.engine.sources import open_checkpoint
from blockmerge.errors import BlockmergeError
from blockmerge.plugins import registry

ADAPTERS = [  # LoRA settings a fine-tune may use: rank, alpha, rsLoRA, per-module alpha, embeddings, saved modules
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=2, lora_alpha=5, use_rslora=True, target_modules=["gate_proj", "down_proj", "embed_tokens"],
         alpha_pattern={"down_proj": 3}),
    dict(r=3, lora_alpha=6, target_modules=["o_proj", "k_proj", "up_proj"], modules_to_save=["lm_head"]),
]


def _llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)


def _randomised(model: torch.nn.Module) -> None:
    """Every adapter tensor set to small random values (PEFT starts B at zero: a no-op adapter)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn_like(p) * 0.1)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base, three PEFT adapters of it, and the three full models PEFT materialises from them."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_llama_config()).save_pretrained(root / "base")
    for i, settings in enumerate(ADAPTERS):
        model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base"),
                                    peft.LoraConfig(init_lora_weights=False, **settings))
        _randomised(model)
        model.save_pretrained(root / f"adapter{i}")
        model.merge_and_unload().save_pretrained(root / f"full{i}")
    return root


def _tensors(source) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(str(source), "x")
    return {n: ckpt.read(n, 0, s.shape[0] if s.shape else 1) for n, s in ckpt.specs.items()}


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


def test_an_adapter_reads_as_the_model_peft_materialises(family):
    base = open_checkpoint(str(family / "base"), "base")
    for i in range(len(ADAPTERS)):
        model = open_model(str(family / f"adapter{i}"), "m", base)
        full = _tensors(family / f"full{i}")
        read = {n: model.read(n, 0, s.shape[0] if s.shape else 1) for n, s in model.specs.items()}
        assert _worst(read, full) <= 1e-6
        changed = [n for n in full if not torch.equal(full[n], _tensors(family / "base")[n])]
        assert changed, "the adapter changes nothing: the test would prove nothing"
        rows = {n: torch.cat([model.read(n, r, min(r + 3, s.shape[0])) for r in range(0, s.shape[0], 3)])
                for n, s in model.specs.items() if s.shape}
        assert all(torch.equal(rows[n], read[n]) for n in rows)  # any row range: the same values


# The subspace methods take singular vectors of every task matrix, or of their sum, across its whole rank: a LoRA
# update of rank r has zero singular values beyond r, whose singular vectors are arbitrary, so their merge of
# adapters changes with the last bit of the inputs (test_subspace_merges_of_low_rank_updates_are_ill_posed).
SINGULAR_VECTOR_METHODS = ("iso_c", "iso_cts", "tsv_m")


def _statistic_free() -> list[str]:
    names = []
    for name, method in sorted(registry().items()):
        if name in SINGULAR_VECTOR_METHODS:
            continue
        needs = method.needs(method.hyperparameters())
        if not (needs.statistics or needs.one_of_statistics or needs.base_statistics or needs.checkpoints):
            names.append(name)
    return names


@pytest.mark.parametrize("method", _statistic_free())
def test_adapters_merge_as_their_materialised_models(family, method):
    spec = registry()[method]
    least, most = spec.model_count
    count = max(least, min(len(ADAPTERS), most or len(ADAPTERS)))
    adapters = [str(family / f"adapter{i}") for i in range(count)]
    fulls = [str(family / f"full{i}") for i in range(count)]
    base = str(family / "base")
    blocks = None if spec.granularity == "tensor" else "4KiB"  # small blocks: an update read in parts
    from_adapters = api.merge(method, adapters, base=base, block_size=blocks)
    from_full = api.merge(method, fulls, base=base, block_size=blocks)
    assert _worst(from_adapters, from_full) <= 1e-6


@pytest.mark.parametrize("method", SINGULAR_VECTOR_METHODS)
def test_subspace_merges_of_low_rank_updates_are_ill_posed(family, tmp_path, method):
    fulls = [str(family / f"full{i}") for i in range(3)]
    nudged = []
    for i, full in enumerate(fulls):
        tensors = _tensors(full)
        for t in tensors.values():
            t.mul_(1 + 2.0 ** -22 * torch.randn(t.shape).sign())
        save_file(tensors, tmp_path / f"nudged{i}.safetensors")
        nudged.append(str(tmp_path / f"nudged{i}.safetensors"))
    base = str(family / "base")
    assert _worst(api.merge(method, fulls, base=base), api.merge(method, nudged, base=base)) > 1e-3


def test_adapter_blocks_do_not_change_the_bytes(family, tmp_path):
    adapters = [str(family / f"adapter{i}") for i in range(3)]
    small = api.merge("ties", adapters, base=str(family / "base"), block_size="1KiB")
    large = api.merge("ties", adapters, base=str(family / "base"), block_size="64MiB")
    assert all(torch.equal(small[n], large[n]) for n in small)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.arange(24).reshape(2, 12) % 96
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("method, settings", [("task_arithmetic", {"scaling_factor": 0.7}), ("average", {}),
                                              ("linear", {"weights": [1.0, 2.0, 3.0]})])
def test_an_exact_merged_adapter_loads_with_peft_and_gives_the_full_merges_logits(family, tmp_path, method,
                                                                                    settings):
    adapters = [str(family / f"adapter{i}") for i in range(3)]
    report = api.merge(method, adapters, base=str(family / "base"), out=tmp_path / "merged", format="adapter",
                       **settings)
    assert report["relative_error"] == 0.0
    ranks = {m: r["rank"] for m, r in report["modules"].items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 4 and ranks["model.layers.1.mlp.down_proj"] == 2
    api.merge(method, adapters, base=str(family / "base"), out=tmp_path / "full", format="hf", **settings)
    full = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "full")
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(family / "base"),
                                            tmp_path / "merged")
    assert torch.allclose(_logits(loaded), _logits(full), atol=1e-5, rtol=1e-5)
    merged_weights = _tensors(tmp_path / "full")
    materialised = {n: p.detach() for n, p in loaded.merge_and_unload().state_dict().items()}
    assert _worst({n: materialised[n] for n in merged_weights}, merged_weights) <= 1e-6


def test_a_truncated_adapter_reports_its_error(family, tmp_path):
    adapters = [str(family / f"adapter{i}") for i in range(3)]
    report = api.merge("task_arithmetic", adapters, base=str(family / "base"), out=tmp_path / "r1",
                       format="adapter", adapter_rank=1)
    assert all(m["rank"] == 1 for m in report["modules"].values())
    q = report["modules"]["model.layers.0.self_attn.q_proj"]
    assert 0.0 < q["relative_error"] < 1.0
    weights = load_file(tmp_path / "r1" / "adapter_model.safetensors")
    exact = api.merge("task_arithmetic", adapters, base=str(family / "base"), out=tmp_path / "exact",
                      format="adapter")
    assert exact["modules"]["model.layers.0.self_attn.q_proj"]["rank"] == 4
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    full = load_file(tmp_path / "exact" / "adapter_model.safetensors")
    delta = (full[f"{prefix}.lora_B.weight"].double() @ full[f"{prefix}.lora_A.weight"].double())
    approx = weights[f"{prefix}.lora_B.weight"].double() @ weights[f"{prefix}.lora_A.weight"].double()
    assert abs(float((delta - approx).norm() / delta.norm()) - q["relative_error"]) < 1e-6


def test_truncation_matches_the_svd_of_the_product():
    torch.manual_seed(3)
    b, a = torch.randn(20, 6, dtype=torch.float64), torch.randn(6, 15, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(b @ a)
    for rank in (1, 3, 6):
        tb, ta, error = truncated(b, a, rank)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert torch.allclose(tb @ ta, best, atol=1e-10)
        assert error == pytest.approx(float(s[rank:].norm() / s.norm()), abs=1e-12)


def test_gpt2_fan_in_fan_out_adapters(tmp_path):
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    for i in range(2):
        model = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                    peft.LoraConfig(r=2 + i, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                    fan_in_fan_out=True, init_lora_weights=False))
        _randomised(model)
        model.save_pretrained(tmp_path / f"adapter{i}")
        model.merge_and_unload().save_pretrained(tmp_path / f"full{i}")
    adapters, fulls = ([str(tmp_path / f"{kind}{i}") for i in range(2)] for kind in ("adapter", "full"))
    merged = api.merge("task_arithmetic", adapters, base=str(tmp_path / "base"), scaling_factor=0.5)
    reference = api.merge("task_arithmetic", fulls, base=str(tmp_path / "base"), scaling_factor=0.5)
    assert _worst(merged, reference) <= 1e-6


def _adapter_copy(family, tmp_path, edit=None, weights=None):
    copy = tmp_path / "edited"
    shutil.copytree(family / "adapter0", copy)
    if edit is not None:
        config = json.loads((copy / "adapter_config.json").read_text())
        edit(config)
        (copy / "adapter_config.json").write_text(json.dumps(config))
    if weights is not None:
        tensors = load_file(copy / "adapter_model.safetensors")
        weights(tensors)
        save_file(tensors, copy / "adapter_model.safetensors")
    return str(copy)


@pytest.mark.parametrize("edit, weights, message", [
    (lambda c: c.update(use_dora=True), None, "DoRA adapters"),
    (lambda c: c.update(peft_type="IA3"), None, "peft_type IA3 is not supported"),
    (lambda c: c.update(base_model_name_or_path="some-org/some-model"), None, "is merged over its base model"),
    (None, lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"), "without its other"),
    (None, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 7)}),
     r"the LoRA update is \[32, 7\]"),
    (None, lambda t: t.update({"model.norm.weight": torch.ones(32)}), "not a PEFT adapter tensor"),
    (None, lambda t: t.update({"base_model.model.model.norm.lora_C.weight": torch.ones(32)}), "unknown LoRA tensor"),
    (None, lambda t: t.update({"base_model.model.model.norm.lora_B.bias": torch.ones(32)}),
     "lora_B.bias without the module's LoRA factors"),
    (None, lambda t: t.update({"base_model.model.model.no_such.weight": torch.ones(3)}),
     "the adapter changes a tensor the base"),
    (lambda c: c.update(lora_alpha="many"), None, "bad LoRA setting"),
])
def test_bad_adapters_stop_with_one_line(family, tmp_path, edit, weights, message):
    adapter = _adapter_copy(family, tmp_path, edit, weights)
    base = None if "base model" in message else str(family / "base")
    with pytest.raises(BlockmergeError, match=message) as err:
        api.merge("task_arithmetic", [adapter], base=base)
    assert "\n" not in str(err.value)


def test_an_adapter_without_its_weights_file_is_named(family, tmp_path):
    adapter = Path(_adapter_copy(family, tmp_path))
    config = (adapter / "adapter_config.json").read_text()
    (adapter / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(BlockmergeError, match="the adapter config is not a JSON object"):
        api.merge("task_arithmetic", [str(adapter)], base=str(family / "base"))
    (adapter / "adapter_config.json").write_text(config)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(BlockmergeError, match="adapter_model.bin is pickled; convert it"):
        api.merge("task_arithmetic", [str(adapter)], base=str(family / "base"))
    (adapter / "adapter_model.bin").unlink()
    with pytest.raises(BlockmergeError, match="no adapter_model.safetensors"):
        api.merge("task_arithmetic", [str(adapter)], base=str(family / "base"))


def test_adapter_output_misuse_stops_with_one_line(family, tmp_path):
    adapters = [str(family / f"adapter{i}") for i in range(2)]
    base = str(family / "base")
    cases = [
        (dict(base=base, out=tmp_path / "x", format="adapter", adapter_rank=0), "adapter rank must be at least 1"),
        (dict(base=None, out=tmp_path / "x", format="adapter"), "needs out= \\(--out\\) and the adapters' base"),
        (dict(base=base, out=tmp_path / "x.safetensors", adapter_rank=2), "adapter_rank \\(--adapter-rank\\) is for"),
        (dict(base=base, out=family / "adapter0", format="adapter", overwrite=True), "the output is one of the inputs"),
        (dict(base=base, out=family / "full0", format="adapter", overwrite=True), "is not a merged adapter"),
    ]
    for options, message in cases:
        with pytest.raises(BlockmergeError, match=message) as err:
            api.merge("task_arithmetic", adapters, **options)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.safetensors").exists()


def test_non_linear_methods_refuse_an_adapter_output(family, tmp_path):
    adapters = [str(family / f"adapter{i}") for i in range(2)]
    with pytest.raises(BlockmergeError, match="ties: its merge of adapters is no adapter"):
        api.merge("ties", adapters, base=str(family / "base"), out=tmp_path / "x", format="adapter")
    with pytest.raises(BlockmergeError, match="sum to 2"):
        api.merge("linear", adapters, base=str(family / "base"), out=tmp_path / "x", format="adapter",
                  normalize=False)
    assert not (tmp_path / "x").exists()


def test_adapters_merge_on_dask_as_they_do_locally(family, tmp_path, cluster):
    adapters = [str(family / f"adapter{i}") for i in range(3)]
    base = str(family / "base")
    api.merge("ties", adapters, base=base, out=tmp_path / "local.safetensors", block_size="4KiB")
    api.merge("ties", adapters, base=base, out=tmp_path / "dask.safetensors", block_size="4KiB", executor="dask",
              scheduler=cluster[0].scheduler_address)
    local, remote = load_file(tmp_path / "local.safetensors"), load_file(tmp_path / "dask.safetensors")
    assert set(local) == set(remote) and all(torch.equal(local[n], remote[n]) for n in local)


def test_the_cli_merges_adapters_into_a_model_and_into_an_adapter(family, tmp_path):
    from click.testing import CliRunner

    from blockmerge.cli import main

    models = [arg for i in range(2) for arg in ("--model", str(family / f"adapter{i}"))]
    common = ["merge", "--method", "task_arithmetic", "--base", str(family / "base"), *models, "-q"]
    runner = CliRunner()
    full = runner.invoke(main, [*common, "-o", str(tmp_path / "full.safetensors")])
    assert full.exit_code == 0, full.output
    adapter = runner.invoke(main, [*common, "-o", str(tmp_path / "adapter"), "--format", "adapter",
                                   "--adapter-rank", "2"])
    assert adapter.exit_code == 0, adapter.output
    report = json.loads((tmp_path / "adapter" / "blockmerge_adapter.json").read_text())
    assert report["rank"] == 2 and report["relative_error"] > 0
    again = runner.invoke(main, [*common, "-o", str(tmp_path / "adapter"), "--format", "adapter"])
    assert again.exit_code != 0 and "already exists" in again.output
    config = tmp_path / "merge.yml"
    config.write_text(json.dumps({"method": "task_arithmetic", "base": str(family / "base"), "format": "adapter",
                                  "adapter_rank": 1, "models": [str(family / f"adapter{i}") for i in range(2)],
                                  "out": str(tmp_path / "from-config")}))
    configured = runner.invoke(main, ["merge", "-c", str(config), "-q"])
    assert configured.exit_code == 0, configured.output
    assert json.loads((tmp_path / "from-config" / "blockmerge_adapter.json").read_text())["rank"] == 1
