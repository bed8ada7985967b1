"""The DuckDB catalog: one database file of views over every Parquet artifact.

The file is rebuilt beside the old one and renamed into place, so a reader with the old file
open is never disturbed and two writers never hold a lock on the same file.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from recsae_pipeline.storage.atomic import atomic_path
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline.storage.sql import indexed_catalog_sql, read_parquet

HIVE_TYPES = "{'model': VARCHAR, 'layer': INTEGER}"


def view_definitions(paths: ArtifactPaths) -> dict[str, str]:
    """View name -> SQL, for the tables of `paths.tables()` that exist on disk."""
    views = {}
    for name, table in paths.tables().items():
        if not table.partitioned:
            if table.path.exists():
                views[name] = f"SELECT * FROM {read_parquet(table.path)}"
        elif any(paths.root.glob(str(table.path.relative_to(paths.root)))):
            # One view over every (model, layer) partition; `model` and `layer` from the paths.
            scan = read_parquet(table.path, hive_partitioning=True, hive_types=HIVE_TYPES)
            views[name] = f"SELECT * FROM {scan}"
    if "items" in views and "item_map" in views:
        # Catalog rows with their model index, the join most queries want.
        views["items"] = indexed_catalog_sql(paths.items, paths.item_map, keep_unindexed=True)
    return views


def refresh_views(paths: ArtifactPaths) -> Path:
    """Write `recsae.duckdb` with a view per existing artifact; returns its path."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with atomic_path(paths.duckdb) as tmp:
        con = duckdb.connect(str(tmp))
        try:
            for name, sql in view_definitions(paths).items():
                con.execute(f"CREATE VIEW {name} AS {sql}")
        finally:
            con.close()
    return paths.duckdb


def is_read_only_sql(sql: str) -> bool:
    """True for statements that only read (SELECT, WITH, DESCRIBE, SHOW, EXPLAIN, SUMMARIZE)."""
    statements = [s.strip() for s in sql.strip().split(";") if s.strip()]
    allowed = (
        "select",
        "with",
        "describe",
        "show",
        "explain",
        "summarize",
        "from",
        "values",
        "table",
    )
    return bool(statements) and all(s.split(None, 1)[0].lower() in allowed for s in statements)


def query(db_path: Path, sql: str) -> duckdb.DuckDBPyRelation | None:
    """Run a read-only query against the catalog through a read-only connection."""
    if not db_path.exists():
        raise FileNotFoundError(
            f"{db_path} does not exist yet; materialize the pipeline first (see README) "
            "or point RECSAE_DATA_DIR at its storage root."
        )
    if not is_read_only_sql(sql):
        raise PermissionError(
            "`recsae sql` only runs read-only statements (SELECT, WITH, DESCRIBE, SHOW, "
            "EXPLAIN, SUMMARIZE); write through the pipeline instead."
        )
    con = duckdb.connect(str(db_path), read_only=True)
    return con.sql(sql)
