"""DuckDB SQL literals: the one quoting helper."""

from __future__ import annotations

from pathlib import Path


def sql_literal(value: str | Path) -> str:
    """A DuckDB string literal for a path or text (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"
