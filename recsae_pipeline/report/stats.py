"""Comparisons with honest uncertainty: both sides, the difference, and a paired 95% CI.

Every headline figure of the project is a `Comparison`: two labelled values measured on the
same units (users, features or seeds), the mean paired difference a - b, its 95% confidence
interval and n. Over users and features the interval is a seeded paired bootstrap (resample
units with replacement, keep each unit's pair together); over a handful of seeds it is
Student's t on the paired differences. Pairs where either side is NaN are dropped and
counted (`n_nan`), never silently.

A verdict reads the interval: "a higher" / "b higher" when it excludes zero, otherwise "no
measurable difference".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

Unit = Literal["users", "features", "units", "seeds", "genres", "concepts", "attributes"]
NO_DIFFERENCE = "no measurable difference"
TOO_FEW = "too few units for a CI"
DEFAULT_RESAMPLES = 2000
MIN_BOOTSTRAP_UNITS = 5
"""Below this many units a percentile bootstrap interval means nothing (one unit gives a
zero-width interval): the CI is undefined and the verdict says so."""

# Two-sided 95% quantiles of Student's t, df = 1..30 (beyond, the normal's 1.96 is within 2%).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


@dataclass(frozen=True)
class Side:
    label: str
    value: float


@dataclass(frozen=True)
class Comparison:
    """One headline comparison in the shape of `results.json`'s `comparisons` entries."""

    name: str
    metric: str
    a: Side
    b: Side
    difference: float
    ci95: tuple[float, float]
    n: int
    unit: Unit
    n_nan: int = 0
    """Units dropped because either side was NaN (an undefined correlation, say)."""
    method: str = "paired bootstrap"
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if not all(math.isfinite(x) for x in self.ci95) and self.n < MIN_BOOTSTRAP_UNITS:
            return f"{TOO_FEW} (n={self.n})"
        return verdict(self.ci95, self.a.label, self.b.label)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci95"] = list(self.ci95)
        out["verdict"] = self.verdict
        return out

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Comparison:
        row = {k: v for k, v in row.items() if k != "verdict"}
        return cls(
            **{**row, "a": Side(**row["a"]), "b": Side(**row["b"]), "ci95": tuple(row["ci95"])}
        )


def verdict(ci95: Sequence[float], a_label: str = "a", b_label: str = "b") -> str:
    """`<a> higher` / `<b> higher` when the CI of a - b excludes zero, else no measurable
    difference (also when the CI is undefined)."""
    lo, hi = ci95
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 <= hi:
        return NO_DIFFERENCE
    return f"{a_label} higher" if lo > 0 else f"{b_label} higher"


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray, int]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples need equal 1-d shapes, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep], int((~keep).sum())


def bootstrap_ci(
    differences: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95% CI of the mean of `differences` over `resamples` seeded resamples of
    the units (chunked, so a million users fit in a few MB at a time); NaN below
    `MIN_BOOTSTRAP_UNITS` units."""
    n = len(differences)
    if n < MIN_BOOTSTRAP_UNITS:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 4_000_000 // n)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = differences[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return (float(lo), float(hi))


def t_ci(differences: np.ndarray) -> tuple[float, float]:
    """Student's t 95% CI of the mean difference (for a few seeds)."""
    n = len(differences)
    mean = float(np.mean(differences)) if n else math.nan
    if n < 2:
        return (mean, mean) if n else (math.nan, math.nan)
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    half = t * float(np.std(differences, ddof=1)) / math.sqrt(n)
    return (mean - half, mean + half)


def compare(
    name: str,
    metric: str,
    a_label: str,
    a: Sequence[float],
    b_label: str,
    b: Sequence[float],
    unit: Unit,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    independent: bool = False,
    statistic: Literal["median", "mean"] = "median",
    **notes: Any,
) -> Comparison:
    """Both sides' means over the units where both are defined, the mean paired difference
    a - b and its 95% CI: bootstrap over users/features/genres, Student's t over seeds.

    `independent`: a and b are different units (SAE features and neurons): their medians,
    the difference of medians and its CI by resampling each sample on its own; n is the
    smaller sample, both sizes are in `notes`; `statistic="mean"` compares means instead
    (of 0/1 indicators: shares)."""
    if independent:
        x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        dropped = int((~np.isfinite(x)).sum() + (~np.isfinite(y)).sum())
        x, y = x[np.isfinite(x)], y[np.isfinite(y)]
        centre = np.median if statistic == "median" else np.mean
        diff, ci = _independent(x, y, resamples, seed, centre)
        return Comparison(
            name, metric, Side(a_label, float(centre(x)) if len(x) else math.nan),
            Side(b_label, float(centre(y)) if len(y) else math.nan), diff, ci,
            min(len(x), len(y)), unit, dropped,
            f"independent bootstrap of {statistic}s ({resamples} resamples)",
            {"n_a": len(x), "n_b": len(y), **notes},
        )  # fmt: skip
    x, y, dropped = _paired(a, b)
    d = x - y
    ci = t_ci(d) if unit == "seeds" else bootstrap_ci(d, resamples, seed)
    return Comparison(
        name=name,
        metric=metric,
        a=Side(a_label, float(x.mean()) if len(x) else math.nan),
        b=Side(b_label, float(y.mean()) if len(y) else math.nan),
        difference=float(d.mean()) if len(d) else math.nan,
        ci95=ci,
        n=len(d),
        unit=unit,
        n_nan=dropped,
        method="Student's t" if unit == "seeds" else f"paired bootstrap ({resamples} resamples)",
        notes=notes,
    )


def _independent(
    x: np.ndarray, y: np.ndarray, resamples: int, seed: int, centre: Any = np.median
) -> tuple[float, tuple[float, float]]:
    """Difference of `centre` (median or mean) and its 95% CI, resampling each sample on its
    own."""
    if min(len(x), len(y)) < MIN_BOOTSTRAP_UNITS:
        return (float(centre(x) - centre(y)) if len(x) and len(y) else math.nan), (
            math.nan,
            math.nan,
        )
    rng = np.random.default_rng(seed)
    diffs = centre(rng.choice(x, (resamples, len(x))), axis=1) - centre(
        rng.choice(y, (resamples, len(y))), axis=1
    )
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(centre(x) - centre(y)), (float(lo), float(hi))


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max of per-seed values."""
    x = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
        "n": len(x),
    }


def format_ci(c: Comparison, digits: int = 4) -> str:
    """`+0.0023 [-0.0019, +0.0065]`."""
    lo, hi = c.ci95
    return f"{c.difference:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
