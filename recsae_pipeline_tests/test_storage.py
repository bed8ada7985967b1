"""The artifact registry, the SQL helpers, the atomic Parquet writers and the DuckDB views."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsae_pipeline.storage.atomic import (
    PARQUET_COMPRESSION,
    copy_to_parquet,
    parquet_writer,
    write_parquet,
)
from recsae_pipeline.storage.registry import ArtifactPaths, shard_name
from recsae_pipeline.storage.sql import read_parquet, sql_identifier, sql_literal
from recsae_pipeline.storage.warehouse import refresh_views, view_definitions

PACKAGE = Path(__file__).resolve().parents[1] / "recsae_pipeline"
HOSTILE = 'it\'s a "dir"; DROP TABLE x; --'


def test_sql_literal_and_identifier_survive_quotes(tmp_path: Path) -> None:
    path = tmp_path / HOSTILE / "t.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({HOSTILE: [1, 2]}), path)
    con = duckdb.connect()
    assert con.execute(f"SELECT {sql_literal(HOSTILE)}").fetchone() == (HOSTILE,)
    column = sql_identifier(HOSTILE)
    assert con.execute(f"SELECT sum({column}) FROM {read_parquet(path)}").fetchone() == (3,)
    both = read_parquet([path, path], filename=True)
    assert con.execute(f"SELECT count(DISTINCT filename) FROM {both}").fetchone() == (1,)


def test_read_parquet_takes_no_column_from_a_name_value_directory(tmp_path: Path) -> None:
    # A storage root such as /runs/workers=2 must not grow a `workers` column
    path = tmp_path / "workers=2" / "model=a" / "t.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), path)
    con = duckdb.connect()
    assert [d[0] for d in con.execute(f"SELECT * FROM {read_parquet(path)}").description] == ["x"]
    asked = read_parquet(path, hive_partitioning=True)
    names = {d[0] for d in con.execute(f"SELECT * FROM {asked}").description}
    assert names == {"x", "workers", "model"}


def test_parquet_writers_are_atomic_and_use_the_store_codec(tmp_path: Path) -> None:
    table = pa.table({"x": list(range(10))})
    written = [
        write_parquet(table, tmp_path / "a.parquet", row_group_size=4),
        copy_to_parquet(duckdb.connect(), "SELECT range AS x FROM range(10)", tmp_path / "b.parquet", 4),
    ]  # fmt: skip
    with parquet_writer(tmp_path / "c.parquet", table.schema) as writer:
        writer.write_table(table, row_group_size=4)
    written.append(tmp_path / "c.parquet")
    for path in written:
        meta = pq.ParquetFile(path).metadata
        assert meta.num_rows == 10, path
        assert meta.row_group(0).column(0).compression == PARQUET_COMPRESSION.upper()
    assert pq.ParquetFile(written[0]).metadata.num_row_groups == 3  # row_group_size is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet", "c.parquet"]
    with pytest.raises(duckdb.Error):
        copy_to_parquet(duckdb.connect(), "SELECT * FROM no_such_table", tmp_path / "a.parquet")
    assert pq.read_table(tmp_path / "a.parquet").num_rows == 10  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet", "c.parquet"]


def test_every_registry_table_gets_a_view(tmp_path: Path) -> None:
    paths = ArtifactPaths(tmp_path / "root")
    tables = paths.tables()
    for name, table in tables.items():
        path = table.path
        if table.partitioned:
            glob = str(path.relative_to(paths.root))
            path = paths.root / glob.replace("model=*", "model=m").replace("layer=*", "layer=1")
            path = path.with_name(shard_name(0)) if "*" in path.name else path
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = {"item_id": ["a"], "item_idx": [1]} if name in ("items", "item_map") else {}
        pq.write_table(pa.table(columns or {"table": [name]}), path)
    views = view_definitions(paths)
    assert set(views) == set(tables)
    con = duckdb.connect(str(refresh_views(paths)), read_only=True)
    for name, table in tables.items():
        if name in ("items", "item_map"):
            continue
        columns = '"table", model, layer' if table.partitioned else '"table"'
        got = con.execute(f"SELECT {columns} FROM {name}").fetchall()
        assert got == ([(name, "m", 1)] if table.partitioned else [(name,)]), name
    # the catalog view carries the model index from the item map
    assert con.execute("SELECT item_idx, item_id FROM items").fetchall() == [(1, "a")]


def test_partition_paths_follow_the_hive_layout(tmp_path: Path) -> None:
    part = ArtifactPaths(tmp_path).partition("sasrec", 2)
    assert part.key == "sasrec.layer2"
    assert part.feature_stats == tmp_path / "feature_stats/model=sasrec/layer=2/features.parquet"
    assert part.activation_shards.parent == part.activations
    assert Path(part.activations / shard_name(3)).match(part.activation_shards.name)
    assert part.report("steering") == tmp_path / "reports/steering_sasrec_layer2.png"
    with pytest.raises(ValueError, match="plain name"):
        ArtifactPaths(tmp_path).partition("a=b", 1)


def test_parquet_is_written_only_through_storage_atomic() -> None:
    """No hard-coded codec, `pq.write_table` or `ParquetWriter` outside storage/atomic.py."""
    pattern = re.compile(r"pq\.write_table|ParquetWriter\(|COMPRESSION|compression=")
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{n}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "atomic.py"
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert not offenders, f"write Parquet through recsae_pipeline.storage.atomic: {offenders}"
