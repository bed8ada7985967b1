"""The drop folder: new interaction logs dropped under the storage root, validated whole, then
merged with the raw log for re-ingestion.

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
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from recsae_pipeline.data.ingest import (
    DataSourceError,
    DelimitedFile,
    InteractionColumns,
    check_file,
    delimited_relation,
    read_errors,
    require_columns,
    write_interactions,
)
from recsae_pipeline.data.validation import QualityBounds, SuiteOutcome, validate_raw_interactions
from recsae_pipeline.storage.atomic import copy_to_parquet, scratch_dir, write_bytes
from recsae_pipeline.storage.registry import ArtifactPaths, DropFolderPaths
from recsae_pipeline.storage.sql import read_parquet, sql_identifier, sql_literal

DROP_SUFFIXES = (".csv", ".parquet")


DROP_COLUMNS = ("user_id", "item_id", "timestamp")


# Genres travel as one string through the tabular source's item file; joined with a control
# character, since genre names may contain '|' or ',' but never that.
GENRES_SEPARATOR = "\x1f"


@dataclass(frozen=True)
class DropFolder(DropFolderPaths):
    """The `incoming/` tree under a storage root (see the module docstring), with its drops."""

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


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def _drop_relation(con: duckdb.DuckDBPyConnection, path: Path) -> str:
    if path.suffix.lower() == ".parquet":
        check_file(path, "dropped")
        return read_parquet(path)
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
            with read_errors(
                path, "Re-export it as a CSV with a header row, or as Parquet, and drop it again."
            ):
                rel = _drop_relation(con, path)
                have = require_columns(
                    con, rel, path, DROP_COLUMNS,
                    fix="A drop needs a header with user_id, item_id, timestamp (whole seconds "
                    "since 1970) and optionally rating; rename the columns and drop the file again.",
                )  # fmt: skip
                columns = InteractionColumns(rating="rating" if "rating" in have else None)
                rows = write_interactions(con, rel, path, columns, staged.raw_interactions)
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
    dest = folder.quarantine / f"{utc_stamp()}-{path.name}"
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
    drops = folder.appended_drops()
    if not drops:
        raise DataSourceError(f"{folder.appended} holds no appended drops to merge.")
    base = (
        f"(SELECT user_id, item_id, timestamp, rating FROM {read_parquet(paths.raw_interactions)})"
        if paths.raw_interactions.exists()
        else "(SELECT NULL::VARCHAR AS user_id, NULL::VARCHAR AS item_id, NULL::BIGINT AS "
        "timestamp, NULL::FLOAT AS rating WHERE false)"
    )
    # First arrival wins among drops (file names start with a UTC stamp).
    new_rows = f"""
        SELECT user_id, item_id, timestamp, rating FROM (
            SELECT *, row_number() OVER (PARTITION BY user_id, item_id, timestamp
                                         ORDER BY filename, file_row_number) AS nth
            FROM {read_parquet(drops, filename=True, file_row_number=True)}
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
        copy_to_parquet(
            con,
            "SELECT user_id, item_id, timestamp, rating FROM merged",
            folder.merged_interactions,
        )
        rows, from_drops = con.execute("SELECT count(*), sum(from_drop) FROM merged").fetchone()  # type: ignore[misc]
        copy_to_parquet(con, _merged_items_sql(con, paths), folder.merged_items)
    finally:
        con.close()
    return MergedLog(
        folder.merged_interactions, folder.merged_items, int(rows), int(from_drops or 0)
    )


def _merged_items_sql(con: duckdb.DuckDBPyConnection, paths: ArtifactPaths) -> str:
    unseen = "SELECT DISTINCT item_id, item_id AS title FROM merged"
    if not paths.raw_items.exists():
        return f"{unseen} ORDER BY item_id"
    items = read_parquet(paths.raw_items)
    extras = [
        row[0]
        for row in con.execute(f"DESCRIBE SELECT * FROM {items}").fetchall()
        if row[0] not in ("item_id", "title", "year", "genres")
    ]
    extra_sql = "".join(f", {sql_identifier(c)}" for c in extras)
    return f"""
        SELECT item_id, title, year,
               array_to_string(genres, {sql_literal(GENRES_SEPARATOR)}) AS genres{extra_sql}
        FROM {items}
        UNION ALL BY NAME
        (SELECT * FROM ({unseen}) WHERE item_id NOT IN (SELECT item_id FROM {items})
         ORDER BY item_id)
    """
