"""Every job of the pipeline, each selected by lineage, so a new asset lands in the right
job without editing a list of names."""

from __future__ import annotations

import dagster as dg

from recsae_pipeline.defs.assets.activations import activation_assets
from recsae_pipeline.defs.partitions import feature_partitions, model_partitions
from recsae_pipeline.storage.registry import parse_partition_key

ACTIVATIONS = dg.AssetSelection.assets(*activation_assets.values())
REPORT = dg.AssetSelection.assets("results")
"""Over every partition: runs after all of them (`report` job)."""
# Everything from the activations on is per (model, layer) partition: the SAEs, their
# features, steering, explanations and the browser.
PER_PARTITION = ACTIVATIONS.downstream() - REPORT

# One process per run: steps share imports (torch, GX) instead of paying them per step, and
# the heavy steps already use every core through torch.
main_job = dg.define_asset_job(
    "main",
    selection=dg.AssetSelection.all() - PER_PARTITION - REPORT,
    description="Data and models: every unpartitioned asset with its checks. "
    "`recsae materialize` runs this, then, per partition, its model's activations job and "
    "`features`.",
    executor_def=dg.in_process_executor,
)

# Dagster runs one partitions definition per run, and each model's activations have their
# own (so that each partition depends on its own model only): one job per model, then
# `features` for the partition.
activations_jobs = {
    model: dg.define_asset_job(
        f"activations_{model}",
        selection=dg.AssetSelection.assets(asset),
        partitions_def=model_partitions[model],
        description=f"Per ({model}, layer) partition: {model}'s hidden states at that layer.",
        executor_def=dg.in_process_executor,
    )
    for model, asset in activation_assets.items()
}

features_job = dg.define_asset_job(
    "features",
    selection=PER_PARTITION - ACTIVATIONS,
    partitions_def=feature_partitions,
    description="Per (model, layer) partition, after its activations job: the SAE trained on "
    "them, its feature activations and statistics, steering, explanations and their scores.",
    executor_def=dg.in_process_executor,
)


def partition_jobs(key: str) -> tuple[str, str]:
    """The jobs that build partition `key`, in order: its model's activations, then features."""
    model, _ = parse_partition_key(key)
    return activations_jobs[model].name, features_job.name


retrain_job = dg.define_asset_job(
    "retrain",
    selection=dg.AssetSelection.assets("sequences").downstream() - PER_PARTITION - REPORT,
    description="Rebuild sequences from the current raw log and retrain every model, the layer "
    "probe and the evaluation (unpartitioned assets; the `features_after_retrain` sensor then "
    "runs each partition's activations and `features` jobs).",
    executor_def=dg.in_process_executor,
)

ingest_job = dg.define_asset_job(
    "ingest_and_retrain",
    selection=dg.AssetSelection.assets("raw_interactions").downstream() - PER_PARTITION - REPORT,
    description="Re-ingest the raw log (the `new_interactions` sensor points it at the log plus "
    "the new drops), rebuild the catalog and sequences, and retrain everything unpartitioned.",
    executor_def=dg.in_process_executor,
)

report_job = dg.define_asset_job(
    "report",
    selection=REPORT,
    description="After every partition's `features` run: the `results` asset (every headline "
    "comparison with its 95% CI). `recsae materialize` runs it last; `recsae report` is the "
    "same from the command line.",
    executor_def=dg.in_process_executor,
)

jobs = [
    main_job,
    *activations_jobs.values(),
    features_job,
    report_job,
    retrain_job,
    ingest_job,
]
