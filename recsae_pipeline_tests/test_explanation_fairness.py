"""What makes SAGE and the one-shot baseline comparable: the same evidence for both, features
labelled by how they were chosen, NaN scores counted, and concept naming for both methods."""

from __future__ import annotations

import math

from recsae_pipeline.data.catalog import Catalog, Item
from recsae_pipeline.interp.exemplars import Exemplars
from recsae_pipeline.interp.experiments import FeatureContext
from recsae_pipeline.interp.explain import (
    annotate_scores,
    paired_by_feature,
    select_features,
    summarize_scores,
)
from recsae_pipeline.interp.offline_policy import OfflinePolicy
from recsae_pipeline.interp.sage import Explanation, run_baseline
from recsae_pipeline.interp.spec import Spec
from recsae_pipeline.interp.windows import Window


def majority_band_context() -> FeatureContext:
    """78% of the catalog is tail; the 20 peak items are 90% tail and 70% Horror (base 25%),
    and the top 10 are all tail, only 7 of them Horror: the majority band is what a reader
    of the top 10 without base rates sees, Horror is what the base rates point at."""
    items = {}
    for i in range(1, 101):
        items[i] = Item(
            idx=i,
            item_id=f"i{i}",
            title=f"Film {i}",
            year=1950 + i % 6 * 10,
            genres=("Horror",) if i <= 25 else ("Drama",),
            popularity="tail" if i > 22 else ("head" if i <= 11 else "torso"),
            popularity_rank=i,
        )
    catalog = Catalog(items)
    # 23-25 are Horror and tail, 1-2 Horror and head, 30-35 Drama and tail.
    top10 = [23, 24, 25, 23, 24, 25, 23, 30, 31, 32]  # all tail, 7 Horror
    rest = [1, 2, 24, 25, 23, 24, 25, 33, 34, 35]  # 8 tail, 7 Horror
    peaks = top10 + rest
    windows = [Window(2 * u, 0, 0, (p,), (1.0 - u / 100,)) for u, p in enumerate(peaks)]
    attributes = [a for p in peaks for a in catalog[p].attributes()]
    shares = {a: attributes.count(a) / len(peaks) for a in set(attributes)}
    exemplars = Exemplars(
        windows=windows,
        scale=1.0,
        attribute_shares=shares,
        base_rates=catalog.base_rates,
        context={"share_after_2plus_same_genre": 0.0, "share_sequel_after_predecessor": 0.0},
    )
    return FeatureContext(5, catalog, None, None, exemplars)  # type: ignore[arg-type]


def test_offline_baseline_answers_from_the_evidence_sage_starts_from() -> None:
    ctx = majority_band_context()
    shares, base = ctx.exemplars.attribute_shares, ctx.exemplars.base_rates
    assert shares["popularity:tail"] == 0.9 and base["popularity:tail"] == 0.78
    assert shares["genre:Horror"] == 0.7 and base["genre:Horror"] == 0.25
    policy = OfflinePolicy()
    first = policy.hypotheses(ctx).hypotheses[0]
    baseline = run_baseline(ctx, policy)
    assert first.spec == Spec(genre="Horror")
    assert baseline.label == first.spec.describe() == "Horror films"  # not "obscure films"
    assert (
        "70% of the 20 peaks" in baseline.description and "base rate of 25%" in baseline.description
    )


def test_select_features_records_how_each_feature_was_chosen() -> None:
    rows = [
        {"feature": f, "n_active": 0 if f == 9 else 10, "frequency": 1.0 / (f + 1),
         "concept_auc": {4: 0.99, 5: 0.95, 1: 0.999}.get(f)}
        for f in range(10)
    ]  # fmt: skip
    chosen = select_features(rows, n_frequent=2, n_random=2, n_concept=2, seed=0)
    assert {f: s for f, s in chosen.items() if s != "random"} == {
        0: "frequent",
        1: "frequent",  # the most frequent wins over its concept AUC
        4: "concept",
        5: "concept",
    }
    random = [f for f, s in chosen.items() if s == "random"]
    assert len(random) == 2 and not set(random) & {0, 1, 4, 5, 9}
    assert set(chosen.values()) == {"frequent", "concept", "random"}


def _score(feature: int, method: str, selection: str, r: float, gen: float) -> dict:
    return {
        "feature": feature, "method": method, "backend": "offline", "selection": selection,
        "generative_accuracy": gen, "generative_accuracy_description": gen / 2,
        "predictive_r": r, "detection_auc": 0.5 + gen / 2,
        "names_concept": None if selection != "concept" else method == "sage" or feature == 3,
    }  # fmt: skip


def test_summary_counts_nans_and_keeps_the_concept_features_apart() -> None:
    nan = float("nan")
    scores = [
        _score(0, "sage", "frequent", 0.5, 1.0),
        _score(0, "baseline", "frequent", nan, 0.0),
        _score(1, "sage", "random", nan, 0.5),
        _score(1, "baseline", "random", 0.1, 0.5),
        _score(2, "sage", "concept", 0.9, 1.0),
        _score(2, "baseline", "concept", 0.8, 1.0),
        _score(3, "sage", "concept", 0.7, 1.0),
        _score(3, "baseline", "concept", 0.6, 0.5),
    ]
    summary = {(s["method"], s["subset"]): s for s in summarize_scores(scores)}
    assert set(summary) == {
        (m, s) for m in ("sage", "baseline") for s in ("headline", "concept", "all")
    }
    headline = summary["sage", "headline"]
    assert headline["n"] == 2 and headline["n_nan_predictive_r"] == 1
    assert headline["mean_predictive_r"] == 0.5  # over the one defined value, the NaN counted
    assert summary["baseline", "headline"]["n_nan_predictive_r"] == 1
    assert summary["sage", "all"]["n_nan_predictive_r"] == 1 and summary["sage", "all"]["n"] == 4
    assert headline["mean_generative_accuracy"] == 0.75  # features 0 and 1 only
    assert summary["sage", "concept"]["names_concept_share"] == 1.0
    assert summary["baseline", "concept"]["names_concept_share"] == 0.5  # beside SAGE's
    assert summary["sage", "concept"]["concept_features"] == 2
    assert math.isnan(headline["names_concept_share"]) and headline["concept_features"] == 0

    features, sage, base = paired_by_feature(scores, "predictive_r", ("frequent", "random"))
    assert features == [0, 1] and sage[0] == 0.5 and math.isnan(base[0]) and math.isnan(sage[1])


def test_names_concept_is_read_from_each_label_for_both_methods() -> None:
    ctx = majority_band_context()

    def explanation(method: str, label: str) -> Explanation:
        return Explanation(5, method, "offline", label, "", [], 0, 0, 0.0, {})  # type: ignore[arg-type]

    explained = [explanation("sage", "Horror films"), explanation("baseline", "obscure films")]
    scores = [{"scorer_usage": {}} for _ in explained]
    stats = {5: {"best_concept": "genre_pref:Horror", "concept_auc": 0.95}}
    rows = annotate_scores(scores, explained, {5: "concept"}, stats, ctx.catalog, 0.9)
    assert [(r["selection"], r["names_concept"]) for r in rows] == [
        ("concept", True),
        ("concept", False),
    ]
    low = annotate_scores([{"scorer_usage": {}}], explained[:1], {}, stats, ctx.catalog, 0.99)
    assert low[0]["names_concept"] is None and low[0]["selection"] == "explicit"
