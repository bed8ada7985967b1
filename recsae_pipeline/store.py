"""Artifact paths and atomic writes: a crash never leaves a half-written artifact behind.

Every writer here writes to a temporary sibling first and renames it into place, so a
reader (or a later run) only ever sees the previous complete artifact or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PARQUET_COMPRESSION = "zstd"
DEFAULT_DATA_DIR = "data"
DATA_DIR_ENV = "RECSAE_DATA_DIR"


def default_data_dir() -> str:
    """The storage root: `$RECSAE_DATA_DIR`, else `data/` under the working directory."""
    return os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR)


@dataclass(frozen=True)
class ArtifactPaths:
    """Where each artifact lives under the storage root (see DESIGN.md, data contracts)."""

    root: Path

    @property
    def raw_dir(self) -> Path:
        return self.root / "raw"

    @property
    def raw_interactions(self) -> Path:
        return self.raw_dir / "interactions.parquet"

    @property
    def raw_items(self) -> Path:
        """The catalog as the source delivered it; `item_catalog` normalises it."""
        return self.raw_dir / "items.parquet"

    @property
    def ground_truth(self) -> Path:
        """Planted mechanism per interaction (synthetic source only)."""
        return self.raw_dir / "ground_truth.parquet"

    @property
    def items(self) -> Path:
        return self.root / "catalog" / "items.parquet"

    @property
    def sequences_dir(self) -> Path:
        return self.root / "sequences"

    @property
    def sequences(self) -> Path:
        return self.sequences_dir / "sequences.parquet"

    @property
    def item_map(self) -> Path:
        return self.sequences_dir / "item_map.parquet"

    @property
    def user_map(self) -> Path:
        return self.sequences_dir / "user_map.parquet"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def duckdb(self) -> Path:
        return self.root / "recsae.duckdb"

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    @property
    def recommender_eval(self) -> Path:
        return self.root / "models" / "recommender_eval.parquet"

    @property
    def layer_probe(self) -> Path:
        return self.root / "models" / "layer_probe.parquet"

    def partition_dir(self, artifact: str, model: str, layer: int) -> Path:
        """`<root>/<artifact>/model=<m>/layer=<l>`: the hive layout of every per-(model,
        layer) artifact (activations, sae, feature_activations, feature_stats, steering)."""
        if not model or any(c in model for c in "/\\="):
            raise ValueError(f"model={model!r}; use a plain name such as 'sasrec' or 'student'")
        return self.root / artifact / f"model={model}" / f"layer={layer}"


def sql_literal(value: str | Path) -> str:
    """A DuckDB string literal for a path or text (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def parse_partition_key(key: str) -> tuple[str, int]:
    """`<model>.layer<l>` (the per-(model, layer) partition keys) -> (model, l)."""
    model, _, layer = key.partition(".layer")
    if not model or not layer.isdigit():
        raise ValueError(f"partition {key!r}: use `<model>.layer<l>`, e.g. sasrec.layer2")
    return model, int(layer)


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


def write_parquet(table: pa.Table, path: str | Path, row_group_size: int = 131_072) -> Path:
    """Write a whole table atomically (zstd)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=PARQUET_COMPRESSION, row_group_size=row_group_size)
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
