"""Dagster resources: where artifacts live, data-quality bounds, and the DuckDB catalog."""

from pathlib import Path

import dagster as dg
import torch
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


def resolve_device(spec: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cpu`, `cuda` and `cuda:N` are taken as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise dg.Failure(
            f"device {spec!r} was requested but CUDA is not available here; use `auto` or `cpu`."
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise dg.Failure(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) exist.")
    return device


class TorchDevice(dg.ConfigurableResource):
    """Where every training and inference path runs: `auto` (CUDA when present), `cpu`, `cuda[:n]`."""

    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    threads: int | None = Field(
        default=None, description="CPU threads for torch; unset: torch's default."
    )

    @property
    def torch_device(self) -> torch.device:
        if self.threads:
            torch.set_num_threads(self.threads)
        return resolve_device(self.device)
