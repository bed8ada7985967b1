"""Data versions are content hashes, and unchanged inputs, config and code skip the work."""

from __future__ import annotations

import copy
from pathlib import Path

import dagster as dg

from recsae_pipeline.defs.assets import data
from recsae_pipeline.defs.resources import DataQuality, StorageRoot
from recsae_pipeline.defs.versioning import FORCE_TAG, SKIPPED_TAG, content_hash, read_version
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline_tests.support import DATA_CONFIG

ASSETS = [data.raw_interactions, data.item_catalog, data.sequences]
CHECKS: list[dg.AssetChecksDefinition] = []  # the GX suites are check specs of the assets


def run(
    root: Path,
    run_config: dict = DATA_CONFIG,
    tags: dict | None = None,
    selection: list | None = None,
) -> dg.ExecuteInProcessResult:
    result = dg.materialize(
        [*ASSETS, *CHECKS],
        resources={"storage": StorageRoot(path=str(root)), "quality": DataQuality()},
        run_config=run_config,
        tags=tags,
        selection=selection,
    )
    assert result.success
    return result


def materializations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetMaterialization]:
    return {
        e.asset_key.to_user_string(): e.materialization
        for e in result.get_asset_materialization_events()
    }


def skipped(result: dg.ExecuteInProcessResult) -> set[str]:
    return {k for k, m in materializations(result).items() if m.tags.get(SKIPPED_TAG) == "true"}


def versions(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    return {k: m.tags["dagster/data_version"] for k, m in materializations(result).items()}


def test_data_version_is_the_content_hash_of_the_artifacts(tmp_path: Path) -> None:
    result = run(tmp_path)
    paths = ArtifactPaths(tmp_path.resolve())
    got = versions(result)
    assert got["sequences"] == content_hash(paths.root, [paths.sequences_dir])
    assert got["item_catalog"] == content_hash(paths.root, [paths.items])
    record = read_version(paths.root, "sequences", None)
    assert record is not None and record["data_version"] == got["sequences"]
    assert record["provenance"] is not None  # every ancestor had a recorded version


def test_unchanged_inputs_skip_and_replay_metadata_and_checks(tmp_path: Path) -> None:
    first = run(tmp_path)
    mtime = (tmp_path / "sequences" / "sequences.parquet").stat().st_mtime_ns
    second = run(tmp_path)
    # The root always runs (its real input is outside the graph); it rewrote the same bytes,
    # so its data version is unchanged and everything below it is skipped.
    assert skipped(second) == {"item_catalog", "sequences"}
    assert versions(second) == versions(first)
    assert (tmp_path / "sequences" / "sequences.parquet").stat().st_mtime_ns == mtime
    replayed = materializations(second)["sequences"].metadata
    assert "skipped" in replayed
    assert set(materializations(first)["sequences"].metadata) <= set(replayed)
    checks = second.get_asset_check_evaluations()
    assert {e.check_name for e in checks} == {s.name for a in ASSETS for s in a.check_specs}
    assert all(e.passed for e in checks)


def test_changed_config_force_tag_or_touched_artifact_recompute(tmp_path: Path) -> None:
    run(tmp_path)
    config = copy.deepcopy(DATA_CONFIG)
    config["ops"]["sequences"] = {"config": {"user_core": 4}}
    assert "sequences" not in skipped(run(tmp_path, config))
    assert skipped(run(tmp_path, config)) == {"item_catalog", "sequences"}
    assert skipped(run(tmp_path, config, tags={FORCE_TAG: "true"})) == set()
    # A changed artifact (here, deleted) is rebuilt, not trusted.
    (tmp_path / "sequences" / "user_map.parquet").unlink()
    assert "sequences" not in skipped(run(tmp_path, config))
    assert (tmp_path / "sequences" / "user_map.parquet").exists()


def test_new_upstream_content_propagates(tmp_path: Path) -> None:
    first = run(tmp_path)
    config = copy.deepcopy(DATA_CONFIG)
    config["ops"]["raw_interactions"]["config"]["synthetic"]["seed"] = 7
    second = run(tmp_path, config)
    assert skipped(second) == set()
    assert versions(second)["sequences"] != versions(first)["sequences"]


def test_a_missing_ancestor_version_means_no_skip(tmp_path: Path) -> None:
    run(tmp_path)
    (tmp_path / ".versions" / "raw_interactions" / "_.json").unlink()
    result = run(tmp_path, {}, selection=[data.item_catalog.key, data.sequences.key])
    assert skipped(result) == set()
