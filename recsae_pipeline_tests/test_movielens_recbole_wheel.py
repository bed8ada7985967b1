"""The real MovieLens-100k, as shipped in RecBole's atomic format inside the `recbole` wheel.

The wheel is fetched with `pip download recbole==1.2.1 --no-deps` (it is never installed)
and cached under $RECSAE_TEST_CACHE (default ~/.cache/recsae-tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import duckdb
import pytest

from recsae_pipeline.data.catalog import build_catalog
from recsae_pipeline.data.sources import RecBoleSource, ingest
from recsae_pipeline.data.validation import (
    QualityBounds,
    validate_catalog,
    validate_raw_interactions,
)
from recsae_pipeline.store import ArtifactPaths

WHEEL_MEMBER = "recbole/dataset_example/ml-100k/"


@pytest.fixture(scope="session")
def ml100k_atomic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = Path(os.environ.get("RECSAE_TEST_CACHE", Path.home() / ".cache" / "recsae-tests"))
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("recbole-1.2.1-*.whl"))
    if not wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "recbole==1.2.1",
                "--no-deps",
                "-q",
                "-d",
                str(cache),
            ],
            check=True,
        )
        wheels = sorted(cache.glob("recbole-1.2.1-*.whl"))
    out = tmp_path_factory.mktemp("atomic") / "ml-100k"
    out.mkdir()
    with zipfile.ZipFile(wheels[0]) as zf:
        for name in ("ml-100k.inter", "ml-100k.item"):
            (out / name).write_bytes(zf.read(WHEEL_MEMBER + name))
    return out


def test_movielens_100k_from_the_recbole_wheel(ml100k_atomic: Path, tmp_path: Path) -> None:
    paths = ArtifactPaths(tmp_path)
    report = ingest(RecBoleSource(ml100k_atomic), paths)
    users, items, rows = duckdb.execute(
        f"SELECT count(DISTINCT user_id), count(DISTINCT item_id), count(*) FROM read_parquet('{paths.raw_interactions}')"
    ).fetchone()
    assert (users, items, rows) == (943, 1682, 100_000)
    assert report.rows == 100_000
    summary = build_catalog(paths)
    assert summary["items"] == 1682
    toy_story = duckdb.execute(
        f"SELECT title, year, genres FROM read_parquet('{paths.items}') WHERE item_id = '1'"
    ).fetchone()
    assert toy_story == ("Toy Story", 1995, ["Animation", "Children's", "Comedy"])
    assert validate_raw_interactions(paths, QualityBounds()).success
    assert validate_catalog(paths).success
