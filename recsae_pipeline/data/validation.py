"""Great Expectations (GX Core 1.x) suites for raw interactions, the catalog and sequences.

GX validates pandas batches. To keep memory bounded, a table is split into batches by a
hash of `user_id`/`user_idx`, so every per-user expectation (including uniqueness of
(user, item, timestamp)) is exact within a batch and the union of batches covers the table.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from recsae_pipeline.data.sequences import MIN_LEAVE_ONE_OUT_LENGTH, split_positions
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline.storage.sql import read_parquet

DEFAULT_MIN_TIMESTAMP = 631_152_000  # 1990-01-01: older than any web-era interaction log


@dataclass(frozen=True)
class QualityBounds:
    """Thresholds of the data-quality suites."""

    min_timestamp: int = DEFAULT_MIN_TIMESTAMP
    max_timestamp: int | None = None  # None: now + 1 day
    min_rating: float = 0.0
    max_rating: float = 10.0
    min_sequence_length: int = MIN_LEAVE_ONE_OUT_LENGTH
    batch_rows: int = 2_000_000  # rows per GX batch


@dataclass
class SuiteOutcome:
    """The verdict of one suite over all batches, with GX's statistics merged."""

    suite: str
    success: bool
    evaluated: int = 0
    failed: list[str] = field(default_factory=list)
    rows: int = 0
    batches: int = 0
    seconds: float = 0.0
    details: dict[str, dict[str, Any]] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """Flat, JSON-friendly metadata for the asset check."""
        return {
            "suite": self.suite,
            "evaluated_expectations": self.evaluated,
            "successful_expectations": self.evaluated - len(self.failed),
            "failed_expectations": ", ".join(self.failed) or "none",
            "rows_validated": self.rows,
            "gx_batches": self.batches,
            "gx_seconds": round(self.seconds, 2),
            "expectations": self.details,
        }


def _gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx

    return gx


def _run_suite(
    name: str,
    build: Callable[[Any], list[Any]],
    frames: Iterator[pd.DataFrame],
) -> SuiteOutcome:
    """Validate every frame against the suite `build(gx.expectations)` and merge results."""
    gx = _gx()
    start = time.perf_counter()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas(f"{name}_source")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("batch")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=build(gx.expectations)))
    outcome = SuiteOutcome(suite=name, success=True)
    for frame in frames:
        result = batch_definition.get_batch(batch_parameters={"dataframe": frame}).validate(suite)
        outcome.batches += 1
        outcome.rows += len(frame)
        for r in result.results:
            cfg = r.expectation_config
            key = f"{cfg.type}({_kwargs_label(cfg.kwargs)})"
            entry = outcome.details.setdefault(key, {"success": True, "unexpected_count": 0})
            entry["success"] = bool(entry["success"] and r.success)
            entry["unexpected_count"] += int(r.result.get("unexpected_count") or 0)
            if r.result.get("observed_value") is not None:
                entry["observed_value"] = _jsonable(r.result["observed_value"])
            sample = r.result.get("partial_unexpected_list")
            if sample and "unexpected_sample" not in entry:
                entry["unexpected_sample"] = [_jsonable(v) for v in sample[:5]]
    outcome.evaluated = len(outcome.details)
    outcome.failed = [k for k, v in outcome.details.items() if not v["success"]]
    outcome.success = not outcome.failed and outcome.batches > 0
    outcome.seconds = time.perf_counter() - start
    return outcome


def _kwargs_label(kwargs: dict[str, Any]) -> str:
    keys = ("column", "column_list", "column_A", "column_B", "min_value", "max_value", "column_set")
    parts = []
    for k in keys:
        if k in kwargs and kwargs[k] is not None:
            v = kwargs[k]
            parts.append(f"{k}={list(v) if isinstance(v, list | set | tuple) else v}")
    return ", ".join(parts)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def _hash_batches(
    con: duckdb.DuckDBPyConnection, select_sql: str, key: str, total: int, batch_rows: int
) -> Iterator[pd.DataFrame]:
    n = max(1, math.ceil(total / batch_rows))
    for b in range(n):
        where = "" if n == 1 else f"WHERE hash({key}) % {n} = {b}"
        yield con.execute(f"SELECT * FROM ({select_sql}) {where}").df()


def validate_raw_interactions(paths: ArtifactPaths, bounds: QualityBounds) -> SuiteOutcome:
    """Schema and types, non-null ids and timestamps, plausible range, unique (user, item, ts)."""
    max_ts = bounds.max_timestamp or int(time.time()) + 86_400
    raw = read_parquet(paths.raw_interactions)
    con = duckdb.connect()
    try:
        (total,) = con.execute(f"SELECT count(*) FROM {raw}").fetchone()  # type: ignore[misc]

        def build(E: Any) -> list[Any]:
            return [
                E.ExpectTableColumnsToMatchOrderedList(
                    column_list=["user_id", "item_id", "timestamp", "rating"]
                ),
                E.ExpectColumnValuesToBeOfType(column="user_id", type_="str"),
                E.ExpectColumnValuesToBeOfType(column="item_id", type_="str"),
                E.ExpectColumnValuesToBeOfType(column="timestamp", type_="int64"),
                E.ExpectColumnValuesToBeInTypeList(
                    column="rating", type_list=["float32", "float64"]
                ),
                E.ExpectColumnValuesToNotBeNull(column="user_id"),
                E.ExpectColumnValuesToNotBeNull(column="item_id"),
                E.ExpectColumnValuesToNotBeNull(column="timestamp"),
                E.ExpectColumnValuesToBeBetween(
                    column="timestamp", min_value=bounds.min_timestamp, max_value=max_ts
                ),
                E.ExpectColumnValuesToBeBetween(
                    column="rating", min_value=bounds.min_rating, max_value=bounds.max_rating
                ),
                E.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item_id", "timestamp"]),
            ]

        return _run_suite(
            "raw_interactions",
            build,
            _hash_batches(con, f"SELECT * FROM {raw}", "user_id", total, bounds.batch_rows),
        )
    finally:
        con.close()


def validate_catalog(paths: ArtifactPaths) -> SuiteOutcome:
    """Catalog ids unique and non-null, and every interacted item present in the catalog."""
    con = duckdb.connect()
    try:
        items = read_parquet(paths.items)
        raw = read_parquet(paths.raw_interactions)
        frame = con.execute(
            f"SELECT i.item_id, c.item_id IS NOT NULL AS in_catalog FROM (SELECT DISTINCT item_id FROM {raw}) i "
            f"LEFT JOIN (SELECT DISTINCT item_id FROM {items}) c USING (item_id)"
        ).df()
        catalog = con.execute(f"SELECT item_id, title, year FROM {items}").df()
    finally:
        con.close()

    def coverage(E: Any) -> list[Any]:
        return [E.ExpectColumnValuesToBeInSet(column="in_catalog", value_set=[True])]

    def catalog_suite(E: Any) -> list[Any]:
        return [
            E.ExpectColumnValuesToNotBeNull(column="item_id"),
            E.ExpectColumnValuesToBeUnique(column="item_id"),
            E.ExpectColumnValuesToNotBeNull(column="title"),
            E.ExpectColumnValuesToBeBetween(column="year", min_value=1870, max_value=2100),
        ]

    first = _run_suite("item_catalog", catalog_suite, iter([catalog]))
    second = _run_suite("catalog_coverage", coverage, iter([frame]))
    merged = SuiteOutcome(suite="item_catalog", success=first.success and second.success)
    for part in (first, second):
        merged.details.update(part.details)
        merged.rows += part.rows
        merged.batches += part.batches
        merged.seconds += part.seconds
    missing = int(len(frame) - frame["in_catalog"].sum())
    merged.details[next(k for k in second.details)]["items_missing_from_catalog"] = missing
    if missing:
        merged.details[next(k for k in second.details)]["missing_sample"] = (
            frame.loc[~frame["in_catalog"], "item_id"].head(5).tolist()
        )
    merged.evaluated = len(merged.details)
    merged.failed = [k for k, v in merged.details.items() if not v["success"]]
    return merged


def sequence_split_frame(sequences: Path, num_items_sql: str) -> str:
    """Per user: length, split positions and the leakage-relevant timestamps, as SQL."""
    seq = read_parquet(sequences)
    return f"""
        SELECT user_idx, n_items, len(items) AS list_length, list_min(items) AS min_item, list_max(items) AS max_item, ({num_items_sql}) AS num_items,
               timestamps[n_items] AS test_timestamp,
               list_max(timestamps[1:n_items - 1]) AS max_prefix_timestamp,
               timestamps = list_sort(timestamps) AS chronological
        FROM {seq}
    """


def _with_split(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Add the positions that training and evaluation will use (the same `split_positions`)."""
    for frame in frames:
        n = frame["n_items"].to_numpy()
        ok = n >= MIN_LEAVE_ONE_OUT_LENGTH
        last_train, valid, test = split_positions(np.where(ok, n, MIN_LEAVE_ONE_OUT_LENGTH))
        frame["last_train_target"], frame["valid_position"], frame["test_position"] = (
            last_train,
            valid,
            test,
        )
        yield frame


def validate_sequences(paths: ArtifactPaths, bounds: QualityBounds) -> SuiteOutcome:
    """Minimum length, ids in range, chronology, and no test target inside the training prefix."""
    con = duckdb.connect()
    try:
        num_items = f"SELECT max(item_idx) FROM {read_parquet(paths.item_map)}"
        select = sequence_split_frame(paths.sequences, num_items)
        (total,) = con.execute(f"SELECT count(*) FROM ({select})").fetchone()  # type: ignore[misc]

        def build(E: Any) -> list[Any]:
            return [
                E.ExpectColumnValuesToBeUnique(column="user_idx"),
                E.ExpectColumnValuesToBeBetween(
                    column="n_items",
                    min_value=max(bounds.min_sequence_length, MIN_LEAVE_ONE_OUT_LENGTH),
                ),
                E.ExpectColumnPairValuesToBeEqual(column_A="n_items", column_B="list_length"),
                E.ExpectColumnValuesToBeBetween(column="min_item", min_value=1),
                E.ExpectColumnPairValuesAToBeGreaterThanB(
                    column_A="num_items", column_B="max_item", or_equal=True
                ),
                E.ExpectColumnValuesToBeInSet(column="chronological", value_set=[True]),
                E.ExpectColumnPairValuesAToBeGreaterThanB(
                    column_A="valid_position", column_B="last_train_target"
                ),
                E.ExpectColumnPairValuesAToBeGreaterThanB(
                    column_A="test_position", column_B="valid_position"
                ),
                E.ExpectColumnPairValuesAToBeGreaterThanB(
                    column_A="test_timestamp", column_B="max_prefix_timestamp", or_equal=True
                ),
            ]

        return _run_suite(
            "sequences",
            build,
            _with_split(_hash_batches(con, select, "user_idx", total, bounds.batch_rows)),
        )
    finally:
        con.close()
