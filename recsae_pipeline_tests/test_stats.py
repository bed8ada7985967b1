"""The comparison statistics behind every headline figure."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsae_pipeline.report.stats import (
    NO_DIFFERENCE,
    Comparison,
    bootstrap_ci,
    compare,
    spread,
    t_ci,
    verdict,
)


def test_a_clear_paired_difference_excludes_zero_and_names_the_higher_side() -> None:
    rng = np.random.default_rng(1)
    b = rng.normal(0.1, 0.05, size=2000)
    a = b + 0.01 + rng.normal(0, 0.01, size=2000)  # paired: the shared noise cancels
    c = compare("x", "ndcg@10", "student", a, "teacher", b, "users", resamples=500)
    assert c.n == 2000 and c.n_nan == 0
    assert c.ci95[0] < c.difference < c.ci95[1]
    assert c.ci95[0] > 0.009 and c.ci95[1] < 0.011
    assert c.verdict == "student higher"
    assert c.a.value == pytest.approx(a.mean()) and c.b.value == pytest.approx(b.mean())


def test_no_difference_is_said_so() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=300), rng.normal(size=300)
    c = compare("x", "r", "sage", a, "baseline", b, "features", resamples=500)
    assert c.ci95[0] < 0 < c.ci95[1]
    assert c.verdict == NO_DIFFERENCE


def test_the_bootstrap_interval_has_about_95_percent_coverage() -> None:
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(200):
        d = rng.normal(0.5, 1.0, size=80)
        lo, hi = bootstrap_ci(d, resamples=400, seed=int(rng.integers(1 << 30)))
        hits += lo <= 0.5 <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_nan_pairs_are_dropped_and_counted() -> None:
    c = compare(
        "x", "r", "a", [1.0, math.nan, 3.0, 2.0], "b", [0.0, 1.0, math.nan, 1.0], "features"
    )
    assert (c.n, c.n_nan) == (2, 2)
    assert c.difference == pytest.approx(1.0)


def test_seeds_use_students_t() -> None:
    lo, hi = t_ci(np.array([1.0, 2.0, 3.0]))
    half = 4.303 * 1.0 / math.sqrt(3)
    assert (lo, hi) == pytest.approx((2 - half, 2 + half))
    c = compare("x", "ndcg@10", "a", [1.0, 2.0, 3.0], "b", [0.0, 0.0, 0.0], "seeds")
    assert c.method == "Student's t" and c.ci95 == pytest.approx((2 - half, 2 + half))


def test_round_trip_and_shape() -> None:
    c = compare("x", "m", "a", [1.0, 2.0] * 3, "b", [1.0] * 6, "users", resamples=100, note="y")
    row = c.as_dict()
    assert set(row) >= {"name", "metric", "a", "b", "difference", "ci95", "n", "unit", "verdict"}
    assert row["a"] == {"label": "a", "value": 1.5} and isinstance(row["ci95"], list)
    assert Comparison.from_dict(row) == c


def test_too_few_units_give_no_interval_and_say_so() -> None:
    c = compare("x", "named", "sage", [0.0], "baseline", [1.0], "features")
    assert c.n == 1 and all(math.isnan(x) for x in c.ci95)
    assert c.verdict == "too few units for a CI (n=1)"
    assert compare("x", "m", "a", [1.0] * 5, "b", [0.0] * 5, "features").verdict == "a higher"


def test_verdict_and_spread() -> None:
    assert verdict((0.1, 0.2), "a", "b") == "a higher"
    assert verdict((-0.2, -0.1), "a", "b") == "b higher"
    assert verdict((-0.1, 0.1)) == NO_DIFFERENCE
    assert verdict((math.nan, math.nan)) == NO_DIFFERENCE
    assert spread([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}


def test_independent_medians() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(1.0, 0.1, size=400), rng.normal(0.5, 0.1, size=64)
    c = compare("x", "median", "sae", a, "neurons", b, "features", 500, independent=True)
    assert c.ci95[0] < c.difference < c.ci95[1] and c.ci95[0] > 0.4
    assert (c.n, c.notes["n_a"], c.notes["n_b"]) == (64, 400, 64)
    same = compare("x", "median", "a", a, "b", a + 0.0, "features", 500, independent=True)
    assert same.verdict == NO_DIFFERENCE
