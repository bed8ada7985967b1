"""Dagster resources: where artifacts live, data-quality bounds, and the DuckDB catalog."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from recsae_pipeline.data.validation import DEFAULT_MIN_TIMESTAMP, QualityBounds
from recsae_pipeline.store import ArtifactPaths, default_data_dir
from recsae_pipeline.warehouse import refresh_views


class StorageRoot(dg.ConfigurableResource):
    """Root directory of every artifact; defaults to `$RECSAE_DATA_DIR`, else `data/`."""

    path: str | None = Field(
        default=None, description="Storage root; unset means $RECSAE_DATA_DIR or data/."
    )

    @property
    def paths(self) -> ArtifactPaths:
        return ArtifactPaths(Path(self.path or default_data_dir()).resolve())

    def refresh_duckdb(self) -> Path:
        """Rebuild the DuckDB views over every artifact that exists now."""
        return refresh_views(self.paths)


class DataQuality(dg.ConfigurableResource):
    """Bounds used by the Great Expectations suites behind the blocking asset checks."""

    min_timestamp: int = Field(
        default=DEFAULT_MIN_TIMESTAMP, description="Earliest plausible timestamp (s)."
    )
    max_timestamp: int | None = Field(
        default=None, description="Latest plausible timestamp; unset: now + 1 day."
    )
    min_rating: float = 0.0
    max_rating: float = 10.0
    min_sequence_length: int = Field(
        default=3, description="Shortest sequence allowed after filtering."
    )
    batch_rows: int = Field(default=2_000_000, description="Rows per GX batch (bounds memory).")

    @property
    def bounds(self) -> QualityBounds:
        return QualityBounds(**self.model_dump())
