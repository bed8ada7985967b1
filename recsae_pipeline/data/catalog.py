"""The item catalog: the source's item table, normalised to the contract, with popularity."""

from __future__ import annotations

from typing import Any

import duckdb

from recsae_pipeline.data.ingest import DataSourceError, _sql_str
from recsae_pipeline.store import ArtifactPaths, atomic_path

MIN_YEAR, MAX_YEAR = 1870, 2100


def build_catalog(paths: ArtifactPaths) -> dict[str, Any]:
    """Write `catalog/items.parquet`: one row per item id (first wins), years outside
    1870-2100 set to null, genres trimmed and de-duplicated, interaction counts attached."""
    if not paths.raw_items.exists():
        raise DataSourceError(
            f"{paths.raw_items} is missing; materialize `raw_interactions` first."
        )
    con = duckdb.connect()
    try:
        raw_items = f"read_parquet({_sql_str(str(paths.raw_items))}, file_row_number = true)"
        extras = [
            r[0]
            for r in con.execute(f"DESCRIBE SELECT * FROM {raw_items}").fetchall()
            if r[0] not in ("item_id", "title", "year", "genres", "file_row_number")
        ]
        extra_sql = "".join(f', "{c}"' for c in extras)
        select = f"""
            WITH ranked AS (
                SELECT *, row_number() OVER (PARTITION BY item_id ORDER BY file_row_number) AS dup,
                       list_transform(COALESCE(genres, []), lambda g: trim(g)) AS trimmed
                FROM {raw_items} WHERE item_id IS NOT NULL
            ), counts AS (
                SELECT item_id, count(*) AS interactions
                FROM read_parquet({_sql_str(str(paths.raw_interactions))}) GROUP BY item_id
            )
            SELECT r.item_id, COALESCE(nullif(trim(r.title), ''), r.item_id) AS title,
                   CAST(CASE WHEN r.year BETWEEN {MIN_YEAR} AND {MAX_YEAR} THEN r.year END AS SMALLINT) AS year,
                   list_filter(r.trimmed, lambda g, i: g <> '' AND list_position(r.trimmed, g) = i) AS genres  -- dedupe, keep order
                   {extra_sql.replace(', "', ', r."')},
                   COALESCE(c.interactions, 0) AS interactions
            FROM ranked r LEFT JOIN counts c USING (item_id)
            WHERE r.dup = 1 ORDER BY r.file_row_number
        """
        paths.items.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(paths.items) as tmp:
            con.execute(
                f"COPY ({select}) TO {_sql_str(str(tmp))} (FORMAT parquet, COMPRESSION zstd)"
            )
        items, with_year, with_genres, duplicates, genres = con.execute(
            f"""SELECT count(*), count(year), count(*) FILTER (WHERE len(genres) > 0),
                       (SELECT count(*) - count(DISTINCT item_id) FROM {raw_items}),
                       (SELECT count(DISTINCT g) FROM (SELECT unnest(genres) AS g FROM read_parquet({_sql_str(str(paths.items))})))
                FROM read_parquet({_sql_str(str(paths.items))})"""
        ).fetchone()  # type: ignore[misc]
    finally:
        con.close()
    return {
        "items": int(items),
        "items_with_year": int(with_year),
        "items_with_genres": int(with_genres),
        "distinct_genres": int(genres),
        "duplicate_ids_dropped": int(duplicates),
        "extra_attributes": ", ".join(extras) or "none",
    }
