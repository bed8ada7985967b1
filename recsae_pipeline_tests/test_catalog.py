"""The item catalog keeps the first row per id, cleans genres in order, drops impossible years."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from recsae_pipeline.data.catalog import build_catalog
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
    rows = {r["item_id"]: r for r in pq.read_table(paths.items).to_pylist()}
    assert list(rows) == ["a", "b", "c"]
    assert rows["a"] == {
        "item_id": "a",
        "title": "Alpha",
        "year": 1999,
        "genres": ["Drama", "Comedy"],
        "studio": "s1",
        "interactions": 2,
    }
    assert rows["b"]["title"] == "b" and rows["b"]["year"] is None and rows["b"]["genres"] == []
    assert rows["c"]["interactions"] == 0
    assert summary["duplicate_ids_dropped"] == 1 and summary["extra_attributes"] == "studio"
