"""Every job of the pipeline, each selected by lineage, so a new asset lands in the right
job without editing a list of names."""

from __future__ import annotations

import dagster as dg

from recsae_pipeline.defs.partitions import feature_partitions

# Everything from `activations` on is per (model, layer) partition: the SAEs, their features,
# steering, explanations and the browser.
PER_PARTITION = dg.AssetSelection.assets("activations").downstream()

# One process per run: steps share imports (torch, GX) instead of paying them per step, and
# the heavy steps already use every core through torch.
main_job = dg.define_asset_job(
    "main",
    selection=dg.AssetSelection.all() - PER_PARTITION,
    description="Data and models: every unpartitioned asset with its checks. "
    "`recsae materialize` runs this, then `features` for every partition.",
    executor_def=dg.in_process_executor,
)

features_job = dg.define_asset_job(
    "features",
    selection=PER_PARTITION,
    partitions_def=feature_partitions,
    description="Per (model, layer) partition: activations, the SAE trained on them, its "
    "feature activations and statistics, steering, explanations and their scores.",
    executor_def=dg.in_process_executor,
)

retrain_job = dg.define_asset_job(
    "retrain",
    selection=dg.AssetSelection.assets("sequences").downstream() - PER_PARTITION,
    description="Rebuild sequences from the current raw log and retrain every model, the layer "
    "probe and the evaluation (unpartitioned assets; the `features_after_retrain` sensor then "
    "runs the per-(model, layer) `features` job).",
    executor_def=dg.in_process_executor,
)

ingest_job = dg.define_asset_job(
    "ingest_and_retrain",
    selection=dg.AssetSelection.assets("raw_interactions").downstream() - PER_PARTITION,
    description="Re-ingest the raw log (the `new_interactions` sensor points it at the log plus "
    "the new drops), rebuild the catalog and sequences, and retrain everything unpartitioned.",
    executor_def=dg.in_process_executor,
)

jobs = [main_job, features_job, retrain_job, ingest_job]
