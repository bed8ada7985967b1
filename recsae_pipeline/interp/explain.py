"""Explain and score a set of features of one (model, layer): the driver behind the
`explanations` assets and `recsae explain`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recsae_pipeline.data.catalog import Catalog
from recsae_pipeline.interp.exemplars import exemplars
from recsae_pipeline.interp.experiments import FeatureContext, context_prefixes
from recsae_pipeline.interp.probe import FeatureProbe
from recsae_pipeline.interp.sage import (
    Explanation,
    Limits,
    Policy,
    Transcript,
    run_baseline,
    run_sage,
)
from recsae_pipeline.interp.scoring import Scorer, score_explanation, scoring_set
from recsae_pipeline.interp.spec import parse_spec
from recsae_pipeline.interp.windows import FeatureData
from recsae_pipeline.models.artifacts import load_recommender
from recsae_pipeline.sae.model import TopKSae
from recsae_pipeline.storage.registry import ArtifactPaths

METHODS = ("baseline", "sage")


def select_features(
    rows: list[dict], n_frequent: int = 10, n_random: int = 10, n_concept: int = 10, seed: int = 0
) -> list[int]:
    """The `n_frequent` most frequent features, the `n_concept` with the best planted-concept
    AUC (synthetic data), and a seeded random sample of `n_random` other active ones."""
    active = [r for r in rows if r["n_active"] > 0]
    chosen: list[int] = [
        r["feature"]
        for r in sorted(active, key=lambda r: (-r["frequency"], r["feature"]))[:n_frequent]
    ]
    with_auc = [
        r for r in active if r.get("concept_auc") is not None and r["feature"] not in chosen
    ]
    chosen += [
        r["feature"]
        for r in sorted(with_auc, key=lambda r: (-r["concept_auc"], r["feature"]))[:n_concept]
    ]
    rest = sorted(r["feature"] for r in active if r["feature"] not in chosen)
    if rest and n_random:
        rng = np.random.default_rng(seed)
        chosen += sorted(
            int(f) for f in rng.choice(rest, size=min(n_random, len(rest)), replace=False)
        )
    return chosen


def concept_named(concept: str, explanation: str, catalog: Catalog) -> bool:
    """Whether the explanation names a planted concept (as the offline scorer reads it):
    genre_pref:G / genre_binge:G -> genre G; era:D -> decade D; popular -> 'popular';
    franchise_next -> a sequel or a franchise."""
    spec = parse_spec(explanation, catalog)
    kind, _, value = concept.partition(":")
    if kind in ("genre_pref", "genre_binge"):
        return spec.genre == value
    if kind == "era":
        return spec.decade == value
    if kind == "popular":
        return spec.popularity == "head"
    if kind == "franchise_next":
        return spec.sequel or spec.franchise is not None
    return False


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
                transcript = Transcript(path)
                loaded.probe.runs = 0
                try:
                    policy = policy_factory()
                    if hasattr(policy, "on_call"):  # LLM policies: every prompt and raw reply
                        policy.on_call = lambda record, t=transcript: t.write(
                            "llm_call", call=record.as_dict()
                        )
                    if method == "sage":
                        explanation = run_sage(ctx, policy, limits, transcript)
                    else:
                        explanation = run_baseline(ctx, policy, transcript)
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
