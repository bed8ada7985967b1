"""The GX suites pass on clean data and fail, with counts, on each planted problem."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsae_pipeline.data.catalog import build_catalog
from recsae_pipeline.data.sequences import SequenceConfig, build_sequences
from recsae_pipeline.data.validation import (
    QualityBounds,
    validate_catalog,
    validate_raw_interactions,
    validate_sequences,
)
from recsae_pipeline.storage.registry import ArtifactPaths

T0 = 1_600_000_000


def write_raw(paths: ArtifactPaths, rows: list[tuple], items: list[str] | None = None) -> None:
    paths.raw_dir.mkdir(parents=True, exist_ok=True)
    users, item_ids, ts, ratings = zip(*rows, strict=True)
    pq.write_table(
        pa.table({"user_id": pa.array(users, pa.string()), "item_id": pa.array(item_ids, pa.string()),
                  "timestamp": pa.array(ts, pa.int64()), "rating": pa.array(ratings, pa.float32())}),
        paths.raw_interactions,
    )  # fmt: skip
    catalog = sorted(set(item_ids)) if items is None else items
    pq.write_table(
        pa.table({"item_id": catalog, "title": [f"T{i}" for i in catalog], "year": pa.array([1999] * len(catalog), pa.int16()),
                  "genres": [["Drama"]] * len(catalog)}),
        paths.raw_items,
    )  # fmt: skip


CLEAN = [(f"u{u}", f"i{i}", T0 + 10 * i + u, 4.0) for u in range(4) for i in range(5)]


def failed(outcome) -> list[str]:
    return [k for k, v in outcome.details.items() if not v["success"]]


def test_clean_data_passes_every_suite(paths: ArtifactPaths) -> None:
    write_raw(paths, CLEAN)
    build_catalog(paths)
    build_sequences(paths, SequenceConfig(user_core=3, item_core=1))
    for outcome in (
        validate_raw_interactions(paths, QualityBounds()),
        validate_catalog(paths),
        validate_sequences(paths, QualityBounds()),
    ):
        assert outcome.success, failed(outcome)
        assert outcome.evaluated >= 4 and outcome.rows > 0


def test_duplicates_and_implausible_timestamps_fail(paths: ArtifactPaths) -> None:
    write_raw(paths, [*CLEAN, CLEAN[0], ("u9", "i1", 5, 4.0), ("u9", "i2", T0, 11.0)])
    outcome = validate_raw_interactions(paths, QualityBounds())
    assert not outcome.success
    names = " ".join(failed(outcome))
    assert "expect_compound_columns_to_be_unique" in names
    assert "expect_column_values_to_be_between(column=timestamp" in names
    assert "expect_column_values_to_be_between(column=rating" in names
    ts = next(v for k, v in outcome.details.items() if "column=timestamp, min_value" in k)
    assert ts["unexpected_count"] == 1 and ts["unexpected_sample"] == [5]


def test_batches_by_user_hash_still_find_cross_batch_duplicates(paths: ArtifactPaths) -> None:
    write_raw(paths, [*CLEAN, CLEAN[7]])
    outcome = validate_raw_interactions(paths, QualityBounds(batch_rows=5))
    assert outcome.batches > 1
    assert any("compound" in k for k in failed(outcome))


def test_item_missing_from_catalog_fails(paths: ArtifactPaths) -> None:
    write_raw(paths, CLEAN, items=["i0", "i1", "i2"])
    build_catalog(paths)
    outcome = validate_catalog(paths)
    assert not outcome.success
    entry = next(v for k, v in outcome.details.items() if "in_catalog" in k)
    assert entry["items_missing_from_catalog"] == 2
    assert sorted(entry["missing_sample"]) == ["i3", "i4"]


def test_sequence_suite_catches_leakage_and_short_sequences(paths: ArtifactPaths) -> None:
    write_raw(paths, CLEAN)
    build_sequences(paths, SequenceConfig(user_core=3, item_core=1))
    table = pq.read_table(paths.sequences).to_pylist()
    table[0]["timestamps"] = list(reversed(table[0]["timestamps"]))  # test target before its prefix
    table[1]["items"], table[1]["timestamps"], table[1]["n_items"] = (
        table[1]["items"][:2],
        table[1]["timestamps"][:2],
        2,
    )
    pq.write_table(
        pa.Table.from_pylist(table, schema=pq.read_schema(paths.sequences)), paths.sequences
    )
    outcome = validate_sequences(paths, QualityBounds())
    names = " ".join(failed(outcome))
    assert "chronological" in names
    assert "test_timestamp" in names
    assert "column=n_items" in names


@pytest.mark.parametrize("bad_item", [0, 99])
def test_sequence_item_indices_must_be_in_range(paths: ArtifactPaths, bad_item: int) -> None:
    write_raw(paths, CLEAN)
    build_sequences(paths, SequenceConfig(user_core=3, item_core=1))
    table = pq.read_table(paths.sequences).to_pylist()
    table[2]["items"][1] = bad_item
    pq.write_table(
        pa.Table.from_pylist(table, schema=pq.read_schema(paths.sequences)), paths.sequences
    )
    assert not validate_sequences(paths, QualityBounds()).success
