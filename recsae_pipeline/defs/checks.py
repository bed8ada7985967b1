"""Domain check outcomes as Dagster asset check results."""

from __future__ import annotations

import dagster as dg

from recsae_pipeline.models.validation import CheckOutcome


def check_result(
    name: str | None,
    outcome: CheckOutcome,
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
) -> dg.AssetCheckResult:
    """The result of check `name` (None inside an `@asset_check`, which knows its name)."""
    return dg.AssetCheckResult(
        check_name=name,
        passed=bool(outcome.passed),
        severity=severity,
        description=outcome.description,
        metadata=outcome.metadata,
    )
