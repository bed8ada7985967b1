"""A storage root at an fsspec URL, worked on through a local cache (`recsae_pipeline.storage.remote`)."""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path

import dagster as dg
import duckdb
import fsspec
import pyarrow.parquet as pq
import pytest

from recsae_pipeline import cli
from recsae_pipeline.defs.assets import data
from recsae_pipeline.defs.resources import DataQuality, StorageRoot
from recsae_pipeline.storage.atomic import atomic_path, write_bytes
from recsae_pipeline.storage.remote import MANIFEST, Mirror, default_cache_dir
from recsae_pipeline_tests.support import DATA_CONFIG

ASSETS = [data.raw_interactions, data.item_catalog, data.sequences]
CHECKS: list[dg.AssetChecksDefinition] = []  # the GX suites are check specs of the assets


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def materialize(
    storage: StorageRoot, selection: list[dg.AssetsDefinition]
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [*ASSETS, *CHECKS],
        selection=dg.AssetSelection.assets(*selection),
        resources={"storage": storage, "quality": DataQuality()},
        run_config=DATA_CONFIG if data.raw_interactions in selection else {},
    )


def test_artifacts_reach_the_remote_root_and_a_fresh_cache_pulls_the_inputs(
    tmp_path: Path,
) -> None:
    remote = tmp_path / "remote"
    url = remote.as_uri()  # file://, mirrored on request like any remote filesystem
    first = StorageRoot(path=url, mirror=True, cache_dir=str(tmp_path / "cache_a"))
    assert first.paths.root == tmp_path / "cache_a"
    result = materialize(first, [data.raw_interactions, data.item_catalog])
    assert result.success

    pushed = tree(remote)
    assert {"raw/interactions.parquet", "raw/ground_truth.parquet", "catalog/items.parquet"} <= set(
        pushed
    )
    assert ".versions/raw_interactions/_.json" in pushed  # provenance travels with the data
    # Only complete artifacts: no temp files, scratch directories, DuckDB catalog or manifest.
    assert not [p for p in pushed if ".tmp" in p or ".scratch-" in p or ".recsae-" in p]
    assert "recsae.duckdb" not in pushed and "recsae.duckdb.wal" not in pushed
    cached = tree(tmp_path / "cache_a")
    assert all(cached[p] == body for p, body in pushed.items())
    assert not first.pull().changed  # what was just pushed is not fetched back

    # Another machine (an empty cache) materializes only the downstream asset.
    second = StorageRoot(path=url, mirror=True, cache_dir=str(tmp_path / "cache_b"))
    result = materialize(second, [data.sequences])
    assert result.success
    ran = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert ran == {"sequences"}
    assert all(e.passed for e in result.get_asset_check_evaluations())
    cache_b = tmp_path / "cache_b"
    assert (cache_b / "raw" / "interactions.parquet").read_bytes() == pushed[
        "raw/interactions.parquet"
    ]
    assert (remote / "sequences" / "sequences.parquet").read_bytes() == (
        cache_b / "sequences" / "sequences.parquet"
    ).read_bytes()
    # The cache's DuckDB catalog names the cache's own files.
    con = duckdb.connect(str(cache_b / "recsae.duckdb"), read_only=True)
    rows = con.execute("SELECT count(*) FROM interactions").fetchall()[0][0]
    con.close()
    assert rows == pq.ParquetFile(remote / "raw" / "interactions.parquet").metadata.num_rows


def test_a_replaced_directory_artifact_leaves_no_stale_remote_files(tmp_path: Path) -> None:
    url = f"memory://recsae-test-{uuid.uuid4().hex[:8]}/store"
    fs = fsspec.filesystem("memory")
    a, b = Mirror(url, tmp_path / "a"), Mirror(url, tmp_path / "b")
    model = a.cache / "models" / "sasrec"
    with atomic_path(model) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text('{"layers": 2}')
        (tmp / "model.safetensors").write_bytes(b"old weights")
        (tmp / "curve.json").write_text("[1, 2]")
    write_bytes(b"catalog", a.cache / "catalog" / "items.parquet")
    (a.cache / ".scratch-abc").mkdir()
    (a.cache / ".scratch-abc" / "part.parquet").write_bytes(b"half")
    (a.cache / "catalog" / ".items.parquet.1234abcd.tmp").write_bytes(b"half")
    assert a.push().files == 4
    assert a.push().files == 0  # nothing changed since
    assert b.pull().files == 4
    assert (b.cache / "models" / "sasrec" / "curve.json").exists()

    # Re-materialize the model with fewer files; delete a plain file (not propagated).
    with atomic_path(model) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text('{"layers": 4}')
        (tmp / "model.safetensors").write_bytes(b"new weights")
    (a.cache / "catalog" / "items.parquet").unlink()
    report = a.push()
    assert (report.files, report.removed) == (2, 1)
    root = fs._strip_protocol(url)
    remote = {p[len(root) + 1 :] for p in fs.find(root)}
    assert remote == {
        "models/sasrec/config.json",
        "models/sasrec/model.safetensors",
        "catalog/items.parquet",
    }
    assert fs.cat(f"{root}/models/sasrec/model.safetensors") == b"new weights"

    # The other cache follows: the new files arrive, the dropped one goes.
    report = b.pull()
    assert (report.files, report.removed) == (2, 1)
    assert sorted(p.name for p in (b.cache / "models" / "sasrec").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert json.loads((b.cache / MANIFEST).read_text())["url"] == url
    fs.rm(root, recursive=True)


def test_a_remote_root_gets_a_cache_per_url_and_refuses_another_urls_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSAE_CACHE_DIR", str(tmp_path / "caches"))
    one, two = "memory://one/store", "memory://two/store"
    assert StorageRoot(path=one).paths.root.parent == tmp_path / "caches"
    assert default_cache_dir(one) != default_cache_dir(two)
    Mirror(one, tmp_path / "shared").pull()
    with pytest.raises(ValueError, match="cache_dir"):
        Mirror(two, tmp_path / "shared").pull()


def test_a_local_root_is_used_in_place(tmp_path: Path) -> None:
    for path in (str(tmp_path), tmp_path.as_uri()):
        storage = StorageRoot(path=path, cache_dir=str(tmp_path / "unused"))
        assert storage.paths.root == tmp_path
        assert storage.pull() is None and storage.push() is None
    assert not (tmp_path / "unused").exists()


def test_an_unknown_protocol_names_the_setting_and_the_fix(tmp_path: Path) -> None:
    storage = StorageRoot(path="nope://bucket/store", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(dg.DagsterResourceFunctionError) as raised:
        materialize(storage, [data.item_catalog])
    message = str(raised.value.__cause__)
    assert "storage.path='nope://bucket/store'" in message
    assert "s3fs" in message and "Protocol not known" in message
    with pytest.raises(SystemExit, match="storage.path='nope://bucket/store'"):
        cli.main(["--data-dir", "nope://bucket/store", "sql", "SELECT 1"])


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_a_known_protocol_without_its_package_says_what_to_install() -> None:
    with pytest.raises(ValueError, match="pip install s3fs"):
        Mirror("s3://bucket/store", "/nonexistent-cache")
