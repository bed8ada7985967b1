"""The asset graph end to end on a small synthetic log, through Dagster itself."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsae_pipeline import cli
from recsae_pipeline.defs.assets import data
from recsae_pipeline.defs.definitions import defs
from recsae_pipeline.defs.resources import DataQuality, StorageRoot

SMALL = {
    "ops": {
        "raw_interactions": {
            "config": {
                "source": "synthetic",
                "synthetic": {
                    "n_users": 150,
                    "n_items": 300,
                    "mean_sequence_length": 15,
                    "n_franchises": 8,
                },
            }
        }
    }
}
ASSETS = [data.raw_interactions, data.item_catalog, data.sequences]
CHECKS = [
    data.raw_interactions_expectations,
    data.item_catalog_expectations,
    data.sequences_expectations,
]


def run(root: Path, run_config: dict = SMALL) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [*ASSETS, *CHECKS],
        resources={"storage": StorageRoot(path=str(root)), "quality": DataQuality()},
        run_config=run_config,
        raise_on_error=False,
    )


def test_whole_graph_materializes_with_every_check_passing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    result = run(tmp_path)
    assert result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"raw_interactions", "item_catalog", "sequences"}
    evaluations = result.get_asset_check_evaluations()
    expected = {
        (c.asset_key.to_user_string(), c.name) for checks in CHECKS for c in checks.check_specs
    }
    assert {(e.asset_key.to_user_string(), e.check_name) for e in evaluations} == expected
    assert all(e.passed for e in evaluations), [e.description for e in evaluations if not e.passed]
    meta = next(
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == "sequences"
    )
    md = meta.event_specific_data.materialization.metadata
    assert md["users"].value > 0 and 0 < md["density"].value < 1
    assert "data:image/png;base64," in md["length_histogram"].value
    assert (tmp_path / "reports" / "sequence_lengths.png").stat().st_size > 1000
    # The DuckDB catalog answers from a read-only connection.
    assert (
        cli.main(["--data-dir", str(tmp_path), "sql", "SELECT count(*) AS n FROM interactions"])
        == 0
    )
    rows = int(capsys.readouterr().out.splitlines()[2].strip())
    assert rows == pq.ParquetFile(tmp_path / "raw" / "interactions.parquet").metadata.num_rows
    assert (
        cli.main(
            [
                "--data-dir",
                str(tmp_path),
                "sql",
                "SELECT count(*) FROM ground_truth JOIN items USING (item_id)",
            ]
        )
        == 0
    )
    assert cli.main(["--data-dir", str(tmp_path), "sql", "DELETE FROM items"]) == 2
    assert "read-only" in capsys.readouterr().err


def test_failing_blocking_check_stops_downstream_and_keeps_old_artifacts(tmp_path: Path) -> None:
    assert run(tmp_path).success
    sequences_before = (tmp_path / "sequences" / "sequences.parquet").read_bytes()
    # A log with a duplicated row: the raw GX suite fails, nothing downstream runs.
    logs = tmp_path / "dup.parquet"
    row = {
        "user_id": ["u1", "u1"],
        "item_id": ["a", "a"],
        "timestamp": [1_700_000_000] * 2,
        "rating": [4.0, 4.0],
    }
    pq.write_table(pa.table(row), logs)
    config = {
        "ops": {
            "raw_interactions": {"config": {"source": "tabular", "tabular": {"path": str(logs)}}}
        }
    }
    result = run(tmp_path, config)
    assert not result.success
    evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evaluations == {"raw_interactions_expectations": False}
    ran = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert ran == {"raw_interactions"}
    assert (tmp_path / "sequences" / "sequences.parquet").read_bytes() == sequences_before


def test_definitions_load_every_asset_check_and_the_main_job() -> None:
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"raw_interactions", "item_catalog", "sequences"} <= keys
    assert len(list(repo.asset_graph.asset_check_keys)) >= 3
    assert defs.resolve_job_def("main").name == "main"
