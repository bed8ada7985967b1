"""The DuckDB catalog: one database file of views over every Parquet artifact.

The file is rebuilt beside the old one and renamed into place, so a reader with the old file
open is never disturbed and two writers never hold a lock on the same file.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from recsae_pipeline.storage.atomic import atomic_path
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline.storage.sql import sql_literal as _quote


def view_definitions(paths: ArtifactPaths) -> dict[str, str]:
    """View name -> SQL, for the artifacts that exist on disk."""
    views = {}
    candidates = {
        "interactions": paths.raw_interactions,
        "ground_truth": paths.ground_truth,
        "items": paths.items,
        "sequences": paths.sequences,
        "item_map": paths.item_map,
        "user_map": paths.user_map,
        "recommender_eval": paths.recommender_eval,
        "layer_probe": paths.layer_probe,
    }
    for name, path in candidates.items():
        if path.exists():
            views[name] = f"SELECT * FROM read_parquet({_quote(path)})"
    shards = paths.root / "activations"
    if any(shards.glob("model=*/layer=*/part-*.parquet")):
        # One view over every (model, layer) partition; `model` and `layer` come from the paths.
        views["activations"] = (
            f"SELECT * FROM read_parquet({_quote(shards / 'model=*' / 'layer=*' / 'part-*.parquet')}, "
            "hive_partitioning = true, hive_types = {'model': VARCHAR, 'layer': INTEGER})"
        )
    # Per-(model, layer) tables: one view each over every partition's file.
    partitioned = {
        "feature_activations": ("feature_activations", "part-*.parquet"),
        "feature_stats": ("feature_stats", "features.parquet"),
        "neuron_stats": ("feature_stats", "neurons.parquet"),
        "feature_enrichment": ("feature_stats", "enrichment.parquet"),
        "planted_concepts": ("feature_stats", "concepts.parquet"),
        "steering_points": ("steering", "points.parquet"),
        "steering_summary": ("steering", "summary.parquet"),
        "explanations": ("explanations", "explanations.parquet"),
        "explanation_scores": ("explanation_scores", "scores.parquet"),
        "explanation_summary": ("explanation_scores", "summary.parquet"),
    }
    for name, (artifact, file) in partitioned.items():
        base = paths.root / artifact
        if any(base.glob(f"model=*/layer=*/{file}")):
            views[name] = (
                f"SELECT * FROM read_parquet({_quote(base / 'model=*' / 'layer=*' / file)}, "
                "hive_partitioning = true, hive_types = {'model': VARCHAR, 'layer': INTEGER})"
            )
    if "items" in views and "item_map" in views:
        # Catalog rows with their model index, the join most queries want.
        views["items"] = (
            f"SELECT m.item_idx, c.* FROM read_parquet({_quote(paths.items)}) c "
            f"LEFT JOIN read_parquet({_quote(paths.item_map)}) m USING (item_id)"
        )
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
