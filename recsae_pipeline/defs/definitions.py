"""The Definitions object: assets, checks, resources, jobs, schedules and sensors."""

from __future__ import annotations

import dagster as dg

from recsae_pipeline.defs import jobs, schedules, sensors
from recsae_pipeline.defs.assets import (
    activations,
    browser,
    data,
    explanations,
    features,
    models,
    report,
    sae,
)
from recsae_pipeline.defs.partitions import feature_partitions
from recsae_pipeline.defs.resources import LLM, DataQuality, StorageRoot, TorchDevice

ASSET_MODULES = [data, models, activations, sae, features, explanations, browser, report]

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(ASSET_MODULES),
    asset_checks=dg.load_asset_checks_from_modules(ASSET_MODULES),
    resources={
        "storage": StorageRoot(),
        "quality": DataQuality(),
        "device": TorchDevice(),
        "llm": LLM(),
    },
    jobs=jobs.jobs,
    schedules=schedules.schedules,
    sensors=[
        *sensors.sensors,
        sensors.build_features_after_retrain_sensor(
            jobs.features_job, feature_partitions.get_partition_keys()
        ),
    ],
    # Ad-hoc materializations from the UI or `dagster asset materialize` also run in one
    # process: torch already uses every core, so parallel steps would only oversubscribe them.
    executor=dg.in_process_executor,
)
