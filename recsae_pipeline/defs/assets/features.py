"""Feature assets per (model, layer) partition: the sparse feature activations, per-feature
statistics with the monosemanticity comparison against raw neurons, and steering."""

from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field

from recsae_pipeline.data.catalog import Catalog
from recsae_pipeline.data.sequences import read_sequences
from recsae_pipeline.defs.assets.sae import sae
from recsae_pipeline.defs.checks import check_result
from recsae_pipeline.defs.config import knob
from recsae_pipeline.defs.partitions import partition_asset, partition_of
from recsae_pipeline.defs.progress import partition_progress
from recsae_pipeline.defs.resources import StorageRoot, TorchDevice
from recsae_pipeline.models.artifacts import load_recommender
from recsae_pipeline.models.validation import CheckOutcome
from recsae_pipeline.report.plots import new_figure, save_figure
from recsae_pipeline.sae.evaluation import encoding_check
from recsae_pipeline.sae.features import (
    compute_feature_stats,
    write_feature_activations,
)
from recsae_pipeline.sae.model import TopKSae
from recsae_pipeline.sae.steering import (
    genre_items,
    genre_targets,
    steering_sweep,
    steering_users,
    summarize,
)
from recsae_pipeline.storage.atomic import atomic_path, write_parquet
from recsae_pipeline.storage.registry import PartitionPaths
from recsae_pipeline.storage.sql import sql_literal

GROUP = "features"


def _load_sae(part: PartitionPaths, device: torch.device) -> TopKSae:
    if not part.sae_weights.exists():
        raise dg.Failure(
            f"{part.sae} holds no sae.safetensors; materialize the `sae` asset for partition "
            f"{part.key} first (`recsae materialize` runs every partition)."
        )
    return TopKSae.load(part.sae, device)


@partition_asset(
    "feature_activations",
    group=GROUP,
    kinds={"parquet", "duckdb"},
    deps=[sae],
    checks={
        "every_row_encoded": "One code per activation row, at most k entries per row, all values finite and > 0."
    },
    blocking=True,
    description="The SAE code of every activation row, sparse: user_idx, position, item_idx, "
    "feature, value (only the top-k per row), sorted by feature then value; DuckDB view "
    "`feature_activations` with `model` and `layer` columns.",
)
def feature_activations(
    context: dg.AssetExecutionContext, storage: StorageRoot, device: TorchDevice
) -> dg.MaterializeResult:
    part = partition_of(context, storage.paths)
    dev = device.torch_device
    trained = _load_sae(part, dev)
    shards, out = part.activations, part.feature_activations
    progress = partition_progress(context, "encoded {done:,}/{total:,} rows")
    report = write_feature_activations(trained, shards, out, dev, on_progress=progress)
    storage.refresh_duckdb()
    check = encoding_check(out, shards, report.rows, trained.config.k)
    return dg.MaterializeResult(
        check_results=[check_result("every_row_encoded", check)],
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "dagster/row_count": report.entries,
            "activation_rows": report.rows,
            "entries_per_row": dg.MetadataValue.float(
                round(report.entries / max(report.rows, 1), 2)
            ),
            "active_features": report.active_features,
            "latents": trained.config.n_latents,
            "megabytes": dg.MetadataValue.float(round(report.bytes / 2**20, 2)),
            "seconds": dg.MetadataValue.float(round(report.seconds, 2)),
            "example_sql": dg.MetadataValue.md(
                "```sql\nSELECT f.value, i.title FROM feature_activations f JOIN items i USING (item_idx)\n"
                f"WHERE model = {sql_literal(part.model)} AND layer = {part.layer} AND feature = 0\nORDER BY value DESC LIMIT 10\n```"
            ),
        },
    )


class FeatureStatsConfig(dg.Config):
    top_n: int = knob(
        compute_feature_stats,
        "top_n",
        "Distinct top items per unit behind enrichment and monosemanticity.",
    )
    min_support: int = knob(
        compute_feature_stats,
        "min_support",
        "Units with fewer top items get no enrichment or score.",
    )
    max_sample_rows: int = knob(
        compute_feature_stats,
        "max_sample_rows",
        "Rows (whole users) behind the planted-concept AUCs.",
    )
    min_positives: int = knob(
        compute_feature_stats,
        "min_positives",
        "Planted concepts with fewer positive sampled rows are skipped.",
    )


@partition_asset(
    "feature_stats",
    group=GROUP,
    kinds={"parquet", "duckdb"},
    deps=[feature_activations],
    checks={
        "sae_more_monosemantic_than_neurons": "Median monosemanticity of SAE features above that of raw hidden dimensions (both signs)."
    },
    description="Per SAE feature: frequency, mean/max activation, top items, attribute "
    "enrichment (genre, decade, popularity band, franchise) and a monosemanticity score; the "
    "same score for the raw hidden dimensions in both signs; on synthetic data, the best "
    "feature's AUC for each planted concept. feature_stats/model=<m>/layer=<l>/*.parquet.",
)
def feature_stats(
    context: dg.AssetExecutionContext,
    config: FeatureStatsConfig,
    storage: StorageRoot,
    device: TorchDevice,
) -> dg.MaterializeResult:
    part = partition_of(context, storage.paths)
    dev = device.torch_device
    trained = _load_sae(part, dev)
    stats = compute_feature_stats(
        trained,
        storage.paths,
        part.model,
        part.layer,
        dev,
        top_n=config.top_n,
        min_support=config.min_support,
        max_sample_rows=config.max_sample_rows,
        min_positives=config.min_positives,
    )
    out = part.feature_stats_dir
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_parquet(stats.features, tmp / part.feature_stats.name, row_group_size=None)
        write_parquet(stats.neurons, tmp / part.neuron_stats.name, row_group_size=None)
        write_parquet(stats.enrichment, tmp / part.feature_enrichment.name, row_group_size=None)
        if stats.concepts is not None:
            write_parquet(stats.concepts, tmp / part.planted_concepts.name, row_group_size=None)
    storage.refresh_duckdb()

    feature_scores = _valid(stats.features.column("monosemanticity").to_numpy(zero_copy_only=False))
    neuron_scores = _valid(stats.neurons.column("monosemanticity").to_numpy(zero_copy_only=False))
    sae_median = float(np.median(feature_scores)) if len(feature_scores) else float("nan")
    neuron_median = float(np.median(neuron_scores)) if len(neuron_scores) else float("nan")
    histogram = _monosemanticity_plot(
        feature_scores, neuron_scores, context.partition_key, part.report("monosemanticity")
    )
    metadata: dict = {
        "path": dg.MetadataValue.path(str(out)),
        "features_scored": len(feature_scores),
        "neuron_signs_scored": len(neuron_scores),
        "median_monosemanticity_sae": dg.MetadataValue.float(round(sae_median, 4)),
        "median_monosemanticity_neurons": dg.MetadataValue.float(round(neuron_median, 4)),
        "monosemanticity": dg.MetadataValue.md(histogram),
        "most_monosemantic": dg.MetadataValue.md(_top_features_md(stats.features)),
    }
    if stats.concepts is not None:
        concepts = stats.concepts.to_pylist()
        metadata |= {
            "planted_concepts": len(concepts),
            "concepts_auc_ge_0.9": sum(c["feature_auc"] >= 0.9 for c in concepts),
            "median_best_feature_auc": dg.MetadataValue.float(
                round(float(np.median([c["feature_auc"] for c in concepts])), 4)
            ),
            "median_best_neuron_auc": dg.MetadataValue.float(
                round(float(np.median([c["neuron_auc"] for c in concepts])), 4)
            ),
            "concept_sample_rows": stats.sample_rows,
            "planted_concept_auc": dg.MetadataValue.md(
                _concept_plot(concepts, context.partition_key, part.report("concepts"))
            ),
        }
    context.log.info(
        f"{context.partition_key}: median monosemanticity SAE {sae_median:.3f} vs neurons "
        f"{neuron_median:.3f} ({len(feature_scores)} features, {len(neuron_scores)} neuron signs)"
    )
    outcome = CheckOutcome(
        sae_median > neuron_median,
        f"median SAE {sae_median:.3f} vs neurons {neuron_median:.3f}",
        {"sae_median": sae_median, "neuron_median": neuron_median},
    )
    check = check_result("sae_more_monosemantic_than_neurons", outcome, dg.AssetCheckSeverity.WARN)
    return dg.MaterializeResult(check_results=[check], metadata=metadata)


def _valid(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def _monosemanticity_plot(features: np.ndarray, neurons: np.ndarray, title: str, path: Path) -> str:
    fig, (left, right) = new_figure(9, 3.2, ncols=2)
    bins = np.linspace(min(0.0, *features, *neurons) if len(features) else 0.0, 1.0, 26)
    for ax, values, label, color in (
        (left, features, f"SAE features (n={len(features)})", "#4c72b0"),
        (right, neurons, f"hidden dims, both signs (n={len(neurons)})", "#c44e52"),
    ):
        ax.hist(values, bins=bins, color=color)
        if len(values):
            ax.axvline(float(np.median(values)), color="black", linestyle="--", label="median")
            ax.legend()
        ax.set_title(label)
        ax.set_xlabel("monosemanticity (purity of best attribute)")
    left.set_ylabel("units")
    fig.suptitle(f"Monosemanticity, {title}")
    return save_figure(fig, path)


def _concept_plot(concepts: list[dict], title: str, path: Path) -> str:
    concepts = sorted(concepts, key=lambda c: c["feature_auc"])
    fig, ax = new_figure(7, max(3.0, 0.22 * len(concepts) + 1))
    y = np.arange(len(concepts))
    ax.barh(y - 0.2, [c["feature_auc"] for c in concepts], height=0.4, label="best SAE feature")
    ax.barh(
        y + 0.2,
        [c["neuron_auc"] for c in concepts],
        height=0.4,
        label="best hidden dim (either sign)",
    )
    ax.set_yticks(y, [c["concept"] for c in concepts], fontsize=7)
    ax.set_xlim(0.5, 1.0)
    ax.axvline(0.9, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel("AUC at detecting the positions the concept produced")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"Planted concepts, {title}")
    return save_figure(fig, path)


def _top_features_md(features: pa.Table, n: int = 10) -> str:
    rows = [r for r in features.to_pylist() if r["monosemanticity"] is not None]
    rows.sort(key=lambda r: -r["monosemanticity"])
    lines = [
        "| feature | frequency | best attribute | share (base) | top items |",
        "|---|---|---|---|---|",
    ]
    for r in rows[:n]:
        titles = ", ".join((r["top_titles"] or [])[:3]).replace("|", "/")
        lines.append(
            f"| {r['feature']} | {r['frequency']:.4f} | {r['best_attribute']} | "
            f"{r['best_share']:.2f} ({r['best_base_rate']:.2f}) | {titles} |"
        )
    return "\n".join(lines)


class SteeringConfig(dg.Config):
    alpha_scales: list[float] = Field(
        default=[1.0, 2.0, 4.0, 8.0],
        description="alpha = scale x the feature's max activation, added along its decoder direction.",
    )
    max_users: int = Field(default=1000, description="Test users (seeded sample) per measurement.")
    min_top_items: int = Field(
        default=40, description="A genre's feature must have at least this many top items."
    )
    max_ndcg_loss: float = knob(summarize, "max_ndcg_loss", "Target: NDCG@10 loss bound.")
    required_ratio: float = knob(
        summarize, "required_ratio", "Target: multiple of the genre's top-10 share."
    )
    seed: int = knob(steering_users, "seed")


@partition_asset(
    "steering",
    group=GROUP,
    kinds={"parquet", "pytorch"},
    deps=[feature_stats],
    checks={
        "steering_triples_genre_share": "For most genres, adding the genre's feature at least triples its top-10 share within the NDCG@10 loss bound."
    },
    description="Per genre: the feature most enriched for it, added along its decoder direction "
    "(alpha swept) and clamped to 0 at the SAE's layer; genre share of the top 10 and NDCG@10 "
    "on test users. steering/model=<m>/layer=<l>/{points,summary}.parquet.",
)
def steering_eval(
    context: dg.AssetExecutionContext,
    config: SteeringConfig,
    storage: StorageRoot,
    device: TorchDevice,
) -> dg.MaterializeResult:
    part = partition_of(context, storage.paths)
    paths = storage.paths
    dev = device.torch_device
    trained = _load_sae(part, dev)
    model = load_recommender(paths.model_dir(part.model), dev).eval()
    features = pq.read_table(part.feature_stats, columns=["feature", "max_activation"])
    max_activation = {r["feature"]: r["max_activation"] or 0.0 for r in features.to_pylist()}
    enrichment = pq.read_table(part.feature_enrichment).to_pylist()
    targets = genre_targets(enrichment, max_activation, config.min_top_items)
    if not targets:
        raise dg.Failure(
            f"No SAE feature of {context.partition_key} has >= {config.min_top_items} top items "
            "enriched for any genre; lower `min_top_items` or check that the catalog has genres."
        )
    sequences, num_items = read_sequences(paths.sequences)
    flags = genre_items(Catalog.load(paths), list(targets), num_items)
    users = steering_users(sequences, model.config.max_len, dev, config.max_users, config.seed)
    progress = partition_progress(context, "steered {done}/{total} genres")
    points = steering_sweep(
        model, part.layer, trained, targets, flags, users, config.alpha_scales, on_progress=progress
    )
    outcomes = summarize(points, config.max_ndcg_loss, config.required_ratio)
    out = part.steering_dir
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_parquet(
            pa.Table.from_pylist([p._asdict() for p in points]), tmp / part.steering_points.name
        )
        write_parquet(
            pa.Table.from_pylist([o._asdict() for o in outcomes]), tmp / part.steering_summary.name
        )
    storage.refresh_duckdb()
    met = sum(o.met for o in outcomes)
    plot = _steering_plot(points, context.partition_key, part.report("steering"))
    table = [
        "| genre | feature | base share | best share (x) | NDCG loss | clamped share |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        table.append(
            f"| {o.genre} | {o.feature} | {o.base_share:.3f} | {o.best_share:.3f} ({o.share_ratio:.1f}x) | "
            f"{o.ndcg_loss:.1%} | {o.clamp_share:.3f} |"
        )
    context.log.info(
        f"{context.partition_key}: {met}/{len(outcomes)} genres at >= {config.required_ratio:g}x "
        f"top-10 share within {config.max_ndcg_loss:.0%} NDCG@10 loss"
    )
    outcome = CheckOutcome(
        met > len(outcomes) / 2,
        f"{met}/{len(outcomes)} genres reach {config.required_ratio:g}x share within "
        f"{config.max_ndcg_loss:.0%} NDCG@10 loss",
        {"genres_met": met, "genres": len(outcomes)},
    )
    check = check_result("steering_triples_genre_share", outcome, dg.AssetCheckSeverity.WARN)
    return dg.MaterializeResult(
        check_results=[check],
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "genres": len(outcomes),
            "genres_met": met,
            "steering_users": len(users.targets),
            "ndcg@10_baseline": dg.MetadataValue.float(round(points[0].ndcg, 4)),
            "median_share_ratio": dg.MetadataValue.float(
                round(float(np.median([o.share_ratio for o in outcomes])), 2)
            ),
            "summary": dg.MetadataValue.md("\n".join(table)),
            "share_vs_ndcg": dg.MetadataValue.md(plot),
        },
    )


def _steering_plot(points: list, title: str, path: Path) -> str:
    genres = list(dict.fromkeys(p.genre for p in points))
    ncols = min(6, len(genres))
    nrows = -(-len(genres) // ncols)
    fig, _ = new_figure(2.6 * ncols, 2.3 * nrows + 0.6)
    fig.clear()
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    base = next(p for p in points if p.mode == "baseline").ndcg
    for ax, genre in zip(axes.flat, genres, strict=False):
        rows = [p for p in points if p.genre == genre]
        curve = sorted((p for p in rows if p.mode in ("baseline", "add")), key=lambda p: p.alpha)
        ax.plot([p.share for p in curve], [p.ndcg for p in curve], marker="o", markersize=3)
        for p in curve:
            if p.mode == "add":
                ax.annotate(f"{p.alpha_scale:g}", (p.share, p.ndcg), fontsize=6)
        clamp = next(p for p in rows if p.mode == "clamp")
        ax.scatter([clamp.share], [clamp.ndcg], marker="x", color="#c44e52", label="clamped")
        ax.axhline(0.8 * base, color="grey", linestyle=":", linewidth=1)
        ax.axvline(3 * curve[0].share, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{genre} (f{rows[0].feature})", fontsize=8)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(genres) :]:
        ax.axis("off")
    fig.supxlabel("genre share of the top 10")
    fig.supylabel("test NDCG@10")
    fig.suptitle(f"Steering, {title} (labels: alpha / max activation; dotted: 3x share, -20% NDCG)")
    return save_figure(fig, path)
