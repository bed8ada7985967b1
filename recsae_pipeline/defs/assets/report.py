"""The `results` asset: every headline comparison of the run, with both sides and paired
95% CIs, computed from the artifacts (`report/results.py`); `recsae report` rebuilds it."""

import dagster as dg

from recsae_pipeline.defs.assets.explanations import explanation_scores
from recsae_pipeline.defs.assets.features import feature_stats, steering_eval
from recsae_pipeline.defs.assets.models import recommender_eval
from recsae_pipeline.defs.assets.sae import sae
from recsae_pipeline.defs.config import knob
from recsae_pipeline.defs.partitions import feature_partitions
from recsae_pipeline.defs.resources import StorageRoot
from recsae_pipeline.report.results import build_results, write_results
from recsae_pipeline.report.stats import NO_DIFFERENCE
from recsae_pipeline.storage.registry import parse_partition_key

GROUP = "report"


class ResultsConfig(dg.Config):
    resamples: int = knob(build_results, "resamples", "Bootstrap resamples behind every 95% CI.")
    seed: int = knob(build_results, "seed", "Seed of the bootstrap resampling.")


@dg.asset(
    group_name=GROUP,
    kinds={"json", "markdown"},
    deps=[recommender_eval, sae, feature_stats, steering_eval, explanation_scores],
    description="Every headline comparison (recommenders, the SAE splice, SAE features vs "
    "neurons, steering vs baseline directions, SAGE vs the one-shot baseline) with both "
    "sides, the paired difference and its 95% CI: reports/results.json and results.md. "
    "Partitions not materialized are listed as missing. `recsae report` rebuilds it.",
)
def results(storage: StorageRoot, config: ResultsConfig) -> dg.MaterializeResult:
    partitions = [parse_partition_key(k) for k in feature_partitions.get_partition_keys()]
    built = build_results(storage.paths, partitions, config.resamples, config.seed)
    written = write_results(storage.paths, built, resamples=config.resamples, seed=config.seed)
    comparisons = written.results["comparisons"]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(written.json)),
            "comparisons": len(comparisons),
            "ci_excludes_zero": sum(c["verdict"] != NO_DIFFERENCE for c in comparisons),
            "missing": len(written.results["missing"]),
            "results": dg.MetadataValue.md(written.markdown.read_text()),
        }
    )
