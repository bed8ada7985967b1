"""Automation: the drop-folder sensor, the weekly retrain schedule, the run-failure alert."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsae_pipeline.data.dropfolder import DropFolder
from recsae_pipeline.data.sources import TabularSource, ingest
from recsae_pipeline.defs.jobs import ingest_job, jobs, retrain_job
from recsae_pipeline.defs.resources import DataQuality, StorageRoot
from recsae_pipeline.defs.schedules import schedules, weekly_retrain
from recsae_pipeline.defs.sensors import build_new_interactions_sensor, run_failure_alert, sensors
from recsae_pipeline.storage.registry import ArtifactPaths

T0 = 1_700_000_000
USERS = [f"u{u}" for u in range(1, 7)]
ITEMS = [f"i{i}" for i in range(1, 7)]


def csv(path: Path, header: str, rows: list[tuple]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *(",".join(map(str, r)) for r in rows)]) + "\n")
    return path


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A storage root holding a 6-user x 6-item raw log (every user saw every item) and a
    catalog with multi-genre items and an extra attribute."""
    root = tmp_path / "store"
    monkeypatch.setenv("RECSAE_DATA_DIR", str(root))  # what StorageRoot() resolves in a run
    rows = [(u, i, T0 + 60 * k + j, 4) for k, u in enumerate(USERS) for j, i in enumerate(ITEMS)]
    base = csv(tmp_path / "base.csv", "user_id,item_id,timestamp,rating", rows)
    paths = ArtifactPaths(root)
    ingest(TabularSource(base), paths)
    items = pa.table(
        {
            "item_id": ITEMS,
            "title": [f"Movie {i}" for i in ITEMS],
            "year": pa.array([1999] * 6, pa.int16()),
            "genres": [["Drama", "Comedy"], ["Horror"], [], ["Drama"], ["Sci-Fi"], ["War"]],
            "franchise": ["a", "a", "b", "b", "c", "c"],
        }
    )
    pq.write_table(items, paths.raw_items)
    return root


@pytest.fixture(scope="module")
def instance() -> dg.DagsterInstance:
    return dg.DagsterInstance.ephemeral()  # ~1 s to build: one for the module


def evaluate(
    root: Path, instance: dg.DagsterInstance, cursor: str | None = None, settle_seconds: float = 0
) -> dg.SensorExecutionData:
    sensor = build_new_interactions_sensor(settle_seconds=settle_seconds)
    with dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"storage": StorageRoot(path=str(root)), "quality": DataQuality()},
    ) as context:
        return sensor.evaluate_tick(context)


def new_user_rows(user: str = "u7") -> list[tuple]:
    return [(user, i, T0 + 10_000 + j, 5) for j, i in enumerate(ITEMS)]


def test_valid_drop_yields_one_run_and_is_never_taken_twice(
    root: Path, instance: dg.DagsterInstance
) -> None:
    folder = DropFolder(root)
    raw = ArtifactPaths(root).raw_interactions
    raw_before = raw.read_bytes()
    # Six new rows, plus one already in the log (u1 saw i1 at T0): that one must not double.
    drop = csv(
        folder.incoming / "week1.csv",
        "user_id,item_id,timestamp,rating",
        [*new_user_rows(), ("u1", "i1", T0, 4)],
    )
    sha = hashlib.sha256(drop.read_bytes()).hexdigest()

    first = evaluate(root, instance)

    assert len(first.run_requests) == 1
    request = first.run_requests[0]
    config = request.run_config["ops"]["raw_interactions"]["config"]
    assert config["source"] == "tabular"
    assert Path(config["tabular"]["path"]) == folder.merged_interactions
    assert Path(config["tabular"]["items_path"]) == folder.merged_items
    assert request.tags["recsae/new_rows"] == "6"
    assert "week1.csv" in request.tags["recsae/drops"]
    assert request.run_key.startswith("incoming-")
    # The drop moved out of incoming/, its rows sit in appended/, the raw log is untouched
    # until the run re-ingests it.
    assert not drop.exists()
    assert [p.name.endswith("-week1.csv") for p in folder.accepted.iterdir()] == [True]
    assert len(folder.appended_drops()) == 1
    assert raw.read_bytes() == raw_before
    assert pq.read_metadata(folder.merged_interactions).num_rows == 36 + 6
    (entry,) = json.loads(first.cursor).values()
    assert entry[2] == sha

    second = evaluate(root, instance, first.cursor)
    assert second.run_requests == [] and "no new interactions" in second.skip_message
    assert second.cursor is None or second.cursor == first.cursor
    # A lost cursor re-requests the same set of drops under the same run key, which Dagster
    # skips as already launched.
    (recovered,) = evaluate(root, instance).run_requests
    assert recovered.run_key == request.run_key

    # The same content dropped again is refused; new content under the same name is taken.
    csv(
        folder.incoming / "week1.csv",
        "user_id,item_id,timestamp,rating",
        [*new_user_rows(), ("u1", "i1", T0, 4)],
    )
    again = evaluate(root, instance, first.cursor)
    assert again.run_requests == []
    (note,) = folder.quarantine.glob("*.error.txt")
    assert "already appended" in note.read_text()
    csv(folder.incoming / "week1.csv", "user_id,item_id,timestamp", new_user_rows("u8"))
    third = evaluate(root, instance, first.cursor)
    assert len(third.run_requests) == 1
    assert third.run_requests[0].run_key != request.run_key
    assert len(json.loads(third.cursor)) == 2
    assert pq.read_metadata(folder.merged_interactions).num_rows == 36 + 6 + 6


def test_a_file_still_being_written_waits_for_the_next_tick(
    root: Path, instance: dg.DagsterInstance
) -> None:
    folder = DropFolder(root)
    csv(folder.incoming / "partial.csv", "user_id,item_id,timestamp", new_user_rows())
    result = evaluate(root, instance, settle_seconds=60)
    assert result.run_requests == []
    assert (folder.incoming / "partial.csv").exists()


@pytest.mark.parametrize(
    ("header", "rows", "field"),
    [
        ("user_id,item_id,rating", [("u7", "i1", 5)], "'timestamp'"),
        ("user_id,item_id,timestamp", [("u7", "i1", T0), ("u7", "i2", "yesterday")], "timestamp"),
        ("user_id,item_id,timestamp", [("u7", "i1", 315_532_800)], "column=timestamp"),  # 1980
        ("user_id,item_id,timestamp,rating", [("u7", "i1", T0, "five")], "rating"),
    ],
    ids=["missing-column", "non-numeric-timestamp", "timestamp-before-bounds", "bad-rating"],
)
def test_malformed_drop_is_quarantined_and_nothing_is_appended(
    root: Path, instance: dg.DagsterInstance, header: str, rows: list[tuple], field: str
) -> None:
    folder = DropFolder(root)
    raw = ArtifactPaths(root).raw_interactions
    raw_before = raw.read_bytes()
    csv(folder.incoming / "bad.csv", header, rows)

    result = evaluate(root, instance)

    assert result.run_requests == []
    assert "refused bad.csv" in result.skip_message
    assert not (folder.incoming / "bad.csv").exists()
    (kept,) = [p for p in folder.quarantine.iterdir() if not p.name.endswith(".error.txt")]
    assert kept.name.endswith("-bad.csv")
    note = kept.with_name(kept.name + ".error.txt").read_text()
    assert "bad.csv" in note and field in note and "fix:" in note
    assert raw.read_bytes() == raw_before
    assert not folder.appended.exists() or not list(folder.appended.iterdir())
    assert not folder.merged_interactions.exists()


def test_weekly_retrain_runs_sequences_and_every_unpartitioned_asset_downstream() -> None:
    from recsae_pipeline.defs.definitions import defs

    assert weekly_retrain.cron_schedule == "0 3 * * 1"
    assert weekly_retrain.job_name == "retrain"
    graph = defs.resolve_asset_graph()
    partitioned = {k for k in graph.get_all_asset_keys() if graph.get(k).partitions_def}
    downstream = dg.AssetSelection.assets("sequences").downstream().resolve(graph)
    retrain = {k.to_user_string() for k in retrain_job.selection.resolve(graph)}
    assert {
        "sequences",
        "sasrec",
        "teacher",
        "student",
        "layer_probe",
        "recommender_eval",
    } <= retrain
    # `results` reads every partition: the sensor runs `report` after each `features` run.
    report = {dg.AssetKey("results")}
    assert retrain == {k.to_user_string() for k in downstream - partitioned - report}
    assert partitioned and not retrain & {k.to_user_string() for k in partitioned}
    ingest = {k.to_user_string() for k in ingest_job.selection.resolve(graph)}
    assert ingest == retrain | {"raw_interactions", "item_catalog"}
    # Wired into the real Definitions, every job, schedule and sensor resolves (resources too).
    wired = dg.Definitions.merge(
        defs, dg.Definitions(jobs=jobs, schedules=schedules, sensors=sensors)
    )
    dg.Definitions.validate_loadable(wired)


def test_run_failure_alert_appends_the_run_and_its_error(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    @dg.op
    def train() -> None:
        raise ValueError("loss is NaN at epoch 3")

    @dg.job
    def doomed() -> None:
        train()

    result = doomed.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    # StorageRoot syncs remote roots in its setup/teardown, so a hand-built context with it
    # is a context manager (sensor ticks enter it themselves).
    with dg.build_run_status_sensor_context(
        sensor_name="run_failure_alert",
        dagster_event=result.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        resources={"storage": StorageRoot(path=str(tmp_path))},
    ) as status_context:
        context = status_context.for_run_failure()
        run_failure_alert(context)
        run_failure_alert(context)

    lines = (tmp_path / "reports" / "failures.log").read_text().splitlines()
    assert len(lines) == 2
    when, run_id, job, error = lines[0].split("\t")
    assert (run_id, job) == (result.run_id, "doomed")
    assert "step train" in error and "loss is NaN at epoch 3" in error


def test_the_requested_run_brings_dropped_rows_into_the_raw_log_and_sequences(
    root: Path, instance: dg.DagsterInstance
) -> None:
    from recsae_pipeline.defs.definitions import defs

    folder = DropFolder(root)
    # A new user, and an item the catalog has never seen.
    csv(
        folder.incoming / "week1.csv",
        "user_id,item_id,timestamp",
        [*new_user_rows(), ("u7", "i_new", T0 + 20_000)],
    )
    (request,) = evaluate(root, instance).run_requests
    job = dg.Definitions.merge(defs, dg.Definitions(jobs=jobs)).resolve_job_def(
        "ingest_and_retrain"
    )

    result = job.execute_in_process(
        run_config=request.run_config,
        instance=instance,
        tags=request.tags,
        asset_selection=[dg.AssetKey(k) for k in ("raw_interactions", "item_catalog", "sequences")],
    )

    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())
    paths = ArtifactPaths(root)
    users = pq.read_table(paths.raw_interactions).column("user_id").to_pylist()
    assert len(users) == 36 + 7 and users.count("u7") == 7
    catalog = {r["item_id"]: r for r in pq.read_table(paths.items).to_pylist()}
    assert catalog["i1"]["genres"] == ["Drama", "Comedy"] and catalog["i1"]["franchise"] == "a"
    assert catalog["i1"]["title"] == "Movie i1"
    assert catalog["i_new"]["title"] == "i_new"
    assert "u7" in pq.read_table(paths.user_map).column("user_id").to_pylist()


def _after(job_name: str, instance: dg.DagsterInstance, **tags: str) -> tuple[Any, list]:
    """A successful (empty) run of a job named `job_name`, and what `features_after_retrain`
    requests after it."""
    from recsae_pipeline.defs.definitions import defs

    @dg.op
    def step() -> None:
        pass

    @dg.job(name=job_name)
    def job() -> None:
        step()

    result = job.execute_in_process(instance=instance, tags=tags)
    context = dg.build_run_status_sensor_context(
        sensor_name="features_after_retrain",
        dagster_event=result.get_run_success_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
    )
    return result, list(defs.resolve_sensor_def("features_after_retrain")(context))


def test_a_successful_retrain_requests_features_for_every_partition(
    instance: dg.DagsterInstance,
) -> None:
    from recsae_pipeline.defs.definitions import defs
    from recsae_pipeline.defs.partitions import feature_partitions

    result, requests = _after("retrain", instance)
    assert [r.partition_key for r in requests] == feature_partitions.get_partition_keys()
    assert len({r.run_key for r in requests}) == len(requests)
    assert all(r.run_key.startswith(result.run_id) for r in requests)
    assert defs.resolve_job_def("features").partitions_def == feature_partitions


def test_a_successful_features_run_requests_the_report(instance: dg.DagsterInstance) -> None:
    tags = {"dagster/partition": "sasrec.layer2", "recsae/after_run": "r1"}
    _, (request,) = _after("features", instance, **tags)
    assert request.job_name == "report" and request.run_key == "r1:sasrec.layer2:report"
