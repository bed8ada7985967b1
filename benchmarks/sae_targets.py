"""The SAE issue's targets, read from a materialized pipeline (default data: run
`recsae materialize` first), one row per (model, layer) partition:

- FVU <= 0.10 and dead fraction <= 2% (held-out users), k = 32, 32x expansion;
- spliced NDCG@10 >= 95% of the original;
- median monosemanticity of SAE features above that of raw neurons (both signs);
- steering at least triples the genre's top-10 share within 20% NDCG@10 loss, for most genres;
- on synthetic data, planted concepts whose best feature reaches AUC >= 0.9.

    .venv/bin/python benchmarks/sae_targets.py [--data-dir data]

Writes benchmarks/results/sae_targets.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]


def _parquet(path: Path) -> str:
    return "read_parquet('" + str(path).replace("'", "''") + "')"


def partition_targets(root: Path, model: str, layer: int) -> dict:
    sae = root / "sae" / f"model={model}" / f"layer={layer}"
    metrics = json.loads((sae / "metrics.json").read_text())
    config = json.loads((sae / "config.json").read_text())
    row: dict = {
        "partition": f"{model}.layer{layer}",
        "latents": config.get("d_in", 0) * config.get("expansion", 0),
        "k": config.get("k"),
        "fvu": metrics["heldout"]["fvu"],
        "dead_fraction": metrics["heldout"]["dead_fraction"],
        "ndcg_original": metrics["ndcg@10_original"],
        "ndcg_spliced": metrics["ndcg@10_spliced"],
        "spliced_ratio": metrics["ndcg@10_spliced"] / metrics["ndcg@10_original"],
        "fraction_recovered": metrics["fraction_recovered"],
        "train_seconds": metrics["seconds"],
    }
    stats = root / "feature_stats" / f"model={model}" / f"layer={layer}"
    if (stats / "features.parquet").exists():
        con = duckdb.connect()
        sae_median, scored = con.execute(
            f"SELECT median(monosemanticity), count(monosemanticity) FROM {_parquet(stats / 'features.parquet')}"
        ).fetchone()
        neuron_median, neurons = con.execute(
            f"SELECT median(monosemanticity), count(*) FROM {_parquet(stats / 'neurons.parquet')}"
        ).fetchone()
        row |= {
            "mono_sae_median": sae_median,
            "mono_neuron_median": neuron_median,
            "features_scored": scored,
            "neuron_signs_scored": neurons,
        }
        if (stats / "concepts.parquet").exists():
            concepts, good, best_neurons_good = con.execute(
                f"SELECT count(*), count(*) FILTER (WHERE feature_auc >= 0.9), "
                f"count(*) FILTER (WHERE neuron_auc >= 0.9) FROM {_parquet(stats / 'concepts.parquet')}"
            ).fetchone()
            row |= {
                "concepts": concepts,
                "concepts_feature_auc_ge_0.9": good,
                "concepts_neuron_auc_ge_0.9": best_neurons_good,
            }
    steering = root / "steering" / f"model={model}" / f"layer={layer}" / "summary.parquet"
    if steering.exists():
        genres, met, median_ratio = duckdb.execute(
            "SELECT count(*), count(*) FILTER (WHERE reaches_target), median(least(share_ratio, 1e6)) "
            f"FROM {_parquet(steering)} WHERE direction = 'sae'"
        ).fetchone()
        row |= {"genres": genres, "genres_tripled": met, "median_share_ratio": median_ratio}
    summary = root / "explanation_scores" / f"model={model}" / f"layer={layer}" / "summary.parquet"
    if summary.exists():
        for method, gen, r, auc, named, n_named in duckdb.execute(
            "SELECT method, mean_generative_accuracy, mean_predictive_r, mean_detection_auc, "
            f"names_concept_share, concept_features FROM {_parquet(summary)} WHERE subset = 'all'"
        ).fetchall():
            row |= {
                f"{method}_generative": gen,
                f"{method}_predictive_r": r,
                f"{method}_detection_auc": auc,
                f"{method}_names_concept": named,
                "concept_features_explained": n_named,
            }
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sae_targets.json"))
    args = parser.parse_args(argv)
    root = Path(args.data_dir)
    partitions = sorted(root.glob("sae/model=*/layer=*/metrics.json"))
    if not partitions:
        print(f"no SAE under {root}/sae; run `recsae materialize` first", file=sys.stderr)
        return 2
    rows = []
    for metrics in partitions:
        model = metrics.parent.parent.name.split("=", 1)[1]
        layer = int(metrics.parent.name.split("=", 1)[1])
        rows.append(partition_targets(root, model, layer))
    header = (
        f"{'partition':<16}{'FVU':>7}{'dead':>7}{'spliced':>9}{'recov':>7}"
        f"{'mono SAE':>10}{'mono nrn':>10}{'AUC>=.9':>9}{'tripled':>9}{'med x':>7}"
    )
    print(header)
    for r in rows:
        concepts = f"{r.get('concepts_feature_auc_ge_0.9', '-')}/{r.get('concepts', '-')}"
        steered = f"{r.get('genres_tripled', '-')}/{r.get('genres', '-')}"
        print(
            f"{r['partition']:<16}{r['fvu']:>7.3f}{r['dead_fraction']:>7.1%}{r['spliced_ratio']:>9.1%}"
            f"{r['fraction_recovered']:>7.1%}{r.get('mono_sae_median', float('nan')):>10.3f}"
            f"{r.get('mono_neuron_median', float('nan')):>10.3f}{concepts:>9}{steered:>9}"
            f"{r.get('median_share_ratio', float('nan')):>7.2f}"
        )
    print()
    print(
        f"{'partition':<16}{'SAGE gen':>9}{'base gen':>9}{'SAGE r':>8}{'base r':>8}{'SAGE AUC':>9}{'base AUC':>9}{'named':>7}"
    )
    for r in rows:
        if "sage_generative" in r:
            print(
                f"{r['partition']:<16}{r['sage_generative']:>9.3f}{r['baseline_generative']:>9.3f}"
                f"{r['sage_predictive_r']:>8.3f}{r['baseline_predictive_r']:>8.3f}"
                f"{r['sage_detection_auc']:>9.3f}{r['baseline_detection_auc']:>9.3f}"
                f"{r['sage_names_concept']:>7.0%}"
            )
    print(
        "targets: FVU <= 0.10, dead <= 2%, spliced >= 95% of original, mono SAE > neurons, "
        "steering >= 3x share within 20% NDCG loss for most genres; SAGE > baseline on "
        "generative accuracy and r; SAGE names the planted concept for >= 80% of features with "
        "concept AUC >= 0.9"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
