"""The item catalog keeps the first row per id, cleans genres in order, drops impossible years."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsae_pipeline.data.catalog import ATTRIBUTE_FAMILIES, Catalog, build_catalog
from recsae_pipeline.sae.features import item_attributes
from recsae_pipeline.storage.registry import ArtifactPaths


def test_catalog_normalisation(paths: ArtifactPaths) -> None:
    paths.raw_dir.mkdir(parents=True)
    pq.write_table(
        pa.table({"user_id": ["u", "u", "u"], "item_id": ["a", "a", "b"], "timestamp": pa.array([1, 2, 3], pa.int64()),
                  "rating": pa.array([None] * 3, pa.float32())}),
        paths.raw_interactions,
    )  # fmt: skip
    pq.write_table(
        pa.table({"item_id": ["a", "b", "a", "c"], "title": ["Alpha", " ", "Dup", None], "year": pa.array([1999, 3021, 2000, None], pa.int16()),
                  "genres": [[" Drama", "Comedy", "Drama", ""], None, ["X"], []], "studio": ["s1", "s2", "s3", "s4"]}),
        paths.raw_items,
    )  # fmt: skip
    summary = build_catalog(paths)
    table = pq.read_table(paths.items)
    assert table.column_names == ["item_id", "title", "year", "genres", "studio", "interactions"]
    # The first row per id wins; a blank or missing title becomes the id; year 3021 is dropped.
    assert [tuple(row.values()) for row in table.to_pylist()] == [
        ("a", "Alpha", 1999, ["Drama", "Comedy"], "s1", 2),
        ("b", "b", None, [], "s2", 1),
        ("c", "c", None, [], "s4", 0),
    ]
    assert summary["duplicate_ids_dropped"] == 1 and summary["extra_attributes"] == "studio"


def _tiny_store(paths: ArtifactPaths) -> None:
    """Four catalog items, three of them indexed; item 1 is seen 4 times, 2 twice, 3 once."""
    paths.items.parent.mkdir(parents=True)
    paths.sequences_dir.mkdir(parents=True)
    pq.write_table(
        pa.table({"item_id": ["a", "b", "c", "unindexed"], "title": ["A", "B", "C", "U"],
                  "year": pa.array([1999, 2004, None, 1950], pa.int16()),
                  "genres": [["Drama", "Comedy"], ["Drama"], [], ["War"]],
                  "franchise": ["F", "", None, "G"], "interactions": [4, 2, 1, 0]}),
        paths.items,
    )  # fmt: skip
    pq.write_table(
        pa.table({"item_idx": pa.array([1, 2, 3], pa.int32()), "item_id": ["a", "b", "c"]}),
        paths.item_map,
    )
    pq.write_table(
        pa.table({"user_idx": pa.array([1, 2], pa.int32()),
                  "items": pa.array([[1, 2, 1], [1, 3, 2, 1]], pa.list_(pa.int32()))}),
        paths.sequences,
    )  # fmt: skip


def test_item_attributes_are_defined_once_for_python_and_sql(paths: ArtifactPaths) -> None:
    _tiny_store(paths)
    catalog = Catalog.load(paths)
    assert sorted(catalog.items) == [1, 2, 3]  # the unindexed item is left out
    # 7 interactions: item 1 holds the first third (head), item 2 starts before 2/3 (torso).
    assert catalog[1].attributes() == {
        "genre:Drama", "genre:Comedy", "decade:1990s", "popularity:head", "franchise:F",
    }  # fmt: skip
    assert catalog[2].attributes() == {"genre:Drama", "decade:2000s", "popularity:torso"}
    assert catalog[3].attributes() == {"popularity:tail"}
    assert {a.partition(":")[0] for i in catalog.items.values() for a in i.attributes()} <= set(
        ATTRIBUTE_FAMILIES
    )
    # The SQL side (feature enrichment joins `attrs`) sees exactly the same labels.
    con = duckdb.connect()
    item_attributes(con, catalog)
    sql_side: dict[int, set[str]] = {}
    for idx, family, value in con.execute("SELECT * FROM attrs").fetchall():
        sql_side.setdefault(idx, set()).add(f"{family}:{value}")
    assert sql_side == {idx: item.attributes() for idx, item in catalog.items.items()}
    assert catalog.base_rates["genre:Drama"] == pytest.approx(2 / 3)
