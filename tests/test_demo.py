"""The demo: real fine-tunes and statistics, every registered method merged at the hyperparameters it scores best
with on validation, test accuracies, reloadable outputs, exact task arithmetic."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import blockmerge
from blockmerge.cli import main
from blockmerge.demo import (
    BATCH,
    PLANS,
    STATS_EXAMPLES,
    TEST_STARTS,
    VALIDATION_STARTS,
    demo,
    print_table,
    run_demo,
    task_sequences,
    task_splits,
)
from blockmerge.engine.sources import open_statistics
from blockmerge.eval import Task, candidates, evaluate, simplex_grid

NUM_MODELS = 2
STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model's operations run fastest on one thread (as in the demo), above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    workdir = tmp_path_factory.mktemp("demo")
    return workdir, run_demo(workdir, num_models=NUM_MODELS, seed=0, steps=STEPS)


def _rows(rows: list[dict]) -> dict[str, dict]:
    return {r["model"]: r for r in rows}


def _tasks(workdir: Path) -> list[Task]:
    return [Task.from_file(workdir / "tasks" / f"task{t}.yaml") for t in range(NUM_MODELS)]


def _registered() -> list[str]:
    return [m["name"] for m in blockmerge.methods()]


def test_task_sequences_follow_their_rules() -> None:
    g = torch.Generator().manual_seed(0)
    t0, t1 = task_sequences(0, 5, g), task_sequences(1, 5, g)
    assert torch.equal(t0[:, 1:], (t0[:, :-1] + 1) % 64)
    assert torch.equal(t1[:, 1:], 64 + (t1[:, :-1] - 64 + 3) % 64)
    assert t0.min() >= 0 and t0.max() < 64 and t1.min() >= 64 and t1.max() < 128


def test_task_splits_are_disjoint_and_written(demo_run: tuple[Path, list[dict]]) -> None:
    workdir, _ = demo_run
    for t in range(NUM_MODELS):
        splits = task_splits(t, seed=0, steps=STEPS)
        assert len(splits["train"]) == STEPS * BATCH
        assert len(splits["validation"]) == VALIDATION_STARTS and len(splits["test"]) == TEST_STARTS
        starts = {name: set(seqs[:, 0].tolist()) for name, seqs in splits.items()}
        assert len(starts["validation"]) == VALIDATION_STARTS and len(starts["test"]) == TEST_STARTS
        assert not starts["train"] & starts["validation"]
        assert not starts["train"] & starts["test"]
        assert not starts["validation"] & starts["test"]
        for name, seqs in splits.items():
            lines = (workdir / "tasks" / f"task{t}-{name}.jsonl").read_text().splitlines()
            written = [[json.loads(line)["prompt"], *json.loads(line)["target"].split()] for line in lines]
            assert written == [[f"t{i}" for i in seq] for seq in seqs.tolist()], (t, name)


def test_fine_tunes_learn_their_own_task(demo_run: tuple[Path, list[dict]]) -> None:
    rows = _rows(demo_run[1])
    base = rows["base"]["accuracy"]
    for t in range(NUM_MODELS):
        own = rows[f"task{t}"]["accuracy"][t]
        assert own > base[t] + 0.5, (t, own, base[t])
        assert rows[f"task{t}"]["kind"] == "fine-tuned"


def test_every_registered_method_gets_a_row(demo_run: tuple[Path, list[dict]]) -> None:
    registered = _registered()
    assert len(registered) >= 8
    merges = [r["model"] for r in demo_run[1] if r["kind"] == "merge"]
    assert sorted(merges) == sorted(registered)
    for row in demo_run[1]:
        assert len(row["accuracy"]) == NUM_MODELS
        assert all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in row["accuracy"]), row["model"]
        assert row["mean"] == pytest.approx(sum(row["accuracy"]) / NUM_MODELS)
    for name in merges:
        row = _rows(demo_run[1])[name]
        assert row["merges"] >= 1 and row["seconds"] >= 0
        if name in PLANS and (PLANS[name].grid or PLANS[name].weights):
            assert row["sweep"] is not None and row["chosen"], name
            assert math.isfinite(row["validation"])


def _grid(name: str) -> list[dict]:
    """The candidates the demo is meant to score for `name`."""
    if PLANS[name].weights:
        return [{"weights": list(w)} for w in simplex_grid(NUM_MODELS, NUM_MODELS + 1)]
    return candidates(PLANS[name].grid)


def test_chosen_hyperparameters_are_the_validation_argmax_of_the_grid(demo_run: tuple[Path, list[dict]]) -> None:
    rows = _rows(demo_run[1])
    searched = [n for n in _registered() if n in PLANS and (PLANS[n].grid or PLANS[n].weights)]
    assert {"task_arithmetic", "ties", "dare", "fisher", "regmean", "mats", "ubgm"} <= set(searched)
    for name in searched:
        row, result = rows[name], rows[name]["sweep"]
        grid = _grid(name)
        scored = [c["hyperparameters"] for c in result["candidates"]]
        assert len(scored) == len(grid) > 1, name
        for got, expected in zip(scored, grid):
            assert got.keys() == expected.keys()
            for key in got:  # a per-model hyperparameter given one value records it as a list of one
                value = got[key][0] if isinstance(got[key], list) and not isinstance(expected[key], list) else got[key]
                assert value == pytest.approx(expected[key]), (name, key)
        assert row["chosen"] in scored, name
        # The validation score of every candidate, recomputed from its per-task accuracies; the first best wins.
        scores = [sum(t["metrics"]["token_accuracy"] for t in c["tasks"].values()) / NUM_MODELS
                  for c in result["candidates"]]
        assert [set(c["tasks"]) for c in result["candidates"]] == [{f"task{t}" for t in range(NUM_MODELS)}] * len(grid)
        best = scores.index(max(scores))
        assert row["chosen"] == scored[best], (name, scores)
        assert row["validation"] == pytest.approx(max(scores))
        assert row["merges"] == len(grid) + 1


def test_rows_report_the_written_merge_on_test(demo_run: tuple[Path, list[dict]]) -> None:
    """The merge written to merged/<method> is the chosen candidate: it scores the chosen validation accuracy,
    and the row's accuracies are its test accuracies."""
    workdir, rows = demo_run
    tasks = _tasks(workdir)
    for row in rows:
        if row["kind"] != "merge":
            continue
        assert Path(row["path"]) == workdir / "merged" / row["model"]
        test = evaluate(row["path"], tasks, split="test")
        accuracy = [test["tasks"][f"task{t}"]["metrics"]["token_accuracy"] for t in range(NUM_MODELS)]
        assert accuracy == pytest.approx(row["accuracy"]), row["model"]
        if row["validation"] is not None:
            assert evaluate(row["path"], tasks, split="validation")["score"] == pytest.approx(row["validation"])


def test_dare_scales_as_task_arithmetic_chose(demo_run: tuple[Path, list[dict]]) -> None:
    rows = _rows(demo_run[1])
    assert PLANS["dare"].inherit == {"scaling_factor": "task_arithmetic"}
    assert rows["dare"]["fixed"]["scaling_factor"] == rows["task_arithmetic"]["chosen"]["scaling_factor"]
    assert rows["dare"]["sweep"]["hyperparameters"]["scaling_factor"] == rows["dare"]["fixed"]["scaling_factor"]
    # The grid reaches small drop rates, and the choice is far from the chance level of an over-dropped merge.
    assert min(PLANS["dare"].grid["drop_rate"]) <= 0.1
    assert rows["dare"]["validation"] > 0.5


def test_statistics_are_those_of_blockmerge_stats(demo_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    workdir, rows = demo_run
    stats = workdir / "stats"
    for name in ("fisher", "gram", "kfac"):
        for t in range(NUM_MODELS):
            meta = json.loads((stats / f"task{t}.{name}" / "blockmerge.json").read_text())["metadata"]["statistics"]
            assert Path(meta["model"]) == workdir / "models" / f"task{t}"
            assert Path(meta["data"]) == workdir / "tasks" / f"task{t}-train.jsonl"
            assert meta["examples"] == min(STATS_EXAMPLES, STEPS * BATCH)
    assert set(open_statistics(stats / "task0.kfac", "kfac")) == {"gram_in", "gram_out"}
    assert set(open_statistics(stats / "base.fisher", "base")) == {"fisher"}
    assert _rows(rows)["ubgm"]["statistics"] == "fisher + base fisher"
    # The command line computes the same Fisher from the same training split.
    out = tmp_path / "cli.fisher"
    result = CliRunner().invoke(main, ["stats", "fisher", "--model", str(workdir / "models" / "task0"),
                                       "--data", str(workdir / "tasks" / "task0-train.jsonl"), "--text-column",
                                       "prompt", "--target-column", "target", "--num-examples",
                                       str(STATS_EXAMPLES), "--batch-size", str(STATS_EXAMPLES), "--out", str(out)])
    assert result.exit_code == 0, result.output
    ours, theirs = open_statistics(stats / "task0.fisher", "demo")["fisher"], open_statistics(out, "cli")["fisher"]
    assert set(ours.specs) == set(theirs.specs)
    for name, spec in ours.specs.items():
        torch.testing.assert_close(ours.read(name, 0, spec.rows), theirs.read(name, 0, spec.rows), msg=name)


def test_merged_directories_load_with_transformers(demo_run: tuple[Path, list[dict]]) -> None:
    from transformers import LlamaForCausalLM

    workdir, rows = demo_run
    for row in rows:
        if row["kind"] != "merge":
            continue
        out = workdir / "merged" / row["model"]
        assert (out / "config.json").is_file()
        model = LlamaForCausalLM.from_pretrained(out)
        saved = load_file(out / "model.safetensors")
        state = model.state_dict()
        assert set(saved) == set(state)
        for name, tensor in saved.items():
            assert torch.equal(state[name], tensor), name


def test_task_arithmetic_weights_are_exact(demo_run: tuple[Path, list[dict]]) -> None:
    workdir, rows = demo_run
    scale = _rows(rows)["task_arithmetic"]["chosen"]["scaling_factor"]
    base = load_file(workdir / "models" / "base" / "model.safetensors")
    tasks = [load_file(workdir / "models" / f"task{t}" / "model.safetensors") for t in range(NUM_MODELS)]
    merged = load_file(workdir / "merged" / "task_arithmetic" / "model.safetensors")
    assert set(merged) == set(base)
    moved = 0
    for name, theta0 in base.items():
        expected = theta0.double() + scale * sum(t[name].double() - theta0.double() for t in tasks)
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(merged[name], theta0))
    assert moved > len(base) // 2  # the task vectors are real: most tensors changed


def test_print_table_lists_every_row(demo_run: tuple[Path, list[dict]], capsys: pytest.CaptureFixture) -> None:
    print_table(demo_run[1])
    text = capsys.readouterr().out
    for row in demo_run[1]:
        assert row["model"] in text
        for name in row["chosen"] or {}:
            assert f"{name}=" in text
    assert "scaling_factor=" in text and "drop_rate=" in text and "alpha=" in text


def test_click_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, plan in PLANS.items():  # one candidate per grid: the command, not the search, is tested here
        monkeypatch.setitem(PLANS, name, dataclasses.replace(plan, grid={k: v[:1] for k, v in plan.grid.items()}))
    result = CliRunner().invoke(demo, ["--workdir", str(tmp_path / "out"), "--models", "1", "--steps", "2",
                                       "--seed", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    for name in _registered():
        assert name in result.output
    assert (tmp_path / "out" / "merged" / "average" / "config.json").is_file()
