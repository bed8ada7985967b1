"""Checks on an activations partition: complete, finite, and as wide as the model."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq

from recsae_pipeline.activations.shards import expected_rows
from recsae_pipeline.models.validation import CheckOutcome, from_problems
from recsae_pipeline.storage.registry import SHARD_GLOB
from recsae_pipeline.storage.sql import read_parquet


def completeness_check(
    partition_dir: Path, sequences: list[np.ndarray], max_len: int, hidden_size: int
) -> CheckOutcome:
    """Row count equals the non-padding positions of `sequences` (within max_len), no row
    holds NaN or Inf, and the width equals the model's `hidden_size`."""
    want_rows = expected_rows(sequences, max_len)
    first = next(partition_dir.glob(SHARD_GLOB), None)
    if first is None:
        raise FileNotFoundError(f"{partition_dir} holds no {SHARD_GLOB}; rerun the asset")
    width = pq.read_schema(first).field("activation").type.list_size
    rows, nonfinite = duckdb.execute(
        "SELECT count(*), count(*) FILTER (WHERE list_bool_or(list_transform(activation::FLOAT[], "
        f"lambda x: isnan(x) OR isinf(x)))) FROM {read_parquet(partition_dir / SHARD_GLOB)}"
    ).fetchone()  # type: ignore[misc]
    problems = []
    if rows != want_rows:
        problems.append(f"{rows} rows, expected {want_rows} non-padding positions")
    if nonfinite:
        problems.append(f"{nonfinite} rows with NaN/Inf")
    if width != hidden_size:
        problems.append(f"width {width} != model hidden size {hidden_size}")
    metadata = {
        "rows": rows,
        "expected_rows": want_rows,
        "width": width,
        "nonfinite_rows": nonfinite,
    }
    return from_problems(problems, f"{rows:,} rows, all finite, width {width}", metadata)
