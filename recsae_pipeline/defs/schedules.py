"""Schedules: weekly retraining."""

from __future__ import annotations

import dagster as dg

from recsae_pipeline.defs.jobs import retrain_job

weekly_retrain = dg.ScheduleDefinition(
    name="weekly_retrain",
    job=retrain_job,
    cron_schedule="0 3 * * 1",
    execution_timezone="UTC",
    description="Mondays 03:00 UTC: sequences and every unpartitioned model downstream of them; "
    "the `features_after_retrain` sensor then runs the per-partition `features` job. Unchanged "
    "inputs, config and code skip their work (content-hash data versions).",
)


schedules = [weekly_retrain]
