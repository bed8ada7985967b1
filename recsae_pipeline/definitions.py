"""The Definitions object: assets, checks, resources and jobs of the RecSAE pipeline."""

from __future__ import annotations

import dagster as dg

from recsae_pipeline import automation
from recsae_pipeline.assets import (
    activations,
    browser,
    data,
    explanations,
    features,
    models,
    sae,
)
from recsae_pipeline.resources import LLM, DataQuality, StorageRoot, TorchDevice

feature_partitions = activations.activation_partitions
_partitioned = dg.AssetSelection.assets(
    activations.activations,
    sae.sae,
    features.feature_activations,
    features.feature_stats,
    features.steering_eval,
    explanations.explanations,
    explanations.explanation_scores,
    browser.feature_browser,
)

main_job = dg.define_asset_job(
    "main",
    selection=dg.AssetSelection.all() - _partitioned,
    description="Data and models: every unpartitioned asset with its checks. "
    "`recsae materialize` runs this, then `features` for every partition.",
    # One process: steps share imports (torch, GX) instead of paying them per step, and the
    # heavy steps already use every core through torch.
    executor_def=dg.in_process_executor,
)

features_job = dg.define_asset_job(
    "features",
    selection=_partitioned,
    partitions_def=feature_partitions,
    description="Per (model, layer) partition: activations, the SAE trained on them, its "
    "feature activations and statistics, steering, explanations and their scores.",
    executor_def=dg.in_process_executor,
)

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(
        [data, models, activations, sae, features, explanations, browser]
    ),
    asset_checks=dg.load_asset_checks_from_modules(
        [data, models, activations, sae, features, explanations, browser]
    ),
    resources={
        "storage": StorageRoot(),
        "quality": DataQuality(),
        "device": TorchDevice(),
        "llm": LLM(),
    },
    jobs=[main_job, features_job, *automation.jobs],
    schedules=automation.schedules,
    sensors=[
        *automation.sensors,
        automation.build_features_after_retrain_sensor(
            features_job, feature_partitions.get_partition_keys()
        ),
    ],
    # Ad-hoc materializations from the UI or `dagster asset materialize` also run in one
    # process: torch already uses every core, so parallel steps would only oversubscribe them.
    executor=dg.in_process_executor,
)
