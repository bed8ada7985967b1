"""Feature assets per (model, layer) partition: the sparse feature activations, per-feature
statistics with the monosemanticity comparison against raw neurons, and steering."""

import math
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
from recsae_pipeline.report.results import (
    CONCEPT_AUC_BAR,
    HEADLINE_MEASURE,
    SteeringComparisons,
    comparisons_markdown,
    concepts_comparison,
    measure_comparisons,
    steering_comparisons,
)
from recsae_pipeline.report.stats import Comparison, compare, format_ci
from recsae_pipeline.sae.evaluation import encoding_check
from recsae_pipeline.sae.features import (
    compute_feature_stats,
    write_feature_activations,
)
from recsae_pipeline.sae.interpretability import KIND_LABELS, KINDS, TARGET_FAMILIES
from recsae_pipeline.sae.model import TopKSae
from recsae_pipeline.sae.steering import (
    CLAMP,
    DIRECTIONS,
    NO_STEERING,
    GenreOutcome,
    SteeringPoint,
    as_table,
    genre_items,
    steering_sweep,
    steering_targets,
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
    # TopK keeps exactly k per row; BatchTopK keeps k on average and the L1 SAE any number
    per_row = trained.config.k if trained.config.kind == "topk" else trained.config.n_latents
    check = encoding_check(out, shards, report.rows, per_row)
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


CHECK_DESCRIPTION = (
    "k-sparse probing on held-out users (k = 1, SAEBench's protocol): over the catalog-attribute "
    "targets at each position and the planted concepts, the SAE's probe beats the neurons' "
    "(both signs) on most targets and the paired bootstrap 95% CI of the mean AUC difference "
    "lies above zero."
)


@partition_asset(
    "feature_stats",
    group=GROUP,
    kinds={"parquet", "duckdb"},
    deps=[feature_activations],
    checks={"sae_features_beat_neurons": CHECK_DESCRIPTION},
    description="Per SAE feature: frequency, mean/max activation, top items, attribute "
    "enrichment (genre, decade, popularity band, franchise) and the purity score with its "
    "chance level; the chance-corrected measures (best-target AUC against a shuffled null, "
    "best unit per target, k-sparse probes on held-out users) for SAE features, neurons (both "
    "signs) and a random rotation; on synthetic data, the planted concepts. "
    "feature_stats/model=<m>/layer=<l>/*.parquet.",
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
    tables = {
        part.feature_stats: stats.features,
        part.neuron_stats: stats.neurons,
        part.feature_enrichment: stats.enrichment,
        part.planted_concepts: stats.concepts,
        part.unit_measures: stats.units,
        part.target_measures: stats.targets,
        part.chance_levels: stats.chance,
    }
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for path, table in tables.items():
            if table is not None:
                write_parquet(table, tmp / path.name, row_group_size=None)
    storage.refresh_duckdb()

    feature_scores = _valid(stats.features.column("monosemanticity").to_numpy(zero_copy_only=False))
    neuron_scores = _valid(stats.neurons.column("monosemanticity").to_numpy(zero_copy_only=False))
    sae_median = float(np.median(feature_scores)) if len(feature_scores) else float("nan")
    neuron_median = float(np.median(neuron_scores)) if len(neuron_scores) else float("nan")
    histogram = _monosemanticity_plot(
        feature_scores, neuron_scores, context.partition_key, part.report("monosemanticity")
    )
    comparisons = measure_comparisons(stats.targets, stats.units, context.partition_key)
    summary = stats.measures.summary()
    metadata: dict = {
        "path": dg.MetadataValue.path(str(out)),
        "features_scored": len(feature_scores),
        "neuron_signs_scored": len(neuron_scores),
        "sample_rows": stats.sample_rows,
        "targets": ", ".join(
            f"{len(stats.measures.targets.select(f))} {f}" for f in TARGET_FAMILIES
        ),
        "measures": dg.MetadataValue.md(_measures_md(summary, stats.measures.config.probe_ks)),
        "sae_vs_baselines": dg.MetadataValue.md(comparisons_markdown(comparisons)),
        "probe_auc_per_target": dg.MetadataValue.md(
            _probe_plot(stats.targets, context.partition_key, part.report("probes"))
        ),
        "median_monosemanticity": f"SAE {sae_median:.3f} ({len(feature_scores)} features), "
        f"neurons {neuron_median:.3f} ({len(neuron_scores)} neuron signs); chance (p95) "
        + _purity_chance_text(stats.chance),
        "median_monosemanticity_sae": dg.MetadataValue.float(round(sae_median, 4)),
        "median_monosemanticity_neurons": dg.MetadataValue.float(round(neuron_median, 4)),
        "monosemanticity": dg.MetadataValue.md(histogram),
        "most_monosemantic": dg.MetadataValue.md(_most_monosemantic_md(stats.features, "feature")),
        "most_monosemantic_neurons": dg.MetadataValue.md(
            _most_monosemantic_md(stats.neurons, "neuron")
        ),
    }
    if stats.concepts is not None:
        metadata |= _concept_metadata(
            stats.concepts.to_pylist(), context.partition_key, part.report("concepts")
        )
    context.log.info(
        f"{context.partition_key}: 1-sparse probe AUC (median over attribute targets) SAE "
        f"{summary.get('sae_probe_auc_k1_attribute', float('nan')):.3f}, neurons "
        f"{summary.get('neurons_probe_auc_k1_attribute', float('nan')):.3f}, rotation "
        f"{summary.get('rotation_probe_auc_k1_attribute', float('nan')):.3f}; median purity SAE "
        f"{sae_median:.3f} vs neurons {neuron_median:.3f}"
    )
    outcome = headline_outcome(stats.targets, context.partition_key)
    check = check_result("sae_features_beat_neurons", outcome, dg.AssetCheckSeverity.WARN)
    return dg.MaterializeResult(check_results=[check], metadata=metadata)


def headline_outcome(targets: pa.Table, key: str) -> CheckOutcome:
    """`CHECK_DESCRIPTION` on the attribute and concept targets pooled."""
    frame = targets.select(["target", "family", "kind", HEADLINE_MEASURE]).to_pandas()
    frame = frame[frame["family"].isin(["attribute", "concept"])]
    sides = {
        kind: frame[frame["kind"] == kind].set_index(["family", "target"])[HEADLINE_MEASURE]
        for kind in ("sae", "neurons")
    }
    a, b = sides["sae"].align(sides["neurons"], join="inner")
    c = compare(
        f"{key}: SAE features vs neurons, 1-sparse probe", "held-out AUC", "SAE features",
        a.to_numpy(np.float64), "neurons", b.to_numpy(np.float64), "attributes",
    )  # fmt: skip
    ok = np.isfinite(a.to_numpy()) & np.isfinite(b.to_numpy())
    wins = int((a.to_numpy()[ok] > b.to_numpy()[ok]).sum())
    losses = int((a.to_numpy()[ok] < b.to_numpy()[ok]).sum())
    lo = c.ci95[0]
    passed = bool(wins > ok.sum() / 2 and math.isfinite(lo) and lo > 0)
    return CheckOutcome(
        passed,
        f"1-sparse probe AUC on held-out users, SAE {c.a.value:.4f} vs neurons {c.b.value:.4f} "
        f"(mean over {c.n} targets), difference {format_ci(c)}; SAE higher on {wins}, neurons "
        f"on {losses}: {c.verdict}",
        {
            "sae_mean_auc": c.a.value,
            "neuron_mean_auc": c.b.value,
            "difference": c.difference,
            "ci95_low": c.ci95[0],
            "ci95_high": c.ci95[1],
            "targets": c.n,
            "sae_higher_on": wins,
            "neurons_higher_on": losses,
        },
    )


def _purity_chance_text(chance: pa.Table) -> str:
    rows = [r for r in chance.to_pylist() if r["measure"].startswith("purity@")]
    return f"{rows[0]['chance_p95']:.3f} ({rows[0]['measure']})" if rows else "n/a"


def _measures_md(summary: dict[str, float], probe_ks: tuple[int, ...]) -> str:
    """Medians over targets per measure and family, the three kinds side by side."""
    families = [f for f in TARGET_FAMILIES if f"targets_{f}" in summary]
    measures = ["best_auc", "excess_auc", *(f"probe_auc_k{k}" for k in probe_ks)]
    lines = [
        "| family (targets) | measure | SAE features | neurons | random rotation |",
        "|---|---|---|---|---|",
    ]
    for family in families:
        n = int(summary[f"targets_{family}"])
        for measure in [*measures, "above_chance"]:
            cells = [summary.get(f"{kind}_{measure}_{family}", float("nan")) for kind in KINDS]
            label = (
                "share of units above chance" if measure == "above_chance" else f"median {measure}"
            )
            lines.append(
                f"| {family} ({n}) | {label} | " + " | ".join(f"{v:.3f}" for v in cells) + " |"
            )
    return "\n".join(lines)


def _probe_plot(targets: pa.Table, title: str, path: Path) -> str:
    """Per target, the 1-sparse probe's held-out AUC: SAE features against neurons and
    against the random rotation, with the diagonal."""
    frame = targets.select(["target", "family", "kind", HEADLINE_MEASURE]).to_pandas()
    wide = frame.pivot_table(index=["family", "target"], columns="kind", values=HEADLINE_MEASURE)
    fig, axes = new_figure(9, 4.2, ncols=2)
    markers = {"attribute": "o", "history": "s", "concept": "^"}
    for ax, other in zip(axes, ("neurons", "rotation"), strict=True):
        for family, marker in markers.items():
            if family in wide.index.get_level_values(0) and other in wide:
                rows = wide.loc[family]
                ax.scatter(rows[other], rows["sae"], marker=marker, s=14, alpha=0.7, label=family)
        ax.plot([0.4, 1.0], [0.4, 1.0], color="black", linewidth=0.8, linestyle=":")
        ax.set_xlabel(f"{KIND_LABELS[other]}: 1-sparse probe AUC")
        ax.set_ylabel("SAE features: 1-sparse probe AUC")
        ax.legend(fontsize=8)
    fig.suptitle(f"Held-out probe AUC per target (above the diagonal: SAE better), {title}")
    return save_figure(fig, path)


def _concept_metadata(concepts: list[dict], title: str, plot_path: Path) -> dict:
    """The planted concepts detected by the best SAE feature and by the best neuron, side by
    side, and the paired difference of their AUCs over concepts with a bootstrap 95% CI."""
    feature_auc = np.array([c["feature_auc"] for c in concepts], dtype=np.float64)
    neuron_auc = np.array([c["neuron_auc"] for c in concepts], dtype=np.float64)
    n = len(concepts)
    c = concepts_comparison(feature_auc, neuron_auc, title)
    sae_hits, neuron_hits = (c.notes["detected_at_0_9"][k] for k in ("SAE features", "neurons"))
    return {
        "planted_concepts": n,
        f"concepts_auc_ge_{CONCEPT_AUC_BAR}": f"SAE {sae_hits}/{n}, neurons {neuron_hits}/{n}",
        f"concepts_auc_ge_{CONCEPT_AUC_BAR}_sae": sae_hits,
        f"concepts_auc_ge_{CONCEPT_AUC_BAR}_neurons": neuron_hits,
        "median_best_feature_auc": dg.MetadataValue.float(round(float(np.median(feature_auc)), 4)),
        "median_best_neuron_auc": dg.MetadataValue.float(round(float(np.median(neuron_auc)), 4)),
        "concept_auc_sae_minus_neurons": f"best SAE feature {c.a.value:.4f} vs best neuron "
        f"{c.b.value:.4f} (mean AUC over concepts), difference {format_ci(c)} (paired bootstrap "
        f"95% CI over {c.n} concepts, {c.n_nan} NaN; {c.verdict})",
        "planted_concept_auc": dg.MetadataValue.md(_concept_plot(concepts, title, plot_path)),
    }


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


def _most_monosemantic_md(units: pa.Table, kind: str, n: int = 10) -> str:
    """The `n` most monosemantic units of one kind, as a markdown table: SAE features with
    their frequency and top items, neurons with their sign (the same score, both sides)."""
    rows = [r for r in units.to_pylist() if r["monosemanticity"] is not None]
    rows.sort(key=lambda r: -r["monosemanticity"])
    unit = {"feature": "frequency", "neuron": "sign"}[kind]
    lines = [
        f"| {kind} | {unit} | best attribute | monosemanticity | share (base) | top items |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows[:n]:
        key, extra = (
            (r["feature"], f"{r['frequency']:.4f}") if kind == "feature" else (r["unit"], r["sign"])
        )
        titles = ", ".join((r.get("top_titles") or [])[:3]).replace("|", "/")
        lines.append(
            f"| {key} | {extra} | {r['best_attribute']} | {r['monosemanticity']:.3f} | "
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
        "steering_triples_genre_share": "For most genres, adding the genre's feature at least triples its top-10 share within the NDCG@10 loss bound (the baselines' counts beside it)."
    },
    description="Per genre: the feature most enriched for it, added along its decoder direction "
    "(alpha swept) and clamped to 0 at the SAE's layer, against three baselines added at the "
    "same layer and norm (the genre's item centroid, its best neuron in its sign, a seeded random "
    "direction); genre share of the top 10 and NDCG@10 per test user, clamping also on the users "
    "with the feature active. steering/model=<m>/layer=<l>/{points,summary,users}.parquet.",
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
    targets = steering_targets(enrichment, max_activation, config.min_top_items)
    if not targets:
        raise dg.Failure(
            f"No SAE feature of {context.partition_key} has >= {config.min_top_items} top items "
            "enriched for any genre; lower `min_top_items` or check that the catalog has genres."
        )
    sequences, num_items = read_sequences(paths.sequences)
    flags = genre_items(Catalog.load(paths), [t.genre for t in targets], num_items)
    users = steering_users(sequences, model.config.max_len, dev, config.max_users, config.seed)
    progress = partition_progress(context, "steered {done}/{total} genres")
    sweep = steering_sweep(
        model,
        part.layer,
        trained,
        targets,
        flags,
        users,
        config.alpha_scales,
        seed=config.seed,
        on_progress=progress,
    )
    outcomes = summarize(sweep.points, config.max_ndcg_loss, config.required_ratio)
    out = part.steering_dir
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_parquet(as_table(sweep.points, SteeringPoint), tmp / part.steering_points.name)
        write_parquet(as_table(outcomes, GenreOutcome), tmp / part.steering_summary.name)
        write_parquet(sweep.users, tmp / part.steering_users.name)
    storage.refresh_duckdb()

    sae_rows = [o for o in outcomes if o.direction == "sae"]
    genres = len(sae_rows)
    reached = {d: sum(o.reaches_target for o in outcomes if o.direction == d) for d in DIRECTIONS}
    reached_text = ", ".join(f"{d} {n}/{genres}" for d, n in reached.items())
    scales = {o.genre: o.best_scale for o in sae_rows}
    built = steering_comparisons(sweep.users, scales, context.partition_key)
    clamp = built.clamp
    plot = _steering_plot(sweep.points, context.partition_key, part.report("steering"))
    target_text = f"{config.required_ratio:g}x share within {config.max_ndcg_loss:.0%} NDCG@10 loss"
    context.log.info(
        f"{context.partition_key}: genres at {target_text}: {reached_text}; clamping on "
        f"active users: {_clamp_text(clamp)}"
    )
    outcome = CheckOutcome(
        reached["sae"] > genres / 2,
        f"SAE: {reached['sae']}/{genres} genres reach {target_text}; the baselines at the same "
        f"layer and norm: "
        + ", ".join(f"{d} {reached[d]}/{genres}" for d in DIRECTIONS if d != "sae"),
        {"genres_met": reached["sae"], "genres": genres}
        | {f"genres_reaching_target_{d}": n for d, n in reached.items()},
    )
    check = check_result("steering_triples_genre_share", outcome, dg.AssetCheckSeverity.WARN)
    return dg.MaterializeResult(
        check_results=[check],
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "genres": genres,
            "genres_met": reached["sae"],
            "genres_reaching_target": reached_text,
            "steering_users": len(users.targets),
            "ndcg@10_baseline": dg.MetadataValue.float(round(sae_rows[0].base_ndcg, 4)),
            "median_share_ratio": dg.MetadataValue.float(
                round(float(np.median([o.share_ratio for o in sae_rows])), 2)
            ),
            "median_share_ratio_by_direction": ", ".join(
                f"{d} {np.median([o.share_ratio for o in outcomes if o.direction == d]):.2f}"
                for d in DIRECTIONS
            ),
            "neuron_baseline": f"the most enriched neuron sign for "
            f"{genres - sweep.neurons_from_centroid}/{genres} genres, the centroid's largest "
            f"coordinate for {sweep.neurons_from_centroid}",
            "summary": dg.MetadataValue.md(_summary_md(outcomes, target_text)),
            "sae_vs_baselines": dg.MetadataValue.md(_gains_md(built)),
            "sae_vs_baselines_per_genre": dg.MetadataValue.md(_gains_per_genre_md(built, scales)),
            "clamp_active_users": _clamp_text(clamp),
            "comparisons": dg.MetadataValue.json(
                [c.as_dict() for c in [*built.overall.values(), clamp] if c is not None]
            ),
            "share_vs_ndcg": dg.MetadataValue.md(plot),
        },
    )


def _clamp_text(c: Comparison | None) -> str:
    if c is None:
        return "no user has any genre's feature active at their last position (n=0)"
    return (
        f"share {c.a.value:.3f} clamped vs {c.b.value:.3f} unsteered, difference "
        f"{format_ci(c)} ({c.verdict}), n={c.n} (genre, active user) pairs over "
        f"{c.notes['genres']} genres, of {c.notes['users_all']} users"
    )


def _share_cell(o: GenreOutcome) -> str:
    cell = f"{o.best_share:.3f} ({o.share_ratio:.1f}x @ {o.best_scale:g}, {o.ndcg_loss:+.0%})"
    return f"**{cell}**" if o.reaches_target else cell


def _summary_md(outcomes: list[GenreOutcome], target: str) -> str:
    by_genre: dict[str, dict[str, GenreOutcome]] = {}
    for o in outcomes:
        by_genre.setdefault(o.genre, {})[o.direction] = o
    lines = [
        f"Best share within the bound per direction (x unsteered @ scale, NDCG@10 change); "
        f"bold: reaches {target}. Clamped: the genre's share with its SAE feature at 0.",
        "",
        "| genre | SAE feature | neuron | unsteered | "
        + " | ".join(DIRECTIONS)
        + " | clamped, active users (n) | clamped, all users |",
        "|---|---|---|---|" + "---|" * len(DIRECTIONS) + "---|---|",
    ]
    for genre, row in by_genre.items():
        sae = row["sae"]
        active = (
            f"{sae.base_share_active:.3f} -> {sae.clamp_share_active:.3f} ({sae.n_active})"
            if sae.n_active
            else "(0)"
        )
        neuron = row["neuron"].neuron if "neuron" in row else "-"
        cells = " | ".join(_share_cell(row[d]) if d in row else "-" for d in DIRECTIONS)
        lines.append(
            f"| {genre} | {sae.feature} | {neuron} | {sae.base_share:.3f} | {cells} | {active} | "
            f"{sae.base_share:.3f} -> {sae.clamp_share:.3f} ({sae.n_users}) |"
        )
    return "\n".join(lines)


def _gains_md(gains: SteeringComparisons) -> str:
    lines = [
        "Gain in the genre's top-10 share over unsteered at the SAE's chosen scale (0 where no "
        "scale is within the bound), per user averaged over genres; paired bootstrap 95% CI.",
        "",
        "| baseline | SAE gain | baseline gain | SAE - baseline [95% CI] | n users | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for baseline, c in gains.overall.items():
        lines.append(
            f"| {baseline} | {c.a.value:+.4f} | {c.b.value:+.4f} | {format_ci(c)} | {c.n} | "
            f"{c.verdict} |"
        )
    return "\n".join(lines)


def _gains_per_genre_md(gains: SteeringComparisons, scales: dict[str, float]) -> str:
    baselines = DIRECTIONS[1:]
    lines = [
        "| genre | SAE scale | SAE gain | "
        + " | ".join(f"{b} gain | SAE - {b} [95% CI]" for b in baselines)
        + " |",
        "|---|---|---|" + "---|---|" * len(baselines),
    ]
    for genre, by_baseline in gains.per_genre.items():
        first = next(iter(by_baseline.values()))
        cells = " | ".join(
            f"{by_baseline[b].b.value:+.3f} | {format_ci(by_baseline[b], 3)}" for b in baselines
        )
        lines.append(f"| {genre} | {scales[genre]:g} | {first.a.value:+.3f} | {cells} |")
    return "\n".join(lines)


_DIRECTION_COLORS = {
    "sae": "#4c72b0",
    "centroid": "#dd8452",
    "neuron": "#55a868",
    "random": "#8c8c8c",
}


def _steering_plot(points: list[SteeringPoint], title: str, path: Path) -> str:
    genres = list(dict.fromkeys(p.genre for p in points))
    ncols = min(6, len(genres))
    nrows = -(-len(genres) // ncols)
    height = 2.3 * nrows + 0.9
    fig, _ = new_figure(2.6 * ncols, height)
    fig.clear()
    # A fixed grid: the constrained layout costs seconds on this many panels.
    fig.set_layout_engine("none")
    top = 1 - 0.9 / height
    grid = {"left": 0.06, "right": 0.99, "bottom": 0.12, "top": top, "wspace": 0.1, "hspace": 0.4}
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True, gridspec_kw=grid)
    for ax, genre in zip(axes.flat, genres, strict=False):
        rows = [p for p in points if p.genre == genre]
        base = next(p for p in rows if p.direction == NO_STEERING)
        for direction, color in _DIRECTION_COLORS.items():
            curve = [
                base,
                *sorted((p for p in rows if p.direction == direction), key=lambda p: p.alpha_scale),
            ]
            ax.plot(
                [p.share for p in curve],
                [p.ndcg for p in curve],
                marker="o",
                markersize=2.5,
                color=color,
                linewidth=1.5 if direction == "sae" else 1,
                label=direction,
            )
        for p in rows:
            if p.direction == "sae":
                ax.annotate(f"{p.alpha_scale:g}", (p.share, p.ndcg), fontsize=6)
        clamp = next(p for p in rows if p.direction == CLAMP)
        ax.scatter([clamp.share], [clamp.ndcg], marker="x", color="#c44e52", label="clamped")
        ax.axhline(0.8 * base.ndcg, color="grey", linestyle=":", linewidth=1)
        ax.axvline(3 * base.share, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{genre} (f{base.feature})", fontsize=8)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(genres) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    legend_at = (0.5, 1 - 0.4 / height)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=legend_at, fontsize=7, ncols=5)
    fig.supxlabel("genre share of the top 10")
    fig.supylabel("test NDCG@10")
    fig.suptitle(
        f"Steering, {title}: SAE feature vs baselines at the same norm (labels: alpha / max "
        "activation; dotted: 3x share, -20% NDCG)",
        fontsize=9,
    )
    return save_figure(fig, path)
