"""No figure in the README is typed: its results section is what the renderer makes of the
committed result files, and every comparison in it has both sides and a CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsae_pipeline.report.readme import (
    BEGIN,
    END,
    SWEEP_FILE,
    choose_default,
    render,
    replace_section,
)
from recsae_pipeline.sae.model import SaeConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def test_the_readme_results_section_is_rendered_from_the_committed_files() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1
    assert replace_section(readme, render(RESULTS)) == readme, (
        "README.md's results section is stale: run `.venv/bin/python scripts/render_results.py`"
    )


def test_a_changed_result_file_changes_the_rendered_section(tmp_path: Path) -> None:
    files = sorted(RESULTS.glob("*.json"))
    if not files:
        pytest.skip("no result files committed")
    for f in files:
        (tmp_path / f.name).write_text(f.read_text())
    before = render(tmp_path)
    victim = next(f for f in files if "comparisons" in f.read_text())
    data = json.loads(victim.read_text())
    rows = data.get("comparisons")
    if rows is None:
        rows = next(iter(data["datasets"].values()))["comparisons"]
    rows[0]["difference"] += 0.5
    (tmp_path / victim.name).write_text(json.dumps(data))
    assert render(tmp_path) != before


def test_sae_defaults_are_the_sweeps_pick() -> None:
    sweep = json.loads((RESULTS / SWEEP_FILE).read_text())
    pick = choose_default(sweep)
    default = SaeConfig(d_in=64)
    assert (default.k, default.expansion, default.whitening_shrinkage) == (
        pick["k"], pick["expansion"], pick["whitening_shrinkage"],
    )  # fmt: skip
    assert not default.batch_topk and default.l1_coefficient is None


def test_a_training_schedule_row_shows_its_epochs_and_its_paired_difference() -> None:
    from recsae_pipeline.report.readme import render_train_schedule

    row = {"lr": 1e-3, "batch_size": 64, "negatives": 0, "patience": 6, "epochs_run": 24,
           "best_epoch": 18, "test_ndcg@10": 0.1049,
           "test_diff_vs_reference": {"mean": 0.0075, "low": -0.001, "high": 0.016,
                                      "verdict": "no measurable difference"}}  # fmt: skip
    bench = {"command": "benchmarks/train_schedule.py --x", "commit": "abc", "model": "sasrec",
             "threads": 1, "schedules": [row]}  # fmt: skip
    lines = render_train_schedule(bench)
    assert "| 0.001 | 64 | 0 | 6 | 24 | 18 | 0.1049 | +0.0075 [-0.0010, +0.0160] |" in lines[-1]
    assert lines[-1].endswith("no measurable difference |")


def test_the_default_run_names_the_flame_graphs_of_both_commits_it_has() -> None:
    from recsae_pipeline.report.readme import render_default_timing

    run = {"benchmark": "benchmarks/default_run.py", "commit": "abc1234", "cpus": 2,
           "wall_seconds": 301.0, "peak_rss_mb": 1800.0,
           "baseline": {"commit": "0000aaa", "wall_seconds": 600.0},
           "flame_graph": "benchmarks/results/default_run_abc1234.svg",
           "baseline_flame_graph": None, "vs_baseline": []}  # fmt: skip
    line = render_default_timing(run)[2]
    assert "this commit `benchmarks/results/default_run_abc1234.svg`" in line
    assert "baseline `" not in line and "missed by 1 s" in line
    run["baseline_flame_graph"] = "benchmarks/results/default_run_0000aaa.svg"
    assert "baseline `benchmarks/results/default_run_0000aaa.svg`" in render_default_timing(run)[2]
    run["flame_graph"] = run["baseline_flame_graph"] = None
    assert "No flame graph of this commit" in render_default_timing(run)[2]


def test_the_shard_encoding_verdict_follows_the_ratios_ci() -> None:
    from recsae_pipeline.report.readme import render_shard_encoding

    medians = {n: {"wall": 0.3, "cpu": 0.2} for n in ("nullable", "not_null", "flat")}
    bench = {"command": "benchmarks/shard_encoding.py", "commit": "abc", "machine": "m",
             "rows": 10, "dim": 4, "megabytes": 1.0, "row_group_rows": 5, "repeats": 3,
             "median_seconds": medians, "file_bytes": dict.fromkeys(medians, 2**20),
             "same_values": True,
             "not_null_over_nullable": {"wall": {"ratio": 0.8, "ci95": [0.7, 0.9]},
                                        "cpu": {"ratio": 1.0, "ci95": [0.9, 1.1]}}}  # fmt: skip
    last = render_shard_encoding(bench)[-1]
    assert "wall 0.80x [0.70, 0.90] (not-null faster)" in last
    assert "cpu 1.00x [0.90, 1.10] (no measurable difference)" in last and "hash equal" in last
    bench["same_values"] = False
    assert "**differently**" in render_shard_encoding(bench)[-1]
