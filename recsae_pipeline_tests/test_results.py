"""The `results` asset and `recsae report`: every headline comparison from the artifacts,
both sides, the paired difference and a 95% CI that holds it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import get_args

import pyarrow.parquet as pq
import pytest

from recsae_pipeline.cli import main
from recsae_pipeline.report.results import RECOMMENDER_PAIRS, results_markdown
from recsae_pipeline.report.stats import MIN_BOOTSTRAP_UNITS, NO_DIFFERENCE, TOO_FEW, Unit
from recsae_pipeline_tests.support import KEY, TinyStore, metadata

SHAPE = {"name", "metric", "a", "b", "difference", "ci95", "n", "unit", "verdict"}


def _results(root: Path) -> dict:
    return json.loads((root / "reports" / "results.json").read_text())


def test_results_hold_every_comparison_with_both_sides_and_a_ci(tiny_store: TinyStore) -> None:
    results = _results(tiny_store.root)
    assert {"commit", "generated_at", "comparisons"} <= results.keys()
    comparisons = results["comparisons"]
    users = pq.read_metadata(tiny_store.root / "sequences" / "sequences.parquet").num_rows
    names = [c["name"] for c in comparisons]
    for a, b, what in RECOMMENDER_PAIRS:
        (row,) = [c for c in comparisons if c["name"] == f"recommenders: {what}"]
        assert (row["a"]["label"], row["b"]["label"], row["unit"]) == (a, b, "users")
        assert (row["n"], row["n_nan"]) == (users, 0)
    assert any(n.startswith(f"{KEY}: SAE reconstruction spliced in") for n in names)
    assert any(n.startswith(f"{KEY}: SAE features vs neurons, planted concepts") for n in names)
    # each chance-corrected measure against both controls
    for other in ("neurons", "random rotation"):
        for measure in ("excess_auc", "probe_auc_k1", "probe_auc_k5"):
            assert f"{KEY}: SAE features vs {other}, {measure} on attribute targets" in names
        assert f"{KEY}: SAE features vs {other}, units above chance" in names
    for c in comparisons:
        assert c.keys() >= SHAPE, c["name"]
        assert c["unit"] in get_args(Unit)
        lo, hi = c["ci95"]
        if math.isfinite(lo) and math.isfinite(c["difference"]):
            assert lo <= c["difference"] <= hi or c["method"].startswith("independent"), c
            assert c["difference"] == pytest.approx(c["a"]["value"] - c["b"]["value"], abs=1e-9)
        if c["verdict"].startswith(TOO_FEW):
            assert c["n"] < MIN_BOOTSTRAP_UNITS and math.isnan(lo), c
        else:
            assert (c["verdict"] == NO_DIFFERENCE) == (not (lo > 0 or hi < 0)), c
    # Partitions the tiny store did not build are said to be missing, not silently skipped.
    assert any("student.layer1" in m for m in results["missing"])


def test_results_metadata_shows_the_markdown(tiny_store: TinyStore) -> None:
    meta = metadata(tiny_store.report, "results")
    results = _results(tiny_store.root)
    assert meta["comparisons"] == len(results["comparisons"])
    assert meta["results"] == results_markdown(results)
    assert (tiny_store.root / "reports" / "results.md").read_text() == results_markdown(results)


def test_recsae_report_rebuilds_the_same_comparisons(
    tiny_store: TinyStore, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tiny_store.copy_to(tmp_path / "store")
    before = _results(root)
    (root / "reports" / "results.json").unlink()
    assert main(["--data-dir", str(root), "report", "--resamples", "200"]) == 0
    after = _results(root)
    assert after["comparisons"] == before["comparisons"]  # seeded: the same CIs to the digit
    assert "| comparison | metric |" in capsys.readouterr().out


def test_recsae_report_on_an_empty_root_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["--data-dir", str(tmp_path), "report"]) == 2
    assert "run `recsae materialize` first" in capsys.readouterr().err
