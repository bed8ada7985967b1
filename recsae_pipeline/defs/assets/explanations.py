"""Explanation assets per (model, layer) partition: SAGE and the one-shot baseline on a
configured set of features, and both scored by the same scorer."""

import math
import time
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from recsae_pipeline.data.catalog import Catalog
from recsae_pipeline.defs.assets.features import feature_stats
from recsae_pipeline.defs.checks import check_result
from recsae_pipeline.defs.config import knob, to_domain
from recsae_pipeline.defs.partitions import partition_asset, partition_of
from recsae_pipeline.defs.progress import partition_progress, throttled_log
from recsae_pipeline.defs.resources import LLM, StorageRoot, TorchDevice
from recsae_pipeline.interp.explain import (
    HEADLINE,
    METHODS,
    METRICS,
    SUBSETS,
    LoadedPartition,
    annotate_scores,
    explain_features,
    paired_by_feature,
    score_features,
    select_features,
    summarize_scores,
)
from recsae_pipeline.interp.sage import Explanation, Limits
from recsae_pipeline.models.validation import CheckOutcome
from recsae_pipeline.report.plots import new_figure, save_figure
from recsae_pipeline.report.stats import Comparison, compare, format_ci
from recsae_pipeline.storage.atomic import atomic_path, write_parquet
from recsae_pipeline.storage.registry import TRANSCRIPTS_DIR

GROUP = "explanations"


class ExplanationsConfig(dg.Config):
    n_frequent: int = knob(select_features, "n_frequent", "The most frequent features.")
    n_concept: int = knob(
        select_features,
        "n_concept",
        "The features with the best planted-concept AUC (synthetic data).",
    )
    n_random: int = knob(
        select_features, "n_random", "A seeded random sample of other active features."
    )
    features: list[int] | None = Field(
        default=None, description="Explicit feature ids (overrides the above)."
    )
    max_tests_per_hypothesis: int = knob(Limits, "max_tests_per_hypothesis")
    max_sweeps: int = knob(Limits, "max_sweeps")
    max_reviews: int = knob(Limits, "max_reviews")
    max_llm_calls: int = knob(Limits, "max_llm_calls", "Per feature and method.")
    max_tokens: int = knob(Limits, "max_tokens", "Per feature and method.")
    seed: int = knob(select_features, "seed")


@partition_asset(
    "explanations",
    group=GROUP,
    kinds={"parquet"},
    stage=False,  # its table names each transcript's final path; written whole by atomic_path
    deps=[feature_stats],
    description="SAGE (hypotheses, experiments on crafted item sequences, verdicts, review) and "
    "the one-shot baseline, from the same exemplars and catalog context, on the configured "
    "features: how each feature was chosen (frequent/random/concept), label, description, "
    "hypotheses with verdicts, experiments, backend, LLM calls/tokens/cost, and a JSONL "
    "transcript per feature and method. explanations/model=<m>/layer=<l>/.",
)
def explanations(
    context: dg.AssetExecutionContext,
    config: ExplanationsConfig,
    storage: StorageRoot,
    device: TorchDevice,
    llm: LLM,
) -> dg.MaterializeResult:
    part = partition_of(context, storage.paths)
    stats = pq.read_table(part.feature_stats).to_pylist()
    selection = (
        dict.fromkeys(config.features, "explicit")
        if config.features
        else select_features(
            stats, config.n_frequent, config.n_random, config.n_concept, config.seed
        )
    )
    features = list(selection)
    limits = to_domain(config, Limits)
    log = throttled_log(context)

    def progress(done: int, total: int, e: Explanation) -> None:
        log(
            f"{context.partition_key}: {done}/{total} explained (feature {e.feature} {e.method}: {e.label!r})",
            done == total,
        )

    out = part.explanations_dir
    started = time.perf_counter()
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        loaded = LoadedPartition(storage.paths, part.model, part.layer, device.torch_device)
        explained = explain_features(
            loaded, features, llm.policy_factory(), tmp / TRANSCRIPTS_DIR, limits, METHODS,
            config.seed, progress,
        )  # fmt: skip
        rows = []
        for e in explained:
            row = e.as_row()
            if row["transcript"]:  # point at the final location, not the temp directory
                row["transcript"] = str(part.transcripts / Path(row["transcript"]).name)
            row["selection"] = selection[e.feature]
            rows.append(row)
        write_parquet(pa.Table.from_pylist(rows), tmp / part.explanations.name, row_group_size=None)
    storage.refresh_duckdb()
    sage_rows = [r for r in rows if r["method"] == "sage"]
    table = ["| feature | method | label |", "|---|---|---|"]
    table += [f"| {r['feature']} | {r['method']} | {r['label']} |" for r in rows[:40]]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "backend": rows[0]["backend"] if rows else llm.kind,
            "features": len(features),
            "features_by_selection": dg.MetadataValue.json(
                {
                    k: sum(v == k for v in selection.values())
                    for k in sorted(set(selection.values()))
                }
            ),
            "explanations": len(rows),
            "sage_mean_experiments": dg.MetadataValue.float(
                round(float(np.mean([r["experiments"] for r in sage_rows])), 2)
                if sage_rows
                else 0.0
            ),
            "llm_calls": int(sum(r["llm_calls"] for r in rows)),
            "llm_tokens": int(
                sum(r["llm_prompt_tokens"] + r["llm_completion_tokens"] for r in rows)
            ),
            "llm_cost_usd": dg.MetadataValue.float(
                round(float(sum(r["llm_cost_usd"] for r in rows)), 4)
            ),
            "seconds": dg.MetadataValue.float(round(time.perf_counter() - started, 1)),
            "labels": dg.MetadataValue.md("\n".join(table)),
        }
    )


class ExplanationScoresConfig(dg.Config):
    n_generated: int = knob(
        score_features, "n_generated", "Sequences the scorer writes per explanation."
    )
    min_concept_auc: float = Field(
        default=0.9,
        description="Features whose best planted-concept AUC reaches this are checked for naming it.",
    )
    seed: int = knob(score_features, "seed")


BEATS = ("generative_accuracy", "predictive_r")
"""The metrics `sage_beats_baseline` asks SAGE to win on, over the headline features."""
COMPARED = (*METRICS, "names_concept")


@partition_asset(
    "explanation_scores",
    group=GROUP,
    kinds={"parquet"},
    deps=[explanations],
    checks={
        "sage_beats_baseline": "On the headline features (chosen by frequency and at random), "
        "the 95% CI over features of SAGE minus baseline lies above zero for both generative "
        "accuracy (from the label) and predictive r. A research target: allowed to fail."
    },
    description="Generative accuracy (from the label, SAGE's protocol; and from label + "
    "description), predictive Pearson r and detection AUC of every explanation (the scorer "
    "sees only the text), whether the label names the feature's planted concept (both "
    "methods), per feature; a summary per method and subset (headline = frequent + random "
    "features, concept, all) with NaN counts and SAGE minus baseline with its 95% CI.",
)
def explanation_scores(
    context: dg.AssetExecutionContext,
    config: ExplanationScoresConfig,
    storage: StorageRoot,
    device: TorchDevice,
    llm: LLM,
) -> dg.MaterializeResult:
    part = partition_of(context, storage.paths)
    explained_rows = pq.read_table(part.explanations).to_pylist()
    explained = [Explanation.from_row(r) for r in explained_rows]
    selection = {r["feature"]: r.get("selection") or "explicit" for r in explained_rows}
    loaded = LoadedPartition(storage.paths, part.model, part.layer, device.torch_device)
    scores = score_features(
        loaded, explained, llm.scorer_factory(), config.seed, config.n_generated,
        on_progress=partition_progress(context, "scored {done}/{total}"),
    )  # fmt: skip
    stats = {r["feature"]: r for r in pq.read_table(part.feature_stats).to_pylist()}
    scores = annotate_scores(
        scores, explained, selection, stats, Catalog.load(storage.paths), config.min_concept_auc
    )
    comparisons = _comparisons(scores, config.seed)
    summary = summarize_scores(scores)
    for row in summary:
        for metric, c in comparisons[row["subset"]].items():
            row[f"sage_minus_baseline_{metric}"] = c.difference
            row[f"ci95_low_{metric}"], row[f"ci95_high_{metric}"] = c.ci95
            row[f"n_paired_{metric}"] = c.n
            row[f"verdict_{metric}"] = c.verdict
    out = part.explanation_scores_dir
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        scores_table, summary_table = pa.Table.from_pylist(scores), pa.Table.from_pylist(summary)
        write_parquet(scores_table, tmp / part.explanation_scores.name, row_group_size=None)
        write_parquet(summary_table, tmp / part.explanation_summary.name, row_group_size=None)
    storage.refresh_duckdb()
    headline = comparisons["headline"]
    passed = all(headline[m].n > 0 and headline[m].ci95[0] > 0 for m in BEATS)
    description = (
        f"headline features (frequent + random, n={headline[BEATS[0]].n}): "
        + "; ".join(_sentence(headline[m]) for m in BEATS)
        + ". Passes when both CIs lie above zero."
    )
    check = check_result(
        "sage_beats_baseline",
        CheckOutcome(
            passed,
            description,
            {
                "comparisons": dg.MetadataValue.json(
                    _finite([headline[m].as_dict() for m in BEATS])
                ),
                **{
                    f"{side}_{m}": dg.MetadataValue.float(_round(getattr(headline[m], side).value))
                    for m in BEATS
                    for side in ("a", "b")
                },
            },
        ),
        dg.AssetCheckSeverity.WARN,
    )
    plot = _scores_plot(scores, context.partition_key, part.report("explanation_scores"))
    return dg.MaterializeResult(
        check_results=[check],
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "headline": dg.MetadataValue.md(_table(comparisons["headline"], summary, "headline")),
            "concept": dg.MetadataValue.md(_table(comparisons["concept"], summary, "concept")),
            "summary": dg.MetadataValue.md(_cost_table(summary)),
            "comparisons": dg.MetadataValue.json(
                _finite({k: [c.as_dict() for c in v.values()] for k, v in comparisons.items()})
            ),
            "scores": dg.MetadataValue.md(plot),
            **{
                f"{s['method']}_{k}": dg.MetadataValue.float(_round(s[k]))
                for s in summary
                if s["subset"] == "headline"
                for k in (
                    "mean_generative_accuracy",
                    "mean_generative_accuracy_description",
                    "mean_predictive_r",
                    "mean_detection_auc",
                    "names_concept_share",
                )
            },
            **{
                f"{s['method']}_n_nan_{m}": dg.MetadataValue.int(s[f"n_nan_{m}"])
                for s in summary
                if s["subset"] == "headline"
                for m in METRICS
            },
        },
    )


def _comparisons(scores: list[dict], seed: int) -> dict[str, dict[str, Comparison]]:
    """Per subset and metric: SAGE, the baseline and SAGE minus baseline with its paired 95%
    CI over features (NaN pairs counted in `n_nan`)."""
    out: dict[str, dict[str, Comparison]] = {}
    for subset, selections in SUBSETS.items():
        out[subset] = {}
        for metric in COMPARED:
            features, sage, base = paired_by_feature(scores, metric, selections)
            out[subset][metric] = compare(
                f"explanations {subset}: SAGE vs baseline, {metric}",
                metric,
                "sage",
                sage,
                "baseline",
                base,
                unit="features",
                seed=seed,
                subset=subset,
                features=features,
            )
    return out


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float as None, for JSON metadata."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _round(value: float) -> float:
    return round(float(value), 4) if np.isfinite(value) else float("nan")


def _sentence(c: Comparison) -> str:
    return (
        f"{c.metric}: sage {c.a.value:.3f} vs baseline {c.b.value:.3f}, difference "
        f"{format_ci(c, 3)} over {c.n} features"
        + (f" ({c.n_nan} with a NaN side left out)" if c.n_nan else "")
        + f": {c.verdict}"
    )


def _table(comparisons: dict[str, Comparison], summary: list[dict], subset: str) -> str:
    """Markdown: per metric SAGE, baseline, SAGE minus baseline [95% CI], n, NaNs, verdict."""
    n = {s["method"]: s["n"] for s in summary if s["subset"] == subset}
    lines = [
        f"{subset} features: sage n={n.get('sage', 0)}, baseline n={n.get('baseline', 0)}",
        "",
        "| metric | sage | baseline | sage - baseline [95% CI] | paired n | NaN pairs | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for metric, c in comparisons.items():
        lines.append(
            f"| {metric} | {c.a.value:.3f} | {c.b.value:.3f} | {format_ci(c, 3)} | {c.n} | "
            f"{c.n_nan} | {c.verdict} |"
        )
    return "\n".join(lines)


def _cost_table(summary: list[dict]) -> str:
    lines = [
        "| method | subset | n | NaN r | NaN AUC | LLM calls | tokens | cost $ | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['method']} | {s['subset']} | {s['n']} | {s['n_nan_predictive_r']} | "
            f"{s['n_nan_detection_auc']} | {s['llm_calls']} | {s['llm_tokens']} | "
            f"{s['llm_cost_usd']:.4f} | {s['seconds']:.1f} |"
        )
    return "\n".join(lines)


def _scores_plot(scores: list[dict], title: str, path: Path) -> str:
    """Per metric, each method's per-feature values (finite ones; NaNs are counted in the
    summary), headline features as dots and concept-selected ones as crosses."""
    fig, axes = new_figure(10, 3.2, ncols=3)
    for ax, key, label in zip(
        axes,
        ("generative_accuracy", "predictive_r", "detection_auc"),
        ("generative accuracy (label)", "predictive Pearson r", "detection AUC"),
        strict=True,
    ):
        data = [
            [
                s[key]
                for s in scores
                if s["method"] == m and s[key] is not None and np.isfinite(s[key])
            ]
            for m in METHODS
        ]
        ax.boxplot(data, tick_labels=list(METHODS))
        for i, method in enumerate(METHODS, start=1):
            for marker, selections in (("o", HEADLINE), ("x", ("concept",))):
                values = [
                    s[key]
                    for s in scores
                    if s["method"] == method
                    and s["selection"] in selections
                    and s[key] is not None
                    and np.isfinite(s[key])
                ]
                ax.scatter(
                    np.full(len(values), i) + np.linspace(-0.08, 0.08, len(values)),
                    values,
                    s=10,
                    alpha=0.6,
                    marker=marker,
                )
        ax.set_title(label)
    fig.suptitle(f"Explanation scores, {title} (o: frequent/random, x: concept-selected)")
    return save_figure(fig, path)
