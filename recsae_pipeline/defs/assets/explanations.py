"""Explanation assets per (model, layer) partition: SAGE and the one-shot baseline on a
configured set of features, and both scored by the same scorer."""

import time
from pathlib import Path

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
    METHODS,
    LoadedPartition,
    concept_named,
    explain_features,
    score_features,
    select_features,
)
from recsae_pipeline.interp.sage import Explanation, Limits
from recsae_pipeline.models.validation import CheckOutcome
from recsae_pipeline.report.plots import new_figure, save_figure
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
    "the one-shot baseline on the configured features: label, description, hypotheses with "
    "verdicts, experiments, backend, LLM calls/tokens/cost, and a JSONL transcript per "
    "feature and method. explanations/model=<m>/layer=<l>/.",
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
    features = config.features or select_features(
        stats, config.n_frequent, config.n_random, config.n_concept, config.seed
    )
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


@partition_asset(
    "explanation_scores",
    group=GROUP,
    kinds={"parquet"},
    deps=[explanations],
    checks={
        "sage_beats_baseline": "SAGE's mean generative accuracy and mean predictive r above the baseline's."
    },
    description="Generative accuracy, predictive Pearson r and detection AUC of every "
    "explanation (the scorer sees only the text), per feature and a per-method summary.",
)
def explanation_scores(
    context: dg.AssetExecutionContext,
    config: ExplanationScoresConfig,
    storage: StorageRoot,
    device: TorchDevice,
    llm: LLM,
) -> dg.MaterializeResult:
    part = partition_of(context, storage.paths)
    explained = [Explanation.from_row(r) for r in pq.read_table(part.explanations).to_pylist()]
    loaded = LoadedPartition(storage.paths, part.model, part.layer, device.torch_device)
    scores = score_features(
        loaded, explained, llm.scorer_factory(), config.seed, config.n_generated,
        on_progress=partition_progress(context, "scored {done}/{total}"),
    )  # fmt: skip
    stats = {r["feature"]: r for r in pq.read_table(part.feature_stats).to_pylist()}
    catalog = Catalog.load(storage.paths)
    for score, e in zip(scores, explained, strict=True):
        concept = stats.get(e.feature, {}).get("best_concept")
        auc = stats.get(e.feature, {}).get("concept_auc")
        score["best_concept"] = concept
        score["concept_auc"] = auc
        score["names_concept"] = (
            concept_named(concept, e.text, catalog)
            if concept and auc is not None and auc >= config.min_concept_auc
            else None
        )
        score["label"] = e.label
        score["llm_calls"] = e.usage.get("calls", 0)
        score["llm_tokens"] = e.usage.get("prompt_tokens", 0) + e.usage.get("completion_tokens", 0)
        score["llm_cost_usd"] = e.usage.get("cost_usd", 0.0)
        score["seconds"] = e.seconds
        score["scorer_usage"] = str(score["scorer_usage"])
    out = part.explanation_scores_dir
    summary = _summary(scores)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        scores_table, summary_table = pa.Table.from_pylist(scores), pa.Table.from_pylist(summary)
        write_parquet(scores_table, tmp / part.explanation_scores.name, row_group_size=None)
        write_parquet(summary_table, tmp / part.explanation_summary.name, row_group_size=None)
    storage.refresh_duckdb()
    by_method = {s["method"]: s for s in summary}
    sage, base = by_method.get("sage"), by_method.get("baseline")
    passed = bool(
        sage and base
        and sage["mean_generative_accuracy"] > base["mean_generative_accuracy"]
        and sage["mean_predictive_r"] > base["mean_predictive_r"]
    )  # fmt: skip
    lines = ["| method | mean generative accuracy | mean r | detection AUC | names concept | LLM calls | tokens | cost $ | s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary:
        named = (
            "-"
            if s["concept_features"] == 0
            else f"{s['names_concept_share']:.0%} of {s['concept_features']}"
        )
        lines.append(
            f"| {s['method']} | {s['mean_generative_accuracy']:.3f} | {s['mean_predictive_r']:.3f} | "
            f"{s['mean_detection_auc']:.3f} | {named} | {s['llm_calls']} | {s['llm_tokens']} | "
            f"{s['llm_cost_usd']:.4f} | {s['seconds']:.1f} |"
        )
    plot = _scores_plot(scores, context.partition_key, part.report("explanation_scores"))
    description = " vs ".join(
        f"{s['method']}: gen {s['mean_generative_accuracy']:.3f}, r {s['mean_predictive_r']:.3f}"
        for s in summary
    )
    check = check_result(
        "sage_beats_baseline", CheckOutcome(passed, description, {}), dg.AssetCheckSeverity.WARN
    )
    return dg.MaterializeResult(
        check_results=[check],
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "summary": dg.MetadataValue.md("\n".join(lines)),
            "scores": dg.MetadataValue.md(plot),
            **{
                f"{s['method']}_{k}": dg.MetadataValue.float(round(float(s[k]), 4))
                for s in summary
                for k in ("mean_generative_accuracy", "mean_predictive_r", "mean_detection_auc")
            },
        },
    )


def _mean(values: list) -> float:
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _summary(scores: list[dict]) -> list[dict]:
    out = []
    for method in METHODS:
        rows = [s for s in scores if s["method"] == method]
        if not rows:
            continue
        named = [s["names_concept"] for s in rows if s["names_concept"] is not None]
        out.append(
            {
                "method": method,
                "backend": rows[0]["backend"],
                "features": len(rows),
                "mean_generative_accuracy": _mean([s["generative_accuracy"] for s in rows]),
                "mean_predictive_r": _mean([s["predictive_r"] for s in rows]),
                "mean_detection_auc": _mean([s["detection_auc"] for s in rows]),
                "concept_features": len(named),
                "names_concept_share": float(np.mean(named)) if named else float("nan"),
                "llm_calls": int(sum(s["llm_calls"] for s in rows)),
                "llm_tokens": int(sum(s["llm_tokens"] for s in rows)),
                "llm_cost_usd": float(sum(s["llm_cost_usd"] for s in rows)),
                "seconds": float(sum(s["seconds"] for s in rows)),
            }
        )
    return out


def _scores_plot(scores: list[dict], title: str, path: Path) -> str:
    fig, axes = new_figure(10, 3.2, ncols=3)
    for ax, key, label in zip(
        axes,
        ("generative_accuracy", "predictive_r", "detection_auc"),
        ("generative accuracy", "predictive Pearson r", "detection AUC"),
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
        for i, values in enumerate(data, start=1):
            ax.scatter(
                np.full(len(values), i) + np.linspace(-0.08, 0.08, len(values)),
                values,
                s=8,
                alpha=0.6,
            )
        ax.set_title(label)
    fig.suptitle(f"Explanation scores, {title}")
    return save_figure(fig, path)
