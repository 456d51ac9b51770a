"""mergekit YAML configurations run by `blockmerge mergekit-yaml` (and `merge -c`) on tiny transformers Llamas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import blockmerge
from blockmerge.cli import main


def run_config(tmp_path: Path, config: dict, *extra: str) -> tuple[int, str, Path]:
    path, out = tmp_path / "config.yml", tmp_path / "merged"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["mergekit-yaml", str(path), str(out), "-q", *extra])
    return result.exit_code, result.output, out


def merged_tensors(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text()) if (
        out / "model.safetensors.index.json").exists() else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    return {n: t for f in files for n, t in load_file(out / f).items()}


def test_linear_with_per_model_weights_by_filter_and_layer_loads_in_transformers(llamas, tmp_path):
    from transformers import AutoModelForCausalLM

    weights_a = [{"filter": "self_attn", "value": [1.0, 0.0]}, {"value": 0.5}]
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(llamas["a"]), "parameters": {"weight": weights_a}},
                         {"model": str(llamas["b"]), "parameters": {"weight": 0.5}}]}
    code, output, out = run_config(tmp_path, config)
    assert code == 0, output
    a, b = load_file(llamas["a"] / "model.safetensors"), load_file(llamas["b"] / "model.safetensors")
    got = merged_tensors(out)
    for name in a:
        if "self_attn" in name:
            w = 1.0 if ".layers.0." in name else 0.0  # the gradient's ends: layer 0 and layer 1 of 2
        else:
            w = 0.5
        expected = (w * a[name].double() + 0.5 * b[name].double()) / (w + 0.5)
        np.testing.assert_allclose(got[name].double().numpy(), expected.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
    assert (out / "config.json").is_file()
    AutoModelForCausalLM.from_pretrained(out)


def test_slerp_from_the_classic_config_equals_blockmerge_slerp(llamas, tmp_path):
    t = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
         {"value": 0.5}]
    config = {"merge_method": "slerp", "base_model": str(llamas["a"]), "dtype": "bfloat16",
              "models": [{"model": str(llamas["a"])}, {"model": str(llamas["b"])}], "parameters": {"t": t}}
    code, output, out = run_config(tmp_path, config)
    assert code == 0, output
    expected = blockmerge.merge("slerp", [str(llamas["a"]), str(llamas["b"])], t=t, dtype="bfloat16")
    got = merged_tensors(out)
    assert got.keys() == expected.keys()
    assert all(got[n].dtype == torch.bfloat16 and torch.equal(got[n], expected[n]) for n in got)


def test_task_arithmetic_and_merge_c_read_the_same_file(llamas, tmp_path):
    config = {"merge_method": "task_arithmetic", "base_model": str(llamas["base"]),
              "models": [{"model": str(llamas["a"]), "parameters": {"weight": 1.0}},
                         {"model": str(llamas["b"]), "parameters": {"weight": 1.0}}],
              "parameters": {"lambda": 0.6}}
    code, output, out = run_config(tmp_path, config)
    assert code == 0, output
    expected = blockmerge.merge("task_arithmetic", [str(llamas["a"]), str(llamas["b"])], base=str(llamas["base"]),
                                scaling_factor=0.6)
    got = merged_tensors(out)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    again = CliRunner().invoke(main, ["merge", "-q", "-c", str(tmp_path / "config.yml"), "--out", str(tmp_path / "c")])
    assert again.exit_code == 0, again.output
    assert all(torch.equal(merged_tensors(tmp_path / "c")[n], got[n]) for n in got)


@pytest.mark.parametrize("change,message", [
    ({"merge_method": "frankenstein"}, "mergekit method 'frankenstein' is not supported yet"),
    ({"modules": {"text": {}}}, "mergekit's modules is not supported yet"),
    ({"models": None, "slices": [{"sources": []}]}, "each slice needs a non-empty list of sources"),
    ({"models": [{"model": "org/hub-model"}]}, "no such local model directory (hub models are not downloaded)"),
    ({"models": [{"model": "a+lora"}]}, "a LoRA applied to a model is not supported yet"),
    ({"merge_methd": "linear"}, "unknown mergekit config key 'merge_methd'"),
])
def test_what_is_not_supported_is_one_line_naming_it(llamas, tmp_path, change, message):
    config = {"merge_method": "linear", "models": [{"model": str(llamas["a"]), "parameters": {"weight": 1.0}}],
              **change}
    code, output, out = run_config(tmp_path, config)
    assert code == 2 and message in output and output.strip().count("\n") == 0, output
    assert not out.exists()


@pytest.mark.parametrize("method,parameters,options", [
    ("model_stock", {}, {}),
    ("nearswap", {"t": [0.001, 0.01]}, {"t": [0.001, 0.01]}),
])
def test_base_model_methods_equal_blockmerge_with_the_base_taken_out_of_the_models(llamas, tmp_path, method,
                                                                                    parameters, options):
    others = [llamas["a"], llamas["b"]] if method == "model_stock" else [llamas["a"]]
    config = {"merge_method": method, "base_model": str(llamas["base"]), "parameters": parameters,
              "models": [{"model": str(llamas["base"])}, *({"model": str(m)} for m in others)]}
    code, output, out = run_config(tmp_path, config)
    assert code == 0, output
    expected = blockmerge.merge(method, [str(m) for m in others], base=str(llamas["base"]), **options)
    got = merged_tensors(out)
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in got)


def test_nuslerp_with_a_base_interpolates_the_task_vectors(llamas, tmp_path):
    config = {"merge_method": "nuslerp", "base_model": str(llamas["base"]),
              "models": [{"model": str(llamas["a"]), "parameters": {"weight": 0.3}},
                         {"model": str(llamas["b"]), "parameters": {"weight": [0.7, 0.2]}}]}
    code, output, out = run_config(tmp_path, config)
    assert code == 0, output
    expected = blockmerge.merge("nuslerp", [str(llamas["a"]), str(llamas["b"])], base=str(llamas["base"]),
                                weights=[0.3, [0.7, 0.2]], task_vectors=True)
    got = merged_tensors(out)
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in got)


@pytest.mark.parametrize("copy", [True, False])
def test_copy_tokenizer_flag_decides_whether_the_tokenizer_files_come_along(llamas, tmp_path, copy):
    base = tmp_path / "base"
    base.mkdir()
    for f in llamas["base"].iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    (base / "tokenizer_config.json").write_text("{}")
    config = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(llamas["a"]), "parameters": {"weight": 1.0}}]}
    code, output, out = run_config(tmp_path, config, "--copy-tokenizer" if copy else "--no-copy-tokenizer")
    assert code == 0, output
    assert (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() == copy and (out / "tokenizer_config.json").is_file() == copy


def test_mergekit_yaml_takes_mergekits_arguments_with_shards_in_parameters(llamas, tmp_path):
    config = {"merge_method": "dare_linear", "base_model": str(llamas["base"]),
              "parameters": {"density": 0.5, "weight": 1.0},
              "models": [{"model": str(llamas["a"])}, {"model": str(llamas["b"])}]}
    flags = ["--lazy-unpickle", "--allow-crimes", "--no-cuda", "--low-cpu-memory", "--write-threads", "2", "-j", "1",
             "--transformers-cache", str(tmp_path), "--clone-tensors", "--random-seed", "3", "--out-shard-size", "2K"]
    code, output, out = run_config(tmp_path, config, *flags)
    assert code == 0, output
    shards = sorted(out.glob("model-*.safetensors"))
    biggest = max(sum(t.numel() for t in load_file(s).values()) for s in shards)
    assert len(shards) > 1 and biggest <= max(2000, *(t.numel() for s in shards for t in load_file(s).values()))
    assert "dare_linear" in (out / "README.md").read_text()
    again = tmp_path / "again"
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["mergekit-yaml", str(tmp_path / "config.yml"), str(again), "-q",
                                       "--random-seed", "4", "--no-write-model-card"])
    assert result.exit_code == 0, result.output
    assert not (again / "README.md").exists()
    first, second = merged_tensors(out), merged_tensors(again)
    assert any(not torch.equal(first[n], second[n]) for n in first)  # another seed, other masks


def test_mergekit_yaml_refuses_what_it_cannot_do_in_one_line(llamas, tmp_path):
    config = {"merge_method": "linear", "models": [{"model": str(llamas["a"]), "parameters": {"weight": 1.0}}]}
    for flag, message in (("--no-safe-serialization", "--no-safe-serialization is not supported"),
                          ("--unsafe-truncate-embeddings", "--unsafe-truncate-embeddings is not supported")):
        code, output, _ = run_config(tmp_path, config, flag)
        assert code != 0 and message in output and len(output.strip().splitlines()) == 1


def test_a_frankenmerge_of_slices_stacks_the_layers_and_loads_in_transformers(llamas, tmp_path):
    from transformers import AutoModelForCausalLM

    config = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(llamas["a"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(llamas["b"]), "layer_range": [1, 2]}]}]}
    code, output, out = run_config(tmp_path, config)
    assert code == 0, output
    got = merged_tensors(out)
    a, b = load_file(llamas["a"] / "model.safetensors"), load_file(llamas["b"] / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    for name, value in a.items():
        if ".layers." not in name:
            source = a if "embed" in name else b  # embeddings from the first slice, the rest from the last
            assert torch.equal(got[name], source[name]), name
        else:
            assert torch.equal(got[name], value), name  # layers 0 and 1 of a
            if ".layers.1." in name:
                assert torch.equal(got[name.replace(".layers.1.", ".layers.2.")], b[name])
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3


def test_slices_merge_with_a_gradient_that_runs_over_each_slice(llamas, tmp_path):
    config = {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0}, "slices": [
        {"sources": [{"model": str(llamas["a"]), "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.0]}},
                     {"model": str(llamas["b"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(llamas["a"]), "layer_range": [0, 1], "parameters": {"weight": 3.0}},
                     {"model": str(llamas["b"]), "layer_range": [1, 2]}]}]}
    code, output, out = run_config(tmp_path, config)
    assert code == 0, output
    got = merged_tensors(out)
    a, b = load_file(llamas["a"] / "model.safetensors"), load_file(llamas["b"] / "model.safetensors")
    name = "model.layers.{}.mlp.up_proj.weight"
    for out_layer, (la, lb, wa) in enumerate([(0, 0, 1.0), (1, 1, 0.0), (0, 1, 3.0)]):
        expected = (wa * a[name.format(la)].double() + b[name.format(lb)].double()) / (wa + 1.0)
        np.testing.assert_allclose(got[name.format(out_layer)].double().numpy(), expected.numpy(), rtol=1e-6,
                                   atol=1e-7)
    embed = "model.embed_tokens.weight"  # outside the layers: t = 0, the first slice's gradient start
    np.testing.assert_allclose(got[embed].double().numpy(), ((a[embed].double() + b[embed].double()) / 2).numpy(),
                               rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def tokenized(llamas, tmp_path_factory) -> dict[str, Path]:
    """The Llamas with word-level tokenizers: a, b and base share one vocabulary, `other` has another."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tokenized")
    out = {}
    for name, words in (("base", "w"), ("a", "w"), ("b", "w"), ("other", "v")):
        d = root / name
        d.mkdir()
        for f in llamas["b" if name == "other" else name].iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        vocabulary = Tokenizer(WordLevel({f"{words}{i}": i for i in range(32)}, unk_token=f"{words}0"))
        vocabulary.pre_tokenizer = WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=vocabulary, model_max_length=16 + len(name)).save_pretrained(d)
        out[name] = d
    return out


@pytest.mark.parametrize("source", ["union", "a", "base"])
def test_tokenizer_source_of_one_shared_vocabulary_takes_that_tokenizer(tokenized, tmp_path, source):
    config = {"merge_method": "linear", "base_model": str(tokenized["base"]),
              "tokenizer_source": source if source in ("union", "base") else str(tokenized[source]),
              "models": [{"model": str(tokenized["a"]), "parameters": {"weight": 0.5}},
                         {"model": str(tokenized["b"]), "parameters": {"weight": 0.5}},
                         {"model": str(tokenized["base"]), "parameters": {"weight": 0.0}}]}
    code, output, out = run_config(tmp_path, config)
    assert code == 0, output
    expected = "a" if source == "a" else "base"  # the files carry their directory's model_max_length
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 16 + len(expected)


def test_merge_c_runs_a_mergekit_config_on_dask_with_the_local_bytes(llamas, tmp_path, cluster):
    c, _ = cluster
    config = tmp_path / "ties.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(llamas["base"]), "dtype": "float32",
        "models": [{"model": str(llamas[m]), "parameters": {"weight": 1.0, "density": 0.3}} for m in ("a", "b")]}))
    outs = {}
    for executor in ("local", "dask"):
        outs[executor] = tmp_path / executor
        remote = ["--executor", "dask", "--scheduler", c.scheduler_address] if executor == "dask" else []
        result = CliRunner().invoke(main, ["merge", "-c", str(config), "--out", str(outs[executor]), "-q",
                                           "--block-size", "4KiB", *remote])
        assert result.exit_code == 0, result.output
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):  # the flags reach the executor
        result = CliRunner().invoke(main, ["merge", "-c", str(config), "--out", str(tmp_path / "nowhere"),
                                           "--executor", "dask", "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2 and "cannot reach the Dask scheduler" in result.output
    local, remote = merged_tensors(outs["local"]), merged_tensors(outs["dask"])
    assert local.keys() == remote.keys()
    for name in local:
        assert torch.equal(local[name], remote[name]), name


@pytest.mark.parametrize("flag", [["--method", "ties"], ["--set", "density=0.5"], ["--dtype", "float16"]])
def test_merge_c_refuses_flags_a_mergekit_config_decides_in_one_line(llamas, tmp_path, flag):
    config = tmp_path / "linear.yml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(llamas[m]), "parameters": {"weight": 1.0}} for m in ("a", "b")]}))
    result = CliRunner().invoke(main, ["merge", "-c", str(config), "--out", str(tmp_path / "out"), *flag])
    assert result.exit_code != 0 and "does not apply to a mergekit config" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
