"""The Definitions object: assets, checks, resources and jobs of the RecSAE pipeline."""

from __future__ import annotations

import dagster as dg

from recsae_pipeline.assets import data, models
from recsae_pipeline.resources import DataQuality, StorageRoot, TorchDevice

main_job = dg.define_asset_job(
    "main",
    selection=dg.AssetSelection.all(),
    description="Materialize every asset, with every asset check, on the configured data.",
    # One process: steps share imports (torch, GX) instead of paying them per step, and the
    # heavy steps already use every core through torch.
    executor_def=dg.in_process_executor,
)

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([data, models]),
    asset_checks=dg.load_asset_checks_from_modules([data, models]),
    resources={"storage": StorageRoot(), "quality": DataQuality(), "device": TorchDevice()},
    jobs=[main_job],
    # Ad-hoc materializations from the UI or `dagster asset materialize` also run in one
    # process: torch already uses every core, so parallel steps would only oversubscribe them.
    executor=dg.in_process_executor,
)
