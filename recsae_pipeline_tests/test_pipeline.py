"""The asset graph end to end through Dagster: the tiny store holds every asset, every check
ran, and the DuckDB catalog answers from a read-only connection."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from recsae_pipeline import cli
from recsae_pipeline.defs.definitions import defs
from recsae_pipeline_tests.support import TinyStore, check_evaluations, materialized, metadata


def test_whole_graph_materializes_with_every_check_run_and_every_blocking_check_passing(
    tiny_store: TinyStore, capsys: pytest.CaptureFixture
) -> None:
    graph = defs.resolve_asset_graph()
    runs = tiny_store.runs
    assert all(run.success for run in runs)
    assert set().union(*map(materialized, runs)) == {
        k.to_user_string() for k in graph.get_all_asset_keys()
    }
    evaluations = {k: e for run in runs for k, e in check_evaluations(run).items()}
    specs = {
        (s.asset_key.to_user_string(), s.name): s for a in graph.assets_defs for s in a.check_specs
    }
    assert set(evaluations) == set(specs)
    blocking = [k for k, s in specs.items() if s.blocking]
    assert len(blocking) >= 9 and all(evaluations[k].passed for k in blocking), [
        evaluations[k].description for k in blocking if not evaluations[k].passed
    ]
    meta = metadata(tiny_store.main, "sequences")
    assert meta["users"] > 0 and 0 < meta["density"] < 1
    assert "data:image/png;base64," in meta["length_histogram"]
    root = tiny_store.root
    assert (root / "reports" / "sequence_lengths.png").stat().st_size > 1000
    sql = ["--data-dir", str(root), "sql"]
    assert cli.main([*sql, "SELECT count(*) AS n FROM interactions"]) == 0
    rows = int(capsys.readouterr().out.splitlines()[2].strip())
    assert rows == pq.ParquetFile(root / "raw" / "interactions.parquet").metadata.num_rows
    assert cli.main([*sql, "SELECT count(*) FROM ground_truth JOIN items USING (item_id)"]) == 0
    assert cli.main([*sql, "DELETE FROM items"]) == 2
    assert "read-only" in capsys.readouterr().err


def test_definitions_load_every_asset_check_and_the_main_job() -> None:
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"raw_interactions", "item_catalog", "sequences"} <= keys
    assert len(list(repo.asset_graph.asset_check_keys)) >= 3
    assert defs.resolve_job_def("main").name == "main"
