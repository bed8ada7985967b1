"""DuckDB SQL fragments: the one quoting helper, the one Parquet scan and the one catalog join.

Every path or text value that goes into SQL goes through `sql_literal`; values that are not
part of the statement's shape are better passed as `?` parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

Source = str | Path


def sql_literal(value: Source) -> str:
    """A DuckDB string literal for a path or text (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_identifier(name: str) -> str:
    """A DuckDB quoted identifier for a column name (double quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def read_parquet(source: Source | Sequence[Source], **options: bool | str) -> str:
    """`read_parquet(<source>, <option> = <value>, ...)`: a file, a glob or a list of files.

    Booleans become `true`/`false`; a string option is SQL as written (e.g. a STRUCT).
    Hive partitioning is off unless asked for: DuckDB would otherwise read a `name=value`
    directory anywhere in the path (a storage root like `/runs/workers=2`) as a column."""
    options = {"hive_partitioning": False, **options}
    if isinstance(source, str | Path):
        target = sql_literal(source)
    else:
        target = "[" + ", ".join(sql_literal(s) for s in source) + "]"
    args = [target] + [
        f"{name} = {str(value).lower() if isinstance(value, bool) else value}"
        for name, value in options.items()
    ]
    return f"read_parquet({', '.join(args)})"


def indexed_catalog_sql(items: Source, item_map: Source, keep_unindexed: bool = False) -> str:
    """`SELECT m.item_idx, c.*`: the catalog rows with their model index (the item map's).

    Items the sequences dropped (no index) are left out, or kept with a NULL `item_idx` when
    `keep_unindexed` (the DuckDB `items` view). Lives here, below `data`, because the
    warehouse's views use it too."""
    join = "LEFT JOIN" if keep_unindexed else "JOIN"
    return (
        f"SELECT m.item_idx, c.* FROM {read_parquet(items)} c "
        f"{join} {read_parquet(item_map)} m USING (item_id)"
    )
