"""Atomic writes: a crash never leaves a half-written artifact behind.

Every writer here writes to a temporary sibling first and renames it into place, so a
reader (or a later run) only ever sees the previous complete artifact or the new one. Every
Parquet file of the store is written here (`write_parquet`, `parquet_writer`,
`copy_to_parquet`), so the codec is set in one place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from recsae_pipeline.storage.sql import sql_literal

PARQUET_COMPRESSION = "zstd"


def _temp_sibling(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, on error delete it.

    Works for files and directories; an existing directory is replaced only once the new one
    is complete (the old one is moved aside first, then removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            old = _temp_sibling(path, ".old")
            path.rename(old)
            try:
                tmp.rename(path)
            except BaseException:
                old.rename(path)  # put the previous complete artifact back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_parquet(table: pa.Table, path: str | Path, row_group_size: int | None = 131_072) -> Path:
    """Write a whole table atomically (zstd); `row_group_size=None` is pyarrow's default."""
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=PARQUET_COMPRESSION, row_group_size=row_group_size)
    return path


def parquet_writer(path: str | Path, schema: pa.Schema) -> pq.ParquetWriter:
    """A streaming writer (zstd) for a file inside an `atomic_path` or a scratch directory."""
    return pq.ParquetWriter(path, schema, compression=PARQUET_COMPRESSION)


def copy_to_parquet(
    con: duckdb.DuckDBPyConnection,
    select_sql: str,
    path: str | Path,
    row_group_size: int | None = None,
) -> Path:
    """`COPY (select_sql) TO path` as Parquet (zstd), atomically; `row_group_size=None` is
    DuckDB's default."""
    path = Path(path)
    options = f"FORMAT parquet, COMPRESSION {PARQUET_COMPRESSION}"
    if row_group_size is not None:
        options += f", ROW_GROUP_SIZE {int(row_group_size)}"
    with atomic_path(path) as tmp:
        con.execute(f"COPY ({select_sql}) TO {sql_literal(tmp)} ({options})")
    return path


def write_json(obj: Any, path: str | Path) -> Path:
    """Write JSON atomically, pretty-printed so a person can read it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return path


def write_bytes(data: bytes, path: str | Path) -> Path:
    """Write bytes atomically (plots, HTML)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def scratch_dir(root: Path) -> tempfile.TemporaryDirectory[str]:
    """A temporary directory on the same filesystem as the storage root."""
    root.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=root, prefix=".scratch-")
