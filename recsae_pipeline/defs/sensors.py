"""Sensors: new-interaction drops (see data/dropfolder.py for the folder layout and the
validation a drop goes through), features after a retrain, and run-failure alerts."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from recsae_pipeline.data.dropfolder import (
    GENRES_SEPARATOR,
    DropFolder,
    Fingerprint,
    MergedLog,
    fingerprint,
    quarantine_drop,
    read_drop,
    utc_stamp,
    write_merged_log,
)
from recsae_pipeline.data.ingest import (
    DataSourceError,
)
from recsae_pipeline.data.validation import QualityBounds
from recsae_pipeline.defs.assets.data import RawInteractionsConfig, TabularOptions
from recsae_pipeline.defs.jobs import (
    activations_jobs,
    ingest_job,
    partition_jobs,
    report_job,
    retrain_job,
)
from recsae_pipeline.defs.resources import DataQuality, StorageRoot

if TYPE_CHECKING:
    from dagster._utils.error import SerializableErrorInfo


def ingest_run_config(merged: MergedLog) -> dg.RunConfig:
    """`raw_interactions` through the tabular source, reading the merged log and catalog."""
    return dg.RunConfig(
        ops={
            "raw_interactions": RawInteractionsConfig(
                source="tabular",
                tabular=TabularOptions(
                    path=str(merged.interactions),
                    items_path=str(merged.items),
                    genres_separator=GENRES_SEPARATOR,
                ),
            )
        }
    )


def _load_cursor(cursor: str | None) -> dict[str, Fingerprint]:
    return {name: tuple(fp) for name, fp in json.loads(cursor or "{}").items()}  # type: ignore[misc]


def _take_drop(path: Path, folder: DropFolder, sha: str, bounds: QualityBounds) -> Path:
    """Append one valid drop: its contract rows into `appended/`, then the file into `accepted/`.

    Idempotent after a crash between the two steps: rows already appended for this content
    are reused, not written twice."""
    previous = folder.appended_drops(f"*-{sha[:16]}")
    appended = previous[0] if previous else folder.appended_drop(f"{utc_stamp()}-{sha[:16]}")
    if not previous:
        read_drop(path, appended, bounds)
    dest = folder.accepted / f"{appended.stem}-{path.name}"
    folder.accepted.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)
    return dest


def build_new_interactions_sensor(
    *,
    name: str = "new_interactions",
    minimum_interval_seconds: int = 60,
    settle_seconds: float = 10.0,
) -> dg.SensorDefinition:
    """The drop-folder sensor (see the module docstring).

    Cursor: JSON `{accepted file name: [size, mtime_ns, sha256]}` of every drop taken into a
    requested run. A drop whose sha256 is already there is refused as a duplicate, so nothing
    is ingested twice, while a re-dropped file with new content is taken. A file in `accepted/`
    missing from the cursor (a tick that died after moving it) is requested on the next tick.
    """

    @dg.sensor(
        name=name,
        job=ingest_job,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Files dropped in <storage root>/incoming/ (CSV or Parquet: user_id, item_id, "
        "timestamp[, rating]) are validated, appended to the raw log and trigger ingestion and "
        "retraining; malformed drops go to incoming/quarantine/ with an .error.txt.",
    )
    def new_interactions(
        context: dg.SensorEvaluationContext, storage: StorageRoot, quality: DataQuality
    ) -> dg.SensorResult | dg.SkipReason:
        paths = storage.paths
        folder = DropFolder(paths.root)
        taken = _load_cursor(context.cursor)
        taken_shas = {fp[2]: n for n, fp in taken.items()}
        fresh: dict[str, Fingerprint] = {}
        refused = []
        for path in folder.drops(settle_seconds):
            fp = fingerprint(path)
            sha = fp[2]
            try:
                if sha in taken_shas:
                    raise DataSourceError(
                        f"{path} has the same content (sha256 {sha[:16]}...) as "
                        f"{taken_shas[sha]}, already appended; delete this copy."
                    )
                dest = _take_drop(path, folder, sha, quality.bounds)
            except DataSourceError as err:
                note = quarantine_drop(path, folder, str(err))
                context.log.warning(f"refused {path.name}: {err} (see {note})")
                refused.append(path.name)
                continue
            fresh[dest.name] = fp
            taken_shas[sha] = dest.name
            context.log.info(f"took {path.name} as {dest.name}")
        # Accepted by a tick that died before its cursor was stored: request them now.
        for dest in sorted(folder.accepted.glob("*")) if folder.accepted.is_dir() else []:
            if dest.name not in taken and dest.name not in fresh:
                fresh[dest.name] = fingerprint(dest)
        if not fresh:
            return dg.SkipReason(
                f"no new interactions in {folder.incoming}"
                + (f"; refused {', '.join(refused)} (see incoming/quarantine/)" if refused else "")
            )
        merged = write_merged_log(paths, folder)
        taken.update(fresh)
        context.log.info(
            f"merged {merged.rows_from_drops:,} new rows from {', '.join(sorted(fresh))}: "
            f"{merged.rows:,} interactions in {merged.interactions}"
        )
        # The key names the whole set of drops in the log, so a cursor reset asks for nothing new.
        every_sha = sorted(fp[2] for fp in taken.values())
        run_key = "incoming-" + hashlib.sha256("".join(every_sha).encode()).hexdigest()[:16]
        request = dg.RunRequest(
            run_key=run_key,
            run_config=ingest_run_config(merged),
            tags={
                "recsae/trigger": name,
                "recsae/drops": ", ".join(sorted(fresh))[:1000],
                "recsae/new_rows": str(merged.rows_from_drops),
            },
        )
        return dg.SensorResult(
            run_requests=[request], cursor=json.dumps({k: list(v) for k, v in taken.items()})
        )

    return new_interactions


new_interactions = build_new_interactions_sensor()


def failure_line(run_id: str, job_name: str, errors: Iterable[str]) -> str:
    """One tab-separated line of `failures.log`: UTC time, run id, job, error text."""
    text = " | ".join(" ".join(e.split()) for e in errors) or "no error message"
    return f"{datetime.now(UTC).isoformat(timespec='seconds')}\t{run_id}\t{job_name}\t{text}\n"


def _root_cause(error: SerializableErrorInfo) -> str:
    """The user's exception, not Dagster's "error occurred while executing op" wrapper."""
    while error.cause is not None:
        error = error.cause
    return error.message


@dg.run_failure_sensor(
    name="run_failure_alert",
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Logs every failed run (id, job, error) and appends it to "
    "<storage root>/reports/failures.log.",
)
def run_failure_alert(context: dg.RunFailureSensorContext, storage: StorageRoot) -> None:
    run = context.dagster_run
    errors = [
        f"step {event.step_key}: {_root_cause(event.event_specific_data.error)}"  # type: ignore[union-attr]
        for event in context.get_step_failure_events()
        if getattr(event.event_specific_data, "error", None) is not None
    ] or [context.failure_event.message or ""]
    line = failure_line(run.run_id, run.job_name, errors)
    context.log.error(f"run {run.run_id} of job {run.job_name} failed: {line.split(chr(9))[-1]}")
    log = storage.paths.report("failures", ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    # One write() of one line in O_APPEND mode: concurrent alerts never interleave within a
    # line, and a crash loses at most that line, never earlier ones (no temp-file rename).
    with log.open("a", encoding="utf-8") as handle:
        handle.write(line)


def build_features_after_retrain_sensor(
    features_job: dg.UnresolvedAssetJobDefinition, partition_keys: Sequence[str]
) -> dg.SensorDefinition:
    """After a successful `retrain` or `ingest_and_retrain` run, one activations run per
    (model, layer) partition; after each of those, the `features` run of its partition, so a
    retrain reaches every downstream asset. Partitions whose models did not change skip
    their work (content-hash data versions). After each `features` run, the `report` job,
    so that `results` holds every partition done so far and, after the last, all of them."""
    activation_jobs = {job.name: job for job in activations_jobs.values()}

    @dg.run_status_sensor(
        name="features_after_retrain",
        run_status=dg.DagsterRunStatus.SUCCESS,
        monitored_jobs=[retrain_job, ingest_job, *activation_jobs.values(), features_job],
        request_jobs=[*activation_jobs.values(), features_job, report_job],
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="When `retrain` or `ingest_and_retrain` succeeds, request each (model, "
        "layer) partition's activations job; when one of those succeeds, its `features` job; "
        "when that succeeds, the `report` job.",
    )
    def features_after_retrain(context: dg.RunStatusSensorContext) -> Iterator[dg.RunRequest]:
        run = context.dagster_run
        if run.job_name == features_job.name:
            after = run.tags.get("recsae/after_run", run.run_id)
            key = run.tags.get("dagster/partition", "")
            yield dg.RunRequest(
                run_key=f"{after}:{key}:{report_job.name}",
                job_name=report_job.name,
                tags={"recsae/after_run": after},
            )
            return
        if run.job_name in activation_jobs:
            key = run.tags["dagster/partition"]
            after = run.tags.get("recsae/after_run", run.run_id)
            yield dg.RunRequest(
                run_key=f"{after}:{key}:{features_job.name}",
                job_name=features_job.name,
                partition_key=key,
                tags={"recsae/after_run": after},
            )
            return
        for key in partition_keys:
            job_name, _ = partition_jobs(key)
            yield dg.RunRequest(
                run_key=f"{run.run_id}:{key}",
                job_name=job_name,
                partition_key=key,
                tags={"recsae/after_run": run.run_id},
            )

    return features_after_retrain


sensors = [new_interactions, run_failure_alert]
