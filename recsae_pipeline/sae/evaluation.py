"""How good a trained SAE is: held-out reconstruction and sparsity, and recommendation quality
with its reconstruction spliced in at its layer (RecSAE), against zero-ablating that layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import duckdb
import numpy as np
import torch

from recsae_pipeline.activations.hooks import edit_hidden
from recsae_pipeline.activations.shards import partition_rows
from recsae_pipeline.models.metrics import per_user_ndcg
from recsae_pipeline.models.recommender import Recommender
from recsae_pipeline.models.training import user_ranks
from recsae_pipeline.models.validation import CheckOutcome, from_problems
from recsae_pipeline.sae.model import TopKSae
from recsae_pipeline.storage.sql import read_parquet

ABLATION_GAP = 1e-9
"""Below this NDCG@10 cost of zero-ablating the layer, "fraction recovered" is undefined."""


@dataclass(frozen=True)
class SaeBounds:
    """Bounds of the SAE's blocking checks."""

    max_fvu: float = 0.10
    """Held-out FVU at most this."""
    max_dead_fraction: float = 0.02
    """Share of latents never active on held-out rows at most this."""
    min_recovered: float = 0.9
    """Fraction of NDCG@10 recovered when spliced, at least this: the check fails when the
    95% bootstrap CI over test users lies wholly below it."""


class SpliceQuality(NamedTuple):
    per_user: dict[str, np.ndarray]
    """Each test user's NDCG@10 (sequences order) under `original` (the model as trained),
    `spliced` (the SAE's reconstruction replacing the layer's output) and `zero_ablated`
    (the layer's output replaced by zeros): what paired CIs over users resample."""

    def _mean(self, key: str) -> float:
        return torch.from_numpy(self.per_user[key]).mean().item()

    @property
    def original(self) -> float:
        return self._mean("original")

    @property
    def spliced(self) -> float:
        return self._mean("spliced")

    @property
    def zero_ablated(self) -> float:
        return self._mean("zero_ablated")

    @property
    def fraction_recovered(self) -> float:
        """(spliced - ablated) / (original - ablated); NaN when ablating costs nothing."""
        gap = self.original - self.zero_ablated
        return (self.spliced - self.zero_ablated) / gap if gap > ABLATION_GAP else math.nan


def recovered_ci(
    quality: SpliceQuality, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap CI of `fraction_recovered`, test users resampled with
    replacement (the three NDCG@10 means of a resample from the same users)."""
    users = np.stack([quality.per_user[k] for k in ("original", "spliced", "zero_ablated")])
    rng = np.random.default_rng(seed)
    n, values = users.shape[1], []
    for start in range(0, resamples, 250):
        index = rng.integers(0, n, size=(min(250, resamples - start), n))
        original, spliced, ablated = (users[i][index].mean(axis=1) for i in range(3))
        gap = original - ablated
        with np.errstate(divide="ignore", invalid="ignore"):
            values.append(np.where(gap > ABLATION_GAP, (spliced - ablated) / gap, np.nan))
    draws = np.concatenate(values)
    draws = draws[np.isfinite(draws)]
    if len(draws) == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return float(lo), float(hi)


def splice_quality(
    model: Recommender,
    layer: int,
    sae: TopKSae,
    sequences: list[np.ndarray],
    device: torch.device,
) -> SpliceQuality:
    """Test NDCG@10 (full ranking, no sampled metrics) per user as trained, spliced and
    zero-ablated."""

    def ndcg() -> np.ndarray:
        ranks, _ = user_ranks(model, sequences, "test", device)
        return per_user_ndcg(ranks, 10).numpy()

    users = {"original": ndcg()}
    with edit_hidden(model, layer, sae.reconstruct):
        users["spliced"] = ndcg()
    with edit_hidden(model, layer, torch.zeros_like):
        users["zero_ablated"] = ndcg()
    return SpliceQuality(users)


def reconstruction_check(heldout: dict[str, float], bounds: SaeBounds) -> CheckOutcome:
    """Held-out FVU and dead fraction within `bounds`."""
    fvu, dead = heldout["fvu"], heldout["dead_fraction"]
    fvu_ok, dead_ok = fvu <= bounds.max_fvu, dead <= bounds.max_dead_fraction
    return CheckOutcome(
        fvu_ok and dead_ok,
        # Enough digits that a value just over its bound never reads as equal to it.
        f"held-out FVU {fvu:.4f} ({'<=' if fvu_ok else '>'} {bounds.max_fvu}), dead "
        f"{dead:.3%} ({'<=' if dead_ok else '>'} {bounds.max_dead_fraction:.0%})"
        + (
            ""
            if dead_ok
            else "; more rows_seen, a smaller expansion or the aux-k loss revive latents"
        ),
        {k: heldout[k] for k in ("fvu", "dead_fraction", "l0")},
    )


def splice_check(quality: SpliceQuality, bounds: SaeBounds) -> CheckOutcome:
    """Enough of NDCG@10 recovered when spliced: fails when the 95% CI over test users lies
    wholly below `min_recovered` (a point estimate a hair under the bound, within the noise
    of a few thousand users, is not evidence of a worse SAE); when zero-ablating the layer
    costs nothing, the spliced NDCG@10 within 1% of the original instead."""
    original, spliced, ablated = quality.original, quality.spliced, quality.zero_ablated
    recovered = quality.fraction_recovered
    lo, hi = recovered_ci(quality)
    if original - ablated > ABLATION_GAP:
        passed = hi >= bounds.min_recovered
        verdict = (
            ">= bound"
            if recovered >= bounds.min_recovered
            else "within the CI of the bound"
            if passed
            else "below the bound: the whole CI"
        )
        description = (
            f"{recovered:.1%} of NDCG@10 recovered, 95% CI over users [{lo:.1%}, {hi:.1%}] "
            f"(bound {bounds.min_recovered:.0%}: {verdict})"
        )
    else:
        passed = spliced >= original - 0.01 * abs(original)
        description = (
            f"zero-ablating the layer does not lower NDCG@10 ({ablated:.4f} vs {original:.4f}); "
            f"spliced {spliced:.4f}"
        )
    metadata = {
        "original": original,
        "spliced": spliced,
        "zero_ablated": ablated,
        "fraction_recovered": recovered,
        "fraction_recovered_ci95_low": lo,
        "fraction_recovered_ci95_high": hi,
    }
    return CheckOutcome(passed, description, metadata)


def encoding_check(feature_path: Path, partition_dir: Path, rows: int, k: int) -> CheckOutcome:
    """The sparse code at `feature_path` has one code per activation row of `partition_dir`
    (`rows` encoded), at most `k` entries per row, every value finite and > 0."""
    source = read_parquet(feature_path)
    rows_in, entries, max_per_row, bad = duckdb.execute(
        f"""SELECT (SELECT count(*) FROM (SELECT DISTINCT user_idx, position FROM {source})),
                   count(*),
                   (SELECT max(c) FROM (SELECT count(*) c FROM {source} GROUP BY user_idx, position)),
                   count(*) FILTER (WHERE NOT isfinite(value) OR value <= 0)
            FROM {source}"""
    ).fetchone()  # type: ignore[misc]
    expected = partition_rows(partition_dir)
    problems = []
    if rows != expected:
        problems.append(f"encoded {rows} rows, the partition has {expected}")
    if max_per_row is not None and max_per_row > k:
        problems.append(f"a row has {max_per_row} entries > k={k}")
    if bad:
        problems.append(f"{bad} entries not finite or <= 0")
    metadata: dict[str, Any] = {"rows": rows, "rows_with_entries": rows_in, "entries": entries}
    return from_problems(
        problems, f"{rows:,} rows encoded, {rows_in:,} with an active feature", metadata
    )
