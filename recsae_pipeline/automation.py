"""Jobs, schedules and sensors: weekly retraining, new-interaction drops, run-failure alerts.

New interactions arrive as files dropped under the storage root (`StorageRoot` resource:
`$RECSAE_DATA_DIR`, else `data/`):

    incoming/<name>.csv|.parquet        a drop: user_id, item_id, timestamp (s)[, rating]
    incoming/appended/<tag>.parquet      its rows in the raw-interactions contract, once valid
    incoming/accepted/<tag>-<name>       the drop itself, moved here once taken
    incoming/quarantine/<stamp>-<name>   a refused drop, beside `<...>.error.txt` with the fix
    incoming/merged/*.parquet            raw log now + every appended drop: what ingestion reads

`<tag>` is `<UTC stamp>-<first 16 hex of the drop's sha256>`. A drop is validated completely
(the ingest checks, then the same GX suite as the blocking `raw_interactions` check) before
anything is written, so a malformed drop is quarantined, never half-applied. The raw log is
never edited in place: the run the sensor requests re-materializes `raw_interactions` from
the merged file through the `tabular` source, which writes `raw/interactions.parquet`
atomically like every other ingestion.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
import duckdb

from recsae_pipeline.assets.data import RawInteractionsConfig, TabularOptions
from recsae_pipeline.data.ingest import (
    DataSourceError,
    DelimitedFile,
    InteractionColumns,
    _sql_str,
    check_file,
    delimited_relation,
    relation_columns,
    write_interactions,
)
from recsae_pipeline.data.validation import QualityBounds, SuiteOutcome, validate_raw_interactions
from recsae_pipeline.resources import DataQuality, StorageRoot
from recsae_pipeline.store import ArtifactPaths, atomic_path, scratch_dir, write_bytes

if TYPE_CHECKING:
    from dagster._utils.error import SerializableErrorInfo

# ----------------------------------------------------------------------------- jobs, schedule

# Everything from `activations` on is per (model, layer) partition: the SAEs, their features,
# steering, explanations and the browser. Selecting it by lineage, not by name, keeps a new
# per-partition asset out of these jobs without editing this list.
PER_PARTITION = dg.AssetSelection.assets("activations").downstream()

retrain_job = dg.define_asset_job(
    "retrain",
    selection=dg.AssetSelection.assets("sequences").downstream() - PER_PARTITION,
    description="Rebuild sequences from the current raw log and retrain every model, the layer "
    "probe and the evaluation (unpartitioned assets; the `features_after_retrain` sensor then "
    "runs the per-(model, layer) `features` job).",
    executor_def=dg.in_process_executor,
)

ingest_job = dg.define_asset_job(
    "ingest_and_retrain",
    selection=dg.AssetSelection.assets("raw_interactions").downstream() - PER_PARTITION,
    description="Re-ingest the raw log (the `new_interactions` sensor points it at the log plus "
    "the new drops), rebuild the catalog and sequences, and retrain everything unpartitioned.",
    executor_def=dg.in_process_executor,
)

weekly_retrain = dg.ScheduleDefinition(
    name="weekly_retrain",
    job=retrain_job,
    cron_schedule="0 3 * * 1",
    execution_timezone="UTC",
    description="Mondays 03:00 UTC: sequences and every unpartitioned model downstream of them; "
    "the `features_after_retrain` sensor then runs the per-partition `features` job. Unchanged "
    "inputs, config and code skip their work (content-hash data versions).",
)

# ----------------------------------------------------------------------------- drop folder

DROP_SUFFIXES = (".csv", ".parquet")
DROP_COLUMNS = ("user_id", "item_id", "timestamp")
# Genres travel as one string through the tabular source's item file; joined with a control
# character, since genre names may contain '|' or ',' but never that.
GENRES_SEPARATOR = "\x1f"


@dataclass(frozen=True)
class DropFolder:
    """The `incoming/` tree under a storage root (see the module docstring)."""

    root: Path

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def appended(self) -> Path:
        return self.incoming / "appended"

    @property
    def accepted(self) -> Path:
        return self.incoming / "accepted"

    @property
    def quarantine(self) -> Path:
        return self.incoming / "quarantine"

    @property
    def merged_interactions(self) -> Path:
        return self.incoming / "merged" / "interactions.parquet"

    @property
    def merged_items(self) -> Path:
        return self.incoming / "merged" / "items.parquet"

    def drops(self, settle_seconds: float = 0.0) -> list[Path]:
        """CSV/Parquet files waiting in `incoming/`, oldest name first; dotfiles (a writer's
        temp file) and files modified in the last `settle_seconds` (still being copied) wait."""
        if not self.incoming.is_dir():
            return []
        now = time.time()
        return sorted(
            p
            for p in self.incoming.iterdir()
            if p.is_file()
            and not p.name.startswith(".")
            and p.suffix.lower() in DROP_SUFFIXES
            and now - p.stat().st_mtime >= settle_seconds
        )


Fingerprint = tuple[int, int, str]
"""(size in bytes, mtime_ns, sha256 hex) of a taken drop."""


def fingerprint(path: Path) -> Fingerprint:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, digest.hexdigest()


def _utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def _drop_relation(con: duckdb.DuckDBPyConnection, path: Path) -> str:
    if path.suffix.lower() == ".parquet":
        check_file(path, "dropped")
        return f"read_parquet({_sql_str(str(path))})"
    return delimited_relation(con, DelimitedFile(path, ",", header=True))


def _suite_problems(path: Path, outcome: SuiteOutcome, bounds: QualityBounds) -> str:
    problems = []
    for key in outcome.failed:
        entry = outcome.details[key]
        sample = entry.get("unexpected_sample")
        problems.append(
            f"{key} fails in {entry.get('unexpected_count', 0)} rows"
            + (f" (e.g. {sample[:3]})" if sample else "")
        )
    return (
        f"{path} fails the raw-interactions checks: {'; '.join(problems)}. A drop needs "
        f"timestamps in whole seconds between {bounds.min_timestamp} and now, ratings between "
        f"{bounds.min_rating} and {bounds.max_rating}, and each (user_id, item_id, timestamp) "
        "once; fix those rows and drop the file again."
    )


def read_drop(path: Path, out: Path, bounds: QualityBounds) -> int:
    """Validate a dropped file completely, then write its rows in the raw-interactions contract
    to `out` and return their count; raises `DataSourceError` (and writes nothing) otherwise."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir(out.parent) as scratch:
        staged = ArtifactPaths(Path(scratch))
        con = duckdb.connect()
        try:
            rel = _drop_relation(con, path)
            have = relation_columns(con, rel)
            missing = [c for c in DROP_COLUMNS if c not in have]
            if missing:
                raise DataSourceError(
                    f"{path} has no column {', '.join(repr(c) for c in missing)} (columns found: "
                    f"{have}). A drop needs a header with user_id, item_id, timestamp (whole "
                    "seconds since 1970) and optionally rating; rename the columns and drop the "
                    "file again."
                )
            columns = InteractionColumns(rating="rating" if "rating" in have else None)
            rows = write_interactions(con, rel, path, columns, staged.raw_interactions)
        except duckdb.Error as err:
            raise DataSourceError(
                f"{path} cannot be read: {str(err).splitlines()[0]}. Re-export it as a CSV with "
                "a header row, or as Parquet, and drop it again."
            ) from None
        finally:
            con.close()
        outcome = validate_raw_interactions(staged, bounds)
        if not outcome.success:
            raise DataSourceError(_suite_problems(path, outcome, bounds))
        os.replace(staged.raw_interactions, out)  # same filesystem: an atomic rename
    return rows


def quarantine_drop(path: Path, folder: DropFolder, problem: str) -> Path:
    """Move a refused drop to `quarantine/` beside an `.error.txt` that says why and what to do;
    returns the note's path."""
    dest = folder.quarantine / f"{_utc_stamp()}-{path.name}"
    note = dest.with_name(dest.name + ".error.txt")
    write_bytes(
        (
            f"{path.name} was refused: nothing from it was appended to the raw interactions.\n\n"
            f"problem: {problem}\n\n"
            f"fix: correct the file and drop it into {folder.incoming} again (CSV with a header, "
            "or Parquet; columns user_id, item_id, timestamp in whole seconds since 1970, "
            "optional rating).\n"
            f"file: {dest}\n"
            f"quarantined: {datetime.now(UTC).isoformat(timespec='seconds')}\n"
        ).encode(),
        note,
    )
    os.replace(path, dest)
    return note


@dataclass(frozen=True)
class MergedLog:
    """What the ingest run reads: the raw log now plus every appended drop."""

    interactions: Path
    items: Path
    rows: int
    rows_from_drops: int  # drop rows not (yet) in the raw log


def write_merged_log(paths: ArtifactPaths, folder: DropFolder) -> MergedLog:
    """Union the current raw log with every file in `appended/`; a drop row whose (user_id,
    item_id, timestamp) is already there is left out, so merging again never duplicates a row.
    Items first seen in a drop join the source's catalog with their id as title."""
    drops = sorted(folder.appended.glob("*.parquet"))
    if not drops:
        raise DataSourceError(f"{folder.appended} holds no appended drops to merge.")
    files = "[" + ", ".join(_sql_str(str(p)) for p in drops) + "]"
    base = (
        f"(SELECT user_id, item_id, timestamp, rating "
        f"FROM read_parquet({_sql_str(str(paths.raw_interactions))}))"
        if paths.raw_interactions.exists()
        else "(SELECT NULL::VARCHAR AS user_id, NULL::VARCHAR AS item_id, NULL::BIGINT AS "
        "timestamp, NULL::FLOAT AS rating WHERE false)"
    )
    # First arrival wins among drops (file names start with a UTC stamp).
    new_rows = f"""
        SELECT user_id, item_id, timestamp, rating FROM (
            SELECT *, row_number() OVER (PARTITION BY user_id, item_id, timestamp
                                         ORDER BY filename, file_row_number) AS nth
            FROM read_parquet({files}, filename = true, file_row_number = true)
        ) WHERE nth = 1
    """
    con = duckdb.connect()
    try:
        con.execute(
            f"""CREATE TEMP VIEW merged AS
                SELECT CAST(user_id AS VARCHAR) AS user_id, CAST(item_id AS VARCHAR) AS item_id,
                       CAST(timestamp AS BIGINT) AS timestamp, CAST(rating AS FLOAT) AS rating,
                       0 AS from_drop
                FROM {base}
                UNION ALL
                SELECT n.*, 1 FROM ({new_rows}) n ANTI JOIN {base} b
                USING (user_id, item_id, timestamp)"""
        )
        with atomic_path(folder.merged_interactions) as tmp:
            con.execute(
                "COPY (SELECT user_id, item_id, timestamp, rating FROM merged) "
                f"TO {_sql_str(str(tmp))} (FORMAT parquet, COMPRESSION zstd)"
            )
        rows, from_drops = con.execute("SELECT count(*), sum(from_drop) FROM merged").fetchone()  # type: ignore[misc]
        with atomic_path(folder.merged_items) as tmp:
            con.execute(
                f"COPY ({_merged_items_sql(con, paths)}) TO {_sql_str(str(tmp))} "
                "(FORMAT parquet, COMPRESSION zstd)"
            )
    finally:
        con.close()
    return MergedLog(
        folder.merged_interactions, folder.merged_items, int(rows), int(from_drops or 0)
    )


def _merged_items_sql(con: duckdb.DuckDBPyConnection, paths: ArtifactPaths) -> str:
    unseen = "SELECT DISTINCT item_id, item_id AS title FROM merged"
    if not paths.raw_items.exists():
        return f"{unseen} ORDER BY item_id"
    items = f"read_parquet({_sql_str(str(paths.raw_items))})"
    extras = [
        row[0]
        for row in con.execute(f"DESCRIBE SELECT * FROM {items}").fetchall()
        if row[0] not in ("item_id", "title", "year", "genres")
    ]
    extra_sql = "".join(f', "{c}"' for c in extras)
    return f"""
        SELECT item_id, title, year,
               array_to_string(genres, {_sql_str(GENRES_SEPARATOR)}) AS genres{extra_sql}
        FROM {items}
        UNION ALL BY NAME
        (SELECT * FROM ({unseen}) WHERE item_id NOT IN (SELECT item_id FROM {items})
         ORDER BY item_id)
    """


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


# ----------------------------------------------------------------------------- sensors


def _load_cursor(cursor: str | None) -> dict[str, Fingerprint]:
    return {name: tuple(fp) for name, fp in json.loads(cursor or "{}").items()}  # type: ignore[misc]


def _take_drop(path: Path, folder: DropFolder, sha: str, bounds: QualityBounds) -> Path:
    """Append one valid drop: its contract rows into `appended/`, then the file into `accepted/`.

    Idempotent after a crash between the two steps: rows already appended for this content
    are reused, not written twice."""
    previous = sorted(folder.appended.glob(f"*-{sha[:16]}.parquet"))
    appended = previous[0] if previous else folder.appended / f"{_utc_stamp()}-{sha[:16]}.parquet"
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
    log = storage.paths.reports_dir / "failures.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # One write() of one line in O_APPEND mode: concurrent alerts never interleave within a
    # line, and a crash loses at most that line, never earlier ones (no temp-file rename).
    with log.open("a", encoding="utf-8") as handle:
        handle.write(line)


def build_features_after_retrain_sensor(
    features_job: dg.UnresolvedAssetJobDefinition, partition_keys: Sequence[str]
) -> dg.SensorDefinition:
    """After a successful `retrain` or `ingest_and_retrain` run, one `features` run per
    (model, layer) partition, so a retrain reaches every downstream asset. Partitions whose
    models did not change skip their work (content-hash data versions)."""

    @dg.run_status_sensor(
        name="features_after_retrain",
        run_status=dg.DagsterRunStatus.SUCCESS,
        monitored_jobs=[retrain_job, ingest_job],
        request_job=features_job,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="When `retrain` or `ingest_and_retrain` succeeds, request the `features` "
        "job for every (model, layer) partition.",
    )
    def features_after_retrain(context: dg.RunStatusSensorContext) -> Iterator[dg.RunRequest]:
        run_id = context.dagster_run.run_id
        for key in partition_keys:
            yield dg.RunRequest(
                run_key=f"{run_id}:{key}",
                partition_key=key,
                tags={"recsae/after_run": run_id},
            )

    return features_after_retrain


jobs = [retrain_job, ingest_job]
schedules = [weekly_retrain]
sensors = [new_interactions, run_failure_alert]
