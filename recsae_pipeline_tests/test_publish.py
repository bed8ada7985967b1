"""Write-audit-publish: an asset is written into a staging tree and published whole only when
its blocking checks pass; a refused materialization leaves the previous artifact and its
version record byte-identical and is kept under `rejected/` with the check results."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsae_pipeline.defs.versioning import (
    FORCE_TAG,
    SKIPPED_TAG,
    content_hash,
    matches_disk,
    read_version,
)
from recsae_pipeline.storage.atomic import publish_tree, replace_path
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline_tests.support import (
    FEATURES_CONFIG,
    KEY,
    TinyStore,
    materialize,
    materialized,
    ops_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_staged_paths_redirect_the_outputs_and_plots_only(tmp_path: Path) -> None:
    paths = ArtifactPaths(tmp_path)
    tree = tmp_path / ".staging" / "sequences" / "_"
    staged = paths.staged([paths.sequences_dir], tree)
    assert staged.sequences == tree / "sequences" / "sequences.parquet"
    assert staged.report("sequence_lengths") == tree / "reports" / "sequence_lengths.png"
    assert staged.raw_interactions == paths.raw_interactions  # inputs stay put
    assert staged.version_record("sequences", None) == paths.version_record("sequences", None)
    part = ArtifactPaths(tmp_path).staged([paths.partition_dir("sae", "sasrec", 2)], tree)
    assert part.partition("sasrec", 2).sae_metrics == tree / "sae/model=sasrec/layer=2/metrics.json"
    assert part.partition("sasrec", 2).activations == paths.partition("sasrec", 2).activations


def test_publish_swaps_directories_whole_and_drops_what_the_stage_lacks(tmp_path: Path) -> None:
    root, tree = tmp_path / "root", tmp_path / "root" / ".staging" / "a" / "_"
    (root / "sae").mkdir(parents=True)
    (root / "sae" / "weights").write_text("old")
    (root / "sae" / "stale").write_text("old")
    (root / "gone.parquet").write_text("old")
    (tree / "sae").mkdir(parents=True)
    (tree / "sae" / "weights").write_text("new")
    (tree / "reports").mkdir()
    (tree / "reports" / "plot.png").write_text("new")
    publish_tree(tree, root, [root / "sae", root / "gone.parquet"])
    assert _tree(root / "sae") == {"weights": b"new"}  # no stale file beside the new ones
    assert not (root / "gone.parquet").exists()
    assert (root / "reports" / "plot.png").read_text() == "new"
    with pytest.raises(FileNotFoundError):
        replace_path(tmp_path / "missing", root / "sae")


def test_timestamps_outside_the_plausible_range_never_replace_the_good_raw_table(
    tiny_store: TinyStore, tmp_path: Path
) -> None:
    root = tiny_store.copy_to(tmp_path / "store")
    raw_before = _tree(root / "raw")
    record = root / ".versions" / "raw_interactions" / "_.json"
    record_before = record.read_bytes()
    log = tmp_path / "future.csv"
    log.write_text("user_id,item_id,timestamp\nu1,a,4000000000\nu1,b,4000000001\n")
    source = {"source": "tabular", "tabular": {"path": str(log), "rating_column": None}}
    result = materialize(
        root,
        ["raw_interactions", "item_catalog"],
        {"ops": {"raw_interactions": {"config": source}}},
    )
    assert not result.success and materialized(result) == set()
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.message
    assert "raw_interactions: blocking check `raw_interactions_expectations`" in message
    assert "expect_column_values_to_be_between(column=timestamp" in message
    assert f"Nothing was published: {root / 'raw'}" in message and "rematerialize" in message
    assert _tree(root / "raw") == raw_before and record.read_bytes() == record_before
    (kept,) = (root / "rejected" / "raw_interactions" / "_").iterdir()
    assert str(kept) in message
    assert pq.read_table(kept / "raw" / "interactions.parquet").num_rows == 2
    checks = json.loads((kept / "checks.json").read_text())["checks"]
    assert [(c["check_name"], c["passed"]) for c in checks] == [
        ("raw_interactions_expectations", False)
    ]
    assert not any((root / ".staging").rglob("*.parquet"))

    # A later run that would rebuild a downstream asset refuses, naming the refusal (one that
    # changes nothing reuses the artifacts built from the previous, still published, table).
    later = materialize(root, ["item_catalog"], tags={FORCE_TAG: "true"})
    assert not later.success
    (failure,) = [e for e in later.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "upstream raw_interactions failed its blocking check" in (
        failure.event_specific_data.error.message
    )

    # A good materialization publishes and clears the refusal.
    good = tmp_path / "good.parquet"
    users = [f"u{u}" for u in range(4) for _ in range(4)]
    items = [f"i{i}" for _ in range(4) for i in range(4)]
    times = [1_700_000_000 + t for t in range(16)]
    pq.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": times}), good)
    source = {"source": "tabular", "tabular": {"path": str(good), "rating_column": None}}
    ok = materialize(root, ["raw_interactions"], {"ops": {"raw_interactions": {"config": source}}})
    assert ok.success and not (root / "rejected" / "raw_interactions" / "_").exists()
    assert matches_disk(root, read_version(root, "raw_interactions", None) or {})


def test_a_record_that_does_not_match_the_disk_means_recompute(
    tiny_store: TinyStore, tmp_path: Path
) -> None:
    # New weights beside the previous record (a publish cut short): never trusted.
    root = tiny_store.copy_to(tmp_path / "store")
    part = ArtifactPaths(root).partition("sasrec", 2)
    record = read_version(root, "sae", KEY)
    assert record is not None and matches_disk(root, record)
    metrics = json.loads(part.sae_metrics.read_text())
    part.sae_metrics.write_text(json.dumps({**metrics, "seconds": -1.0}))
    assert not matches_disk(root, record)
    result = materialize(root, ["sae"], ops_config(FEATURES_CONFIG, "sae"), partition_key=KEY)
    assert result.success
    (event,) = result.get_asset_materialization_events()
    assert SKIPPED_TAG not in (event.materialization.tags or {})
    after = read_version(root, "sae", KEY)
    assert after is not None and after["data_version"] == content_hash(root, [part.sae])
    assert event.materialization.tags["dagster/data_version"] == after["data_version"]
