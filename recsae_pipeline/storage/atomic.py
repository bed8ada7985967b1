"""Atomic writes: a crash never leaves a half-written artifact behind.

Every writer here writes to a temporary sibling first and renames it into place, so a
reader (or a later run) only ever sees the previous complete artifact or the new one. Every
Parquet file of the store is written here (`write_parquet`, `parquet_writer`,
`copy_to_parquet`), so the codec is set in one place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from recsae_pipeline.storage.sql import sql_literal

PARQUET_COMPRESSION = "zstd"


def _temp_sibling(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # not Linux, or a libc without it
    _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the
    system or filesystem cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_path(new: Path, path: Path) -> None:
    """Move the complete file or directory `new` over `path` (same filesystem). A directory is
    exchanged with the old one in one step where Linux can, so a reader or a crash sees the
    old directory or the new one, never neither; elsewhere the old one is moved aside first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (new.is_dir() and path.is_dir()):
        os.replace(new, path)
        return
    if _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # now the previous directory
        return
    old = _temp_sibling(path, ".old")
    path.rename(old)
    try:
        new.rename(path)
    except BaseException:
        old.rename(path)  # put the previous complete artifact back
        raise
    shutil.rmtree(old, ignore_errors=True)


def publish_tree(tree: Path, root: Path, whole: list[Path]) -> None:
    """Publish a staged `tree` (laid out like `root`): each of `whole` (artifacts under
    `root`) replaced in one step, or removed when the tree has none of it; any other staged
    file (plots) replaced on its own."""
    for path in whole:
        staged = tree / path.relative_to(root)
        if staged.exists():
            replace_path(staged, path)
        elif path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for dirpath, _, filenames in os.walk(tree):
        for name in sorted(filenames):
            staged = Path(dirpath) / name
            replace_path(staged, root / staged.relative_to(tree))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success move it over `path` (`replace_path`), on
    error delete it. Works for files and directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        replace_path(tmp, path)
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


def parquet_writer(
    path: str | Path, schema: pa.Schema, plain: Sequence[str] = ()
) -> pq.ParquetWriter:
    """A streaming writer (zstd) for a file inside an `atomic_path` or a scratch directory.

    `plain`: leaf columns (e.g. "activation.list.element") written PLAIN, uncompressed,
    without dictionary or min/max statistics, for near-random floats where the codec, the
    dictionary attempt and the statistics scan cost time and save nothing; the other
    columns keep zstd, dictionaries and statistics. Readers need nothing new: each column
    chunk names its own codec."""
    if not plain:
        return pq.ParquetWriter(path, schema, compression=PARQUET_COMPRESSION)
    leaves = [schema.field(i).name for i in range(len(schema))]
    coded = [name for name in leaves if not any(p.split(".")[0] == name for p in plain)]
    return pq.ParquetWriter(
        path,
        schema,
        compression={name: PARQUET_COMPRESSION for name in coded} | dict.fromkeys(plain, "none"),
        use_dictionary=coded,
        write_statistics=coded,
    )


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
