"""Explain and score a set of features of one (model, layer): the driver behind the
`explanations` assets and `recsae explain`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recsae_pipeline.data.catalog import Catalog
from recsae_pipeline.interp import sage
from recsae_pipeline.interp.exemplars import exemplars
from recsae_pipeline.interp.experiments import FeatureContext, context_prefixes
from recsae_pipeline.interp.probe import FeatureProbe
from recsae_pipeline.interp.sage import Explanation, Limits, Policy
from recsae_pipeline.interp.scoring import Scorer, score_explanation, scoring_set
from recsae_pipeline.interp.spec import parse_claims
from recsae_pipeline.interp.windows import FeatureData
from recsae_pipeline.models.artifacts import load_recommender
from recsae_pipeline.sae.model import TopKSae
from recsae_pipeline.storage.registry import ArtifactPaths

METHODS = ("baseline", "sage")
SELECTIONS = ("frequent", "random", "concept")
"""How `select_features` chose a feature; "explicit" marks features a caller listed."""
HEADLINE = ("frequent", "random")
"""The selections the headline comparison is on: features chosen by frequency and at random.
Concept-selected features (best planted-concept AUC) are easy cases, reported apart."""
SUBSETS: dict[str, tuple[str, ...] | None] = {
    "headline": HEADLINE,
    "concept": ("concept",),
    "all": None,
}
"""The feature subsets every summary and comparison is reported on (None: every feature)."""
METRICS = (
    "generative_accuracy",
    "generative_accuracy_description",
    "predictive_r",
    "detection_auc",
)


def select_features(
    rows: list[dict], n_frequent: int = 10, n_random: int = 10, n_concept: int = 10, seed: int = 0
) -> dict[int, str]:
    """Feature -> how it was chosen: the `n_frequent` most frequent features ("frequent"),
    the `n_concept` others with the best planted-concept AUC ("concept", synthetic data),
    and a seeded random sample of `n_random` other active ones ("random")."""
    active = [r for r in rows if r["n_active"] > 0]
    chosen: dict[int, str] = {
        int(r["feature"]): "frequent"
        for r in sorted(active, key=lambda r: (-r["frequency"], r["feature"]))[:n_frequent]
    }
    with_auc = [
        r for r in active if r.get("concept_auc") is not None and r["feature"] not in chosen
    ]
    for r in sorted(with_auc, key=lambda r: (-r["concept_auc"], r["feature"]))[:n_concept]:
        chosen[int(r["feature"])] = "concept"
    rest = sorted(r["feature"] for r in active if r["feature"] not in chosen)
    if rest and n_random:
        rng = np.random.default_rng(seed)
        for f in sorted(rng.choice(rest, size=min(n_random, len(rest)), replace=False)):
            chosen[int(f)] = "random"
    return chosen


def concept_named(concept: str, label: str, catalog: Catalog) -> bool:
    """Whether an explanation's label names a planted concept in any of its claims (as the
    offline scorer reads it): genre_pref:G / genre_binge:G -> genre G; era:D -> decade D;
    popular -> 'popular'; franchise_next -> a sequel or a franchise. The same reading for
    every method."""
    kind, _, value = concept.partition(":")
    for spec in parse_claims(label, catalog):
        if kind in ("genre_pref", "genre_binge") and spec.genre == value:
            return True
        if kind == "era" and spec.decade == value:
            return True
        if kind == "popular" and spec.popularity == "head":
            return True
        if kind == "franchise_next" and (spec.sequel or spec.franchise is not None):
            return True
    return False


def annotate_scores(
    scores: list[dict],
    explanations: list[Explanation],
    selection: dict[int, str],
    stats: dict[int, dict],
    catalog: Catalog,
    min_concept_auc: float,
) -> list[dict]:
    """Each score row (in the order of `explanations`) with how its feature was chosen, its
    best planted concept and AUC (from feature_stats), whether the label names that concept
    (None when the feature has no concept with AUC >= `min_concept_auc`; computed the same
    way for every method), the label and the explainer's cost."""
    for score, e in zip(scores, explanations, strict=True):
        concept = stats.get(e.feature, {}).get("best_concept")
        auc = stats.get(e.feature, {}).get("concept_auc")
        score["selection"] = selection.get(e.feature, "explicit")
        score["best_concept"] = concept
        score["concept_auc"] = auc
        score["names_concept"] = (
            concept_named(concept, e.label, catalog)
            if concept and auc is not None and auc >= min_concept_auc
            else None
        )
        score["label"] = e.label
        score["llm_calls"] = e.usage.get("calls", 0)
        score["llm_tokens"] = e.usage.get("prompt_tokens", 0) + e.usage.get("completion_tokens", 0)
        score["llm_cost_usd"] = e.usage.get("cost_usd", 0.0)
        score["seconds"] = e.seconds
        score["scorer_usage"] = str(score["scorer_usage"])
    return scores


def summarize_scores(scores: list[dict]) -> list[dict]:
    """One row per (method, subset), every subset even when empty (`SUBSETS`); n, the mean
    of each metric over the features where it is defined and the count where it is NaN
    (never dropped unseen), and the share of features with a planted concept whose label
    names it."""
    out = []
    for subset, selections in SUBSETS.items():
        for method in METHODS:
            rows = [
                s
                for s in scores
                if s["method"] == method and (selections is None or s["selection"] in selections)
            ]
            backends = sorted({s["backend"] for s in scores if s["method"] == method})
            row: dict = {
                "method": method,
                "subset": subset,
                "backend": ", ".join(backends),
                "n": len(rows),
            }
            for metric in METRICS:
                values = np.array([_float(s[metric]) for s in rows], dtype=np.float64)
                finite = values[np.isfinite(values)]
                row[f"mean_{metric}"] = float(finite.mean()) if len(finite) else float("nan")
                row[f"n_nan_{metric}"] = int(len(values) - len(finite))
            named = [s["names_concept"] for s in rows if s.get("names_concept") is not None]
            row["concept_features"] = len(named)
            row["names_concept_share"] = float(np.mean(named)) if named else float("nan")
            for key in ("llm_calls", "llm_tokens"):
                row[key] = int(sum(s.get(key, 0) for s in rows))
            row["llm_cost_usd"] = float(sum(s.get("llm_cost_usd", 0.0) for s in rows))
            row["seconds"] = float(sum(s.get("seconds", 0.0) for s in rows))
            out.append(row)
    return out


def paired_by_feature(
    scores: list[dict], metric: str, selections: tuple[str, ...] | None
) -> tuple[list[int], list[float], list[float]]:
    """(features, SAGE's values, the baseline's values) of `metric`, paired by feature, over
    the features of `selections` (None: all) explained by both methods; NaN kept (and
    None -> NaN), for the comparison to count."""
    by: dict[str, dict[int, float]] = {m: {} for m in METHODS}
    for s in scores:
        if selections is None or s["selection"] in selections:
            by[s["method"]][int(s["feature"])] = _float(s.get(metric))
    features = sorted(set(by["sage"]) & set(by["baseline"]))
    return features, [by["sage"][f] for f in features], [by["baseline"][f] for f in features]


def _float(value: object) -> float:
    return float("nan") if value is None else float(value)  # type: ignore[arg-type]


class LoadedPartition:
    """Catalog, model, SAE and probe of one (model, layer), loaded once and shared by
    `explain_features` and `score_features`."""

    def __init__(
        self, paths: ArtifactPaths, model_name: str, layer: int, device: torch.device | str
    ) -> None:
        self.paths, self.model_name, self.layer = paths, model_name, layer
        self.catalog = Catalog.load(paths)
        self.model = load_recommender(paths.model_dir(model_name), device)
        sae = TopKSae.load(paths.partition_dir("sae", model_name, layer), device)
        self.probe = FeatureProbe(self.model, sae, layer, device)

    def context(self, feature: int, seed: int) -> tuple[FeatureContext, FeatureData]:
        data = FeatureData(
            self.paths, self.model_name, self.layer, feature, self.model.config.max_len
        )
        ex = exemplars(data, self.catalog)
        prefixes = context_prefixes(data, 6, 7, seed + feature)
        return FeatureContext(feature, self.catalog, self.probe, data, ex, seed, prefixes), data


def explain_features(
    loaded: LoadedPartition,
    features: list[int],
    policy_factory: Callable[[], Policy],
    transcripts_dir: Path | None,
    limits: Limits | None = None,
    methods: tuple[str, ...] = METHODS,
    seed: int = 0,
    on_progress: Callable[[int, int, Explanation], None] | None = None,
) -> list[Explanation]:
    """Every method on every feature, each with a fresh policy (so usage is per feature).
    Transcripts go to `transcripts_dir/feature_<f>_<method>.jsonl`."""
    out: list[Explanation] = []
    total = len(features) * len(methods)
    for feature in features:
        ctx, data = loaded.context(feature, seed)
        try:
            for method in methods:
                path = (
                    None
                    if transcripts_dir is None
                    else transcripts_dir / f"feature_{feature}_{method}.jsonl"
                )
                transcript = sage.Transcript(path)
                loaded.probe.runs = 0
                try:
                    policy = policy_factory()
                    if hasattr(policy, "on_call"):  # LLM policies: every prompt and raw reply
                        policy.on_call = lambda record, t=transcript: t.write(
                            "llm_call", call=record.as_dict()
                        )
                    if method == "sage":
                        explanation = sage.run_sage(ctx, policy, limits, transcript)
                    else:
                        explanation = sage.run_baseline(ctx, policy, transcript)
                finally:
                    transcript.close()
                out.append(explanation)
                if on_progress is not None:
                    on_progress(len(out), total, explanation)
        finally:
            data.close()
    return out


def score_features(
    loaded: LoadedPartition,
    explanations: list[Explanation],
    scorer_factory: Callable[[], Scorer],
    seed: int = 0,
    n_generated: int = 10,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Score each explanation with a fresh scorer that sees only its text; every method of
    a feature is scored on the same held-out windows (seeded by the feature)."""
    rows = []
    by_feature: dict[int, list[Explanation]] = {}
    for e in explanations:
        by_feature.setdefault(e.feature, []).append(e)
    for feature, group in by_feature.items():
        ctx, data = loaded.context(feature, seed)
        try:
            scoring = scoring_set(data, loaded.catalog, ctx.exemplars.scale, seed=seed + feature)
            for e in group:
                scorer = scorer_factory()
                row = score_explanation(e, ctx, scoring, scorer, n_generated)
                row["scorer_usage"] = scorer.usage()
                rows.append(row)
                if on_progress is not None:
                    on_progress(len(rows), len(explanations))
        finally:
            data.close()
    return rows
