"""Every headline comparison of a run, computed from its artifacts: `results.json` and
`results.md` under `reports/`.

Each comparison has both sides, the paired difference a - b, its 95% CI, n and the unit
(`report.stats`). What is compared, per section:

- recommenders (per test user, NDCG@10): student vs CE-only student (the distillation
  ablation), student vs teacher, teacher vs SASRec, SASRec vs popularity;
- per (model, layer) partition:
  - the SAE spliced in vs the model as trained (per user);
  - SAE features vs neurons on planted concepts (per concept, best unit's AUC) and on the
    monosemanticity score (median, independent bootstrap);
  - steering along the SAE feature vs along each baseline direction at the same norm
    (centroid, best neuron, random): genre-share gain per user, and genres reaching the
    target; clamping the feature on the users where it is active;
  - SAGE vs the one-shot baseline (per feature): the headline set (features chosen by
    frequency and at random) and the concept-selected set, each metric.

A section whose artifacts are missing is listed under `missing` with the file it needs, so
a partial store gives a partial, honest report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsae_pipeline.report.stats import (
    DEFAULT_RESAMPLES,
    Comparison,
    compare,
    format_ci,
)
from recsae_pipeline.sae.interpretability import KIND_LABELS
from recsae_pipeline.sae.steering import CLAMP, DIRECTIONS, NO_STEERING, share_gains
from recsae_pipeline.storage.registry import ArtifactPaths, PartitionPaths

RECOMMENDER_PAIRS = (
    ("student", "student_ce", "distillation ablation: SLMRec student vs the same student trained on CE only"),
    ("student", "teacher", "student vs its teacher"),
    ("teacher", "sasrec", "teacher vs SASRec"),
    ("sasrec", "popularity", "SASRec vs popularity"),
)  # fmt: skip
EXPLANATION_METRICS = (
    ("generative_accuracy", "generative accuracy (label only)"),
    ("generative_accuracy_description", "generative accuracy (description)"),
    ("predictive_r", "predictive r"),
    ("detection_auc", "detection AUC"),
)
HEADLINE_SELECTIONS = ("frequent", "random")
CONCEPT_AUC_BAR = 0.9


@dataclass
class Results:
    """What `build_results` found: the comparisons, descriptive tables and what was missing."""

    comparisons: list[Comparison] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def as_dict(self, commit: str | None, generated_at: str | None = None) -> dict[str, Any]:
        return {
            "commit": commit,
            "generated_at": generated_at or datetime.now(UTC).isoformat(timespec="seconds"),
            "comparisons": [c.as_dict() for c in self.comparisons],
            "tables": self.tables,
            "missing": self.missing,
        }


def _read(path: Path, results: Results, what: str, columns: list[str] | None = None) -> Any | None:
    """`columns` of the table at `path` as a DataFrame, or None (noted as missing)."""
    if not path.exists():
        results.missing.append(f"{what}: {path} not found")
        return None
    return pq.read_table(path, columns=columns).to_pandas()


def build_results(
    paths: ArtifactPaths,
    partitions: Sequence[tuple[str, int]],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Results:
    """Every comparison the artifacts under `paths` support, for `partitions`."""
    results = Results()
    _recommenders(paths, results, resamples, seed)
    for model, layer in partitions:
        partition_comparisons(paths.partition(model, layer), resamples, seed, results)
    return results


def partition_comparisons(
    part: PartitionPaths,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    into: Results | None = None,
) -> Results:
    """The comparisons of one (model, layer): the splice, SAE vs neurons, steering vs the
    baseline directions, SAGE vs the baseline (what the feature browser's index shows)."""
    results = Results() if into is None else into
    _splice(part, results, resamples, seed)
    _sae_vs_neurons(part, results, resamples, seed)
    _steering(part, results, resamples, seed)
    _explanations(part, results, resamples, seed)
    return results


def _recommenders(paths: ArtifactPaths, results: Results, resamples: int, seed: int) -> None:
    keep = ["model", "ndcg@10", "hr@10", "params", "layers", "train_seconds", "ms_per_1000_users"]
    table = _read(paths.recommender_eval, results, "recommenders", keep)
    if table is not None:
        results.tables["recommenders"] = table.to_dict("records")
    users = _read(
        paths.recommender_eval_users, results, "recommenders per user", ["model", "user", "ndcg@10"]
    )
    if users is None:
        return
    by_model = {m: g.sort_values("user")["ndcg@10"].to_numpy() for m, g in users.groupby("model")}
    for a, b, what in RECOMMENDER_PAIRS:
        if a in by_model and b in by_model:
            results.comparisons.append(
                compare(
                    f"recommenders: {what}",
                    "test NDCG@10",
                    a,
                    by_model[a],
                    b,
                    by_model[b],
                    "users",
                    resamples,
                    seed,
                    section="recommenders",
                )  # fmt: skip
            )


def _splice(part: PartitionPaths, results: Results, resamples: int, seed: int) -> None:
    users = _read(part.sae_splice_users, results, f"{part.key} SAE splice")
    if users is None:
        return
    results.comparisons.append(
        compare(
            f"{part.key}: SAE reconstruction spliced in vs the model as trained",
            "test NDCG@10",
            "spliced",
            users["spliced"],
            "original",
            users["original"],
            "users",
            resamples,
            seed,
            section="sae",
            partition=part.key,
        )  # fmt: skip
    )


def _sae_vs_neurons(part: PartitionPaths, results: Results, resamples: int, seed: int) -> None:
    features = _read(
        part.feature_stats, results, f"{part.key} feature stats", ["n_active", "monosemanticity"]
    )
    neurons = _read(part.neuron_stats, results, f"{part.key} neuron stats", ["monosemanticity"])
    if features is not None and neurons is not None:
        active = features[features["n_active"] > 0]["monosemanticity"].to_numpy(np.float64)
        results.comparisons.append(
            compare(
                f"{part.key}: SAE features vs neurons (both signs), monosemanticity",
                "median purity of the best attribute among top items",
                "SAE features",
                active,
                "neurons",
                neurons["monosemanticity"].to_numpy(np.float64),
                "features",
                resamples,
                seed,
                independent=True,
                section="sae_vs_neurons",
                partition=part.key,
            )  # fmt: skip
        )
    if part.target_measures.exists():
        units = pq.read_table(part.unit_measures) if part.unit_measures.exists() else None
        results.comparisons.extend(
            measure_comparisons(
                pq.read_table(part.target_measures),
                units,
                part.key,
                resamples,
                seed,
                section="sae_vs_neurons",
                partition=part.key,
            )  # fmt: skip
        )
    else:
        results.missing.append(f"{part.key} target measures: {part.target_measures} not found")
    if not part.planted_concepts.exists():
        return  # no ground truth (a real log): nothing planted to detect
    concepts = pq.read_table(part.planted_concepts, columns=["feature_auc", "neuron_auc"])
    results.comparisons.append(
        concepts_comparison(
            concepts.column("feature_auc").to_numpy().astype(np.float64),
            concepts.column("neuron_auc").to_numpy().astype(np.float64),
            part.key,
            resamples,
            seed,
            section="sae_vs_neurons",
            partition=part.key,
        )
    )


class SteeringComparisons(NamedTuple):
    overall: dict[str, Comparison]
    """baseline -> SAE minus baseline: each user's gain averaged over genres."""
    per_genre: dict[str, dict[str, Comparison]]
    """genre -> baseline -> SAE minus baseline on that genre's users."""
    clamp: Comparison | None
    """Clamped minus unsteered share on (genre, user) pairs with the feature active at the
    user's last position (None: no such pair)."""


def steering_comparisons(
    users: pa.Table,
    scales: dict[str, float],
    key: str,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    **notes: Any,
) -> SteeringComparisons:
    """From `steering_eval`'s per-user table (`USERS_SCHEMA`) and each genre's SAE scale
    (`scales`, 0 where none is within the NDCG bound: a gain of 0 for every direction):
    paired over users, the gain in genre share along the SAE feature minus along each
    baseline direction at the same norm, and the clamping effect on active users."""
    gains = share_gains(users, scales)
    metric = "gain in the genre's top-10 share at the SAE's chosen scale"
    overall, per_genre = {}, {}
    for baseline in DIRECTIONS[1:]:
        overall[baseline] = compare(
            f"{key}: steering along the SAE feature vs the {baseline} direction (same "
            "layer, same norm)",
            f"{metric}, averaged over genres",
            "SAE feature",
            gains["sae"].mean(0),
            baseline,
            gains[baseline].mean(0),
            "users",
            resamples,
            seed,
            genres=len(scales),
            **notes,
        )
        for g, genre in enumerate(scales):
            per_genre.setdefault(genre, {})[baseline] = compare(
                f"{key} {genre}: SAE feature vs {baseline}",
                metric,
                "SAE feature",
                gains["sae"][g],
                baseline,
                gains[baseline][g],
                "users",
                resamples,
                seed,
            )
    frame = users.select(["genre", "direction", "user", "genre_share", "active"]).to_pandas()
    frame = frame[frame["active"]]
    clamp = None
    if not frame.empty:
        share = frame.pivot_table(
            index=["genre", "user"], columns="direction", values="genre_share", aggfunc="first"
        )
        clamp = compare(
            f"{key}: clamping the genre's SAE feature to 0 on the users where it is "
            "active at their last position",
            "genre's top-10 share",
            "clamped",
            share[CLAMP].to_numpy(),
            "unsteered",
            share[NO_STEERING].to_numpy(),
            "users",
            resamples,
            seed,
            pairs="(genre, active user)",
            genres=int(share.index.get_level_values("genre").nunique()),
            users_all=int(users.column("user").to_pandas().nunique()),
            **notes,
        )
    return SteeringComparisons(overall, per_genre, clamp)


MEASURES = (
    ("excess_auc", "best unit's AUC minus the shuffled null's best", ("attribute", "concept")),
    ("probe_auc_k1", "held-out AUC of a 1-sparse probe", ("attribute", "history", "concept")),
    ("probe_auc_k5", "held-out AUC of a 5-sparse probe", ("attribute", "history", "concept")),
)
"""The chance-corrected measures of `sae.interpretability` that each partition reports, SAE
features against neurons and against a random rotation: (measure, metric, target families)."""
FAMILY_UNITS = {"attribute": "attributes", "history": "attributes", "concept": "concepts"}
HEADLINE_MEASURE = "probe_auc_k1"
"""The measure behind the `sae_features_beat_neurons` check."""


def measure_comparisons(
    targets: pa.Table,
    units: pa.Table | None,
    key: str,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    **notes: Any,
) -> list[Comparison]:
    """SAE features vs neurons and vs a random rotation on each of `MEASURES`, paired over
    targets (`target_measures`), each with the count of targets where the SAE's side is higher;
    and, from `unit_measures`, the share of units whose best attribute AUC beats the shuffled
    null's 95th percentile (independent bootstrap of shares over units)."""
    frame = targets.select(["target", "family", "kind", *{m for m, _, _ in MEASURES}]).to_pandas()
    out = []
    for other in ("neurons", "rotation"):
        for measure, metric, families in MEASURES:
            for family in families:
                rows = frame[frame["family"] == family]
                sides = {
                    kind: rows[rows["kind"] == kind].set_index("target")[measure]
                    for kind in ("sae", other)
                }
                if sides["sae"].empty or sides[other].empty:
                    continue
                a, b = sides["sae"].align(sides[other], join="inner")
                a_values, b_values = a.to_numpy(np.float64), b.to_numpy(np.float64)
                ok = np.isfinite(a_values) & np.isfinite(b_values)
                out.append(
                    compare(
                        f"{key}: SAE features vs {KIND_LABELS[other]}, {measure} on {family} targets",
                        metric,
                        "SAE features",
                        a_values,
                        KIND_LABELS[other],
                        b_values,
                        FAMILY_UNITS[family],
                        resamples,
                        seed,
                        measure=measure,
                        family=family,
                        sae_higher_on=int((a_values[ok] > b_values[ok]).sum()),
                        other_higher_on=int((a_values[ok] < b_values[ok]).sum()),
                        **notes,
                    )  # fmt: skip
                )
    if units is not None:
        frame = units.select(["kind", "active", "best_attribute_auc"]).to_pandas()
        frame = frame[frame["active"]]
        levels = _chance_from_units(units)
        above = {
            kind: (g["best_attribute_auc"].to_numpy(np.float64) > levels[kind]).astype(float)
            for kind, g in frame.groupby("kind")
            if kind in levels
        }
        for other in ("neurons", "rotation"):
            if "sae" in above and other in above:
                out.append(
                    compare(
                        f"{key}: SAE features vs {KIND_LABELS[other]}, units above chance",
                        "share of units whose best attribute AUC beats the null's 95th percentile",
                        "SAE features",
                        above["sae"],
                        KIND_LABELS[other],
                        above[other],
                        "units",
                        resamples,
                        seed,
                        independent=True,
                        statistic="mean",
                        measure="above_chance",
                        family="attribute",
                        chance_p95={
                            "SAE features": levels["sae"],
                            KIND_LABELS[other]: levels[other],
                        },
                        **notes,
                    )  # fmt: skip
                )
    return out


def _chance_from_units(units: pa.Table) -> dict[str, float]:
    """kind -> 95th percentile over active units of the null's best attribute AUC."""
    frame = units.select(["kind", "active", "best_attribute_null_auc"]).to_pandas()
    frame = frame[frame["active"]].dropna()
    return {
        kind: float(np.quantile(g["best_attribute_null_auc"].to_numpy(np.float64), 0.95))
        for kind, g in frame.groupby("kind")
    }


def concepts_comparison(
    feature_auc: np.ndarray,
    neuron_auc: np.ndarray,
    key: str,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    **notes: Any,
) -> Comparison:
    """Best SAE feature vs best neuron at detecting each planted concept: the paired AUC
    difference over concepts, with the counts detected at `CONCEPT_AUC_BAR` on both sides."""
    return compare(
        f"{key}: SAE features vs neurons, planted concepts",
        "best unit's AUC per concept",
        "SAE features",
        feature_auc,
        "neurons",
        neuron_auc,
        "concepts",
        resamples,
        seed,
        detected_at_0_9={
            "SAE features": int((feature_auc >= CONCEPT_AUC_BAR).sum()),
            "neurons": int((neuron_auc >= CONCEPT_AUC_BAR).sum()),
            "concepts": len(feature_auc),
        },
        **notes,
    )


def _steering(part: PartitionPaths, results: Results, resamples: int, seed: int) -> None:
    if not part.steering_users.exists():
        results.missing.append(f"{part.key} steering per user: {part.steering_users} not found")
        return
    summary = pq.read_table(part.steering_summary).to_pandas()
    sae_rows = summary[summary["direction"] == "sae"]
    scales = dict(zip(sae_rows["genre"], sae_rows["best_scale"].astype(float), strict=True))
    notes = {"section": "steering", "partition": part.key}
    built = steering_comparisons(
        pq.read_table(part.steering_users), scales, part.key, resamples, seed, **notes
    )
    reached = summary.pivot_table(index="genre", columns="direction", values="reaches_target")
    for baseline in DIRECTIONS[1:]:
        results.comparisons.append(built.overall[baseline])
        both = reached[["sae", baseline]].dropna().astype(float)
        counts = {"SAE feature": int(both["sae"].sum()), baseline: int(both[baseline].sum())}
        results.comparisons.append(
            compare(
                f"{part.key}: genres steered to the target, SAE feature vs {baseline} direction",
                "share of genres reaching 3x top-10 share within 20% NDCG@10 loss",
                "SAE feature",
                both["sae"],
                baseline,
                both[baseline],
                "genres",
                resamples,
                seed,
                counts=counts | {"genres": len(both)},
                **notes,
            )
        )
    if built.clamp is not None:
        results.comparisons.append(built.clamp)


def _explanations(part: PartitionPaths, results: Results, resamples: int, seed: int) -> None:
    scores = _read(part.explanation_scores, results, f"{part.key} explanation scores")
    if scores is None:
        return
    if "selection" not in scores.columns:
        results.missing.append(f"{part.key} explanations: no `selection` column")
        return
    subsets = {
        "headline (features chosen by frequency and at random)": scores["selection"].isin(
            HEADLINE_SELECTIONS
        ),
        "concept-selected features": scores["selection"] == "concept",
    }
    for subset, mask in subsets.items():
        rows = scores[mask]
        if not {"sage", "baseline"} <= set(rows["method"]):
            continue

        def wide(column: str, rows: Any = rows) -> Any:
            """(feature) x (method) of one column, features that both methods explained."""
            table = rows.set_index(["feature", "method"])[column].unstack("method")
            return table[["sage", "baseline"]]

        named = "names the planted concept (features with a concept AUC >= the bar)"
        for column, metric in (*EXPLANATION_METRICS, ("names_concept", named)):
            if column not in rows.columns:
                continue
            both = wide(column)
            if column == "names_concept":  # null where the feature has no concept above the bar
                both = both.dropna()
            if both.empty:
                continue
            both = both.astype(np.float64)
            results.comparisons.append(
                compare(
                    f"{part.key}: SAGE vs the one-shot baseline, {subset}",
                    metric,
                    "SAGE",
                    both["sage"].to_numpy(),
                    "baseline",
                    both["baseline"].to_numpy(),
                    "features",
                    resamples,
                    seed,
                    section="explanations",
                    partition=part.key,
                )
            )


# ----------------------------------------------------------------------------- markdown


def _value(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def comparisons_markdown(comparisons: Sequence[Comparison]) -> str:
    """One table: comparison, metric, both sides, a - b with its 95% CI, n, verdict."""
    lines = [
        "| comparison | metric | a | b | a - b [95% CI] | n | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        nan = f" ({c.n_nan} NaN dropped)" if c.n_nan else ""
        lines.append(
            f"| {c.name} | {c.metric} | {c.a.label} {_value(c.a.value)} | "
            f"{c.b.label} {_value(c.b.value)} | {format_ci(c)} | {c.n} {c.unit}{nan} | "
            f"{c.verdict} |"
        )
    return "\n".join(lines)


def results_markdown(results: dict[str, Any]) -> str:
    """`results.md`: every comparison grouped by section, then what was missing."""
    comparisons = [Comparison.from_dict(c) for c in results["comparisons"]]
    out = [
        "# Results",
        "",
        f"Commit `{results['commit']}`, generated {results['generated_at']}. Each row: both "
        "sides, the paired difference a - b and its 95% CI (paired bootstrap over the unit; "
        "Student's t over seeds). Where the CI includes zero: no measurable difference.",
    ]
    sections: dict[str, list[Comparison]] = {}
    for c in comparisons:
        sections.setdefault(str(c.notes.get("section", "other")), []).append(c)
    for section, rows in sections.items():
        out += ["", f"## {section}", "", comparisons_markdown(rows)]
    if results.get("missing"):
        out += ["", "## Not computed", ""] + [f"- {m}" for m in results["missing"]]
    return "\n".join(out) + "\n"


def current_commit(repo: Path | None = None) -> str | None:
    """The short git commit of the checkout the code runs from, or None outside one."""
    import subprocess

    repo = repo or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@dataclass(frozen=True)
class Written:
    json: Path
    markdown: Path
    results: dict[str, Any]


def write_results(paths: ArtifactPaths, built: Results, **settings: Any) -> Written:
    """`built` (from `build_results`) written to `reports/results.json` and `results.md`,
    with the commit and the `settings` it was built with."""
    from recsae_pipeline.storage.atomic import write_bytes, write_json

    results = built.as_dict(current_commit()) | settings
    json_path = write_json(results, paths.report("results", ".json"))
    md_path = write_bytes(results_markdown(results).encode(), paths.report("results", ".md"))
    return Written(json_path, md_path, results)
