"""The committed recommenders benchmark (benchmarks/results/recommenders.json) holds every
model and every comparison it promises, and each comparison agrees with its own numbers; the
benchmark's summary pairs seeds and users as it says (checked on made-up runs, no training)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from recsae_pipeline.report.stats import Comparison

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "recommenders.py"
RESULTS = BENCHMARK.parent / "results" / "recommenders.json"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_recommenders", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()


@pytest.fixture(scope="module")
def results() -> dict:
    return json.loads(RESULTS.read_text())


def test_results_name_their_run(results: dict) -> None:
    assert results["commit"] and results["generated_at"] and results["machine"]
    assert "benchmarks/recommenders.py" in results["command"]
    assert results["quick"] is False
    assert set(results["datasets"]) == set(bench.DATASETS)


@pytest.mark.parametrize("dataset", bench.DATASETS)
def test_every_model_has_its_spread_over_the_seeds(results: dict, dataset: str) -> None:
    entry = results["datasets"][dataset]
    seeds = entry["seeds"]
    assert len(seeds) >= 3 and len(set(seeds)) == len(seeds)
    assert set(entry["models"]) == set(bench.EVALUATED)
    for name, m in entry["models"].items():
        for metric in ("ndcg@10", "hr@10", "train_seconds", "ms_per_1000_users"):
            values = m["per_seed"][metric]
            assert len(values) == len(seeds), (name, metric)
            assert m[metric]["n"] == len(seeds)
            assert m[metric]["mean"] == pytest.approx(np.mean(values)), (name, metric)
            assert m[metric]["min"] <= m[metric]["mean"] <= m[metric]["max"]
        assert 0 < m["ndcg@10"]["mean"] <= m["hr@10"]["mean"] <= 1
        assert (m["params"] > 0) == (name != "popularity")


@pytest.mark.parametrize("dataset", bench.DATASETS)
def test_every_pair_is_compared_over_seeds_and_over_users(results: dict, dataset: str) -> None:
    entry = results["datasets"][dataset]
    models, seeds = entry["models"], entry["seeds"]
    found = {(row["name"], row["unit"]): Comparison.from_dict(row) for row in entry["comparisons"]}
    expected = {(f"{a} - {b}", unit) for a, b in bench.PAIRS for unit in ("seeds", "users")}
    assert set(found) == expected
    for (name, unit), c in found.items():
        a, b = name.split(" - ")
        assert (c.a.label, c.b.label, c.metric, c.n_nan) == (a, b, "ndcg@10", 0)
        assert c.n == (len(seeds) if unit == "seeds" else entry["users"])
        lo, hi = c.ci95
        assert lo <= c.difference <= hi, name
        assert c.difference == pytest.approx(c.a.value - c.b.value)
        # Both units average the same per-seed means: the sides are the models' means.
        assert c.a.value == pytest.approx(models[a]["ndcg@10"]["mean"], abs=1e-6)
        assert c.b.value == pytest.approx(models[b]["ndcg@10"]["mean"], abs=1e-6)
        assert c.as_dict()["verdict"] == c.verdict
    per_seed = [Comparison.from_dict(row) for row in entry["per_seed_comparisons"]]
    assert len(per_seed) == len(bench.PAIRS) * len(seeds)
    assert all(c.n == entry["users"] and c.ci95[0] <= c.difference <= c.ci95[1] for c in per_seed)


def made_up_run(seed: int, n_users: int) -> bench.SeedRun:
    """A seed in which every model's users score a model-specific level plus noise."""
    rng = np.random.default_rng(seed)
    level = {
        "popularity": 0.05,
        "sasrec": 0.10,
        "teacher": 0.12,
        "student": 0.12,
        "student_ce": 0.11,
    }
    users = {m: np.clip(v + rng.normal(0, 0.05, n_users), 0, 1) for m, v in level.items()}
    rows = {
        m: {"model": m, "ndcg@10": float(u.mean()), "hr@10": float(min(1, 2 * u.mean())),
            "train_seconds": 10.0 + seed, "ms_per_1000_users": 5.0, "best_epoch": 3,
            "params": 0 if m == "popularity" else 1000}
        for m, u in users.items()
    }  # fmt: skip
    return bench.SeedRun(seed, rows, users, {m: 1.0 for m in users})


def test_summary_pairs_users_across_seeds() -> None:
    runs = [made_up_run(seed, n_users=400) for seed in (0, 1, 2)]
    entry = bench.summarize(runs)
    assert entry["users"] == 400 and entry["seeds"] == [0, 1, 2]
    by_key = {(r["name"], r["unit"]): r for r in entry["comparisons"]}
    users = by_key[("student - student_ce", "users")]
    averaged = np.mean([r.users["student"] - r.users["student_ce"] for r in runs], axis=0)
    assert users["difference"] == pytest.approx(averaged.mean())
    seeds = by_key[("student - student_ce", "seeds")]
    per_seed = [r.rows["student"]["ndcg@10"] - r.rows["student_ce"]["ndcg@10"] for r in runs]
    assert seeds["n"] == 3 and seeds["difference"] == pytest.approx(np.mean(per_seed))
    # SASRec is 0.05 above popularity for every user on average: far outside the noise.
    assert by_key[("sasrec - popularity", "users")]["verdict"] == "sasrec higher"
    assert entry["models"]["teacher"]["train_seconds"]["mean"] == pytest.approx(11.0)


def test_summary_refuses_runs_whose_test_users_differ() -> None:
    runs = [made_up_run(0, n_users=400), made_up_run(1, n_users=399)]
    with pytest.raises(SystemExit, match="test users differ"):
        bench.summarize(runs)
