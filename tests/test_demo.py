"""The demo: real fine-tunes, every statistic-free merge, reloadable outputs, exact task arithmetic."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from blockmerge.demo import HYPERPARAMETERS, demo, print_table, run_demo, task_sequences

NUM_MODELS = 2
STEPS = 10


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    workdir = tmp_path_factory.mktemp("demo")
    return workdir, run_demo(workdir, num_models=NUM_MODELS, seed=0, steps=STEPS)


def _rows(rows: list[dict]) -> dict[str, dict]:
    return {r["model"]: r for r in rows}


def test_task_sequences_follow_their_rules() -> None:
    g = torch.Generator().manual_seed(0)
    t0, t1 = task_sequences(0, 5, g), task_sequences(1, 5, g)
    assert torch.equal(t0[:, 1:], (t0[:, :-1] + 1) % 64)
    assert torch.equal(t1[:, 1:], 64 + (t1[:, :-1] - 64 + 3) % 64)
    assert t0.min() >= 0 and t0.max() < 64 and t1.min() >= 64 and t1.max() < 128


def test_fine_tunes_learn_their_own_task(demo_run: tuple[Path, list[dict]]) -> None:
    rows = _rows(demo_run[1])
    base = rows["base"]["accuracy"]
    for t in range(NUM_MODELS):
        own = rows[f"task{t}"]["accuracy"][t]
        assert own > base[t] + 0.5, (t, own, base[t])
        assert rows[f"task{t}"]["kind"] == "fine-tuned"


def test_every_statistic_free_method_is_merged_and_measured(demo_run: tuple[Path, list[dict]]) -> None:
    rows = _rows(demo_run[1])
    free = list(HYPERPARAMETERS)
    assert free, "no statistic-free methods registered"
    assert [r["model"] for r in demo_run[1] if r["kind"] == "merge"] == free
    for name in free:
        row = rows[name]
        assert len(row["accuracy"]) == NUM_MODELS
        assert all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in row["accuracy"])
        assert math.isfinite(row["mean"])
        assert row["peak_rss_mib"] > 0
        assert row["seconds"] >= 0 and row["read_mib"] > 0 and row["written_mib"] > 0
    # The plain average of fine-tunes on disjoint token bands keeps well above chance on every task.
    assert min(rows["average"]["accuracy"]) > 0.2


def test_merged_directories_load_with_transformers(demo_run: tuple[Path, list[dict]]) -> None:
    from transformers import LlamaForCausalLM

    workdir, rows = demo_run
    for row in rows:
        if row["kind"] != "merge":
            continue
        out = workdir / "merged" / row["model"]
        assert Path(row["path"]) == out
        assert (out / "config.json").is_file()
        model = LlamaForCausalLM.from_pretrained(out)
        saved = load_file(out / "model.safetensors")
        state = model.state_dict()
        assert set(saved) == set(state)
        for name, tensor in saved.items():
            assert torch.equal(state[name], tensor), name


def test_task_arithmetic_weights_are_exact(demo_run: tuple[Path, list[dict]]) -> None:
    workdir, _ = demo_run
    base = load_file(workdir / "models" / "base" / "model.safetensors")
    tasks = [load_file(workdir / "models" / f"task{t}" / "model.safetensors") for t in range(NUM_MODELS)]
    merged = load_file(workdir / "merged" / "task_arithmetic" / "model.safetensors")
    assert set(merged) == set(base)
    moved = 0
    for name, theta0 in base.items():
        expected = theta0.double() + 0.3 * sum(t[name].double() - theta0.double() for t in tasks)
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(merged[name], theta0))
    assert moved > len(base) // 2  # the task vectors are real: most tensors changed


def test_print_table_lists_every_row(demo_run: tuple[Path, list[dict]], capsys: pytest.CaptureFixture) -> None:
    print_table(demo_run[1])
    text = capsys.readouterr().out
    for row in demo_run[1]:
        assert row["model"] in text


def test_click_command(tmp_path: Path) -> None:
    result = CliRunner().invoke(demo, ["--workdir", str(tmp_path / "out"), "--models", "1", "--steps", "2",
                                       "--seed", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    for name in HYPERPARAMETERS:
        assert name in result.output
    assert (tmp_path / "out" / "merged" / "average" / "config.json").is_file()
