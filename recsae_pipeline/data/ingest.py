"""Turn delimited or Parquet interaction files into the raw-interactions contract, streaming.

DuckDB reads the file (out of core, so a 25M-row log never sits in Python memory), every
field arrives as text, and problems are counted per field before anything is written. Each
problem raises `DataSourceError` naming the file, the field, how many rows, and the fix.
"""

from __future__ import annotations

import codecs
import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb

from recsae_pipeline.storage.atomic import copy_to_parquet
from recsae_pipeline.storage.sql import read_parquet, sql_identifier, sql_literal

TimestampUnit = Literal["s", "ms", "datetime"]


class DataSourceError(ValueError):
    """Input data that cannot be ingested; the message says where and what to do."""


@dataclass(frozen=True)
class DelimitedFile:
    """How to read one delimited text file: names for its columns and the dialect."""

    path: Path
    delimiter: str
    header: bool
    encoding: str = "utf-8"
    columns: Sequence[str] | None = None  # names for a headerless file, in order
    quote: str = '"'


@dataclass(frozen=True)
class InteractionColumns:
    """Which source column holds each field of the raw-interactions contract."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    rating: str | None = "rating"
    timestamp_unit: TimestampUnit = "s"


@dataclass
class IngestReport:
    """What an ingestion wrote, for asset metadata."""

    rows: int
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_file(path: Path, what: str) -> None:
    """Fail early, and helpfully, on a missing or empty file."""
    if not path.exists():
        raise DataSourceError(
            f"{what} file {path} does not exist; check the path in the source config."
        )
    if path.is_dir():
        raise DataSourceError(f"{what} path {path} is a directory; point it at the file itself.")
    if path.stat().st_size == 0:
        raise DataSourceError(
            f"{what} file {path} is empty (0 bytes); re-export it or point the config at the right file."
        )


# DuckDB's CSV reader decodes these three natively (Python codec name -> DuckDB's).
DUCKDB_ENCODINGS = {"utf-8": "utf-8", "iso8859-1": "latin-1", "utf-16": "utf-16"}
# C1 bytes: Python's latin-1 maps them to U+0080-U+009F, DuckDB's latin-1 refuses the file.
_LATIN1_C1 = re.compile(rb"[\x80-\x9f]")


def duckdb_encoding(path: Path, encoding: str) -> str:
    """DuckDB's name for `encoding`; raises naming the file when DuckDB cannot read it."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        name = None
    if name not in DUCKDB_ENCODINGS and name != "utf-16-le":
        raise DataSourceError(
            f"{path}: `encoding` {encoding!r} is "
            + ("not an encoding" if name is None else "not one the CSV reader supports")
            + "; set `encoding` in the source config to 'utf-8', 'latin-1' or 'utf-16', or "
            "re-save the file as UTF-8."
        )
    return DUCKDB_ENCODINGS.get(name, "utf-16")


def check_encoding(path: Path, encoding: str, chunk_bytes: int = 1 << 20) -> None:
    """Stream the file through an incremental decoder; report the first undecodable byte's line."""
    latin1 = duckdb_encoding(path, encoding) == "latin-1"
    decoder = codecs.getincrementaldecoder(encoding)()
    line = 1
    offset = 0
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                bad = err.start
                line += chunk[:bad].count(b"\n")
                raise DataSourceError(
                    f"{path} is not valid {encoding}: byte 0x{chunk[bad]:02x} at byte offset "
                    f"{offset + bad} (line {line}) cannot be decoded. Re-save the file as UTF-8, "
                    f"or set `encoding` in the source config (e.g. 'latin-1' for MovieLens ml-1m)."
                ) from None
            if latin1 and (c1 := _LATIN1_C1.search(chunk)):
                bad = c1.start()
                line += chunk[:bad].count(b"\n")
                raise DataSourceError(
                    f"{path} is not plain latin-1: byte 0x{chunk[bad]:02x} at byte offset "
                    f"{offset + bad} (line {line}) is a C1 control code, not text (the file is "
                    "probably Windows-1252); re-save it as UTF-8 and set `encoding: utf-8` in the "
                    "source config, or restore the original file."
                )
            line += chunk.count(b"\n")
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataSourceError(
            f"{path} ends in the middle of a multi-byte {encoding} character: the file looks "
            "truncated; re-export it."
        ) from None


def delimited_relation(con: duckdb.DuckDBPyConnection, spec: DelimitedFile) -> str:
    """SQL for a DuckDB scan of `spec` with every field as text and short lines padded with NULL."""
    check_file(spec.path, "input")
    check_encoding(spec.path, spec.encoding)
    options = [
        f"delim={sql_literal(spec.delimiter)}",
        f"header={'true' if spec.header else 'false'}",
        "all_varchar=true",
        "null_padding=true",
        f"quote={sql_literal(spec.quote)}",
        "auto_detect=false" if spec.columns else "auto_detect=true",
    ]
    if not spec.quote:
        options.append("escape=''")
    if spec.encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
        options.append(f"encoding={sql_literal(duckdb_encoding(spec.path, spec.encoding))}")
    if spec.columns:
        cols = ", ".join(f"{sql_literal(c)}: 'VARCHAR'" for c in spec.columns)
        options.append(f"columns={{{cols}}}")
    sql = f"read_csv({sql_literal(spec.path)}, {', '.join(options)})"
    try:
        con.execute(f"SELECT * FROM {sql} LIMIT 0").fetchall()
    except duckdb.Error as err:
        raise DataSourceError(
            f"{spec.path} cannot be parsed as a {spec.delimiter!r}-separated file: "
            f"{str(err).splitlines()[0]}. Check `delimiter` and `header` in the source config."
        ) from None
    return sql


@contextlib.contextmanager
def read_errors(path: Path, fix: str) -> Iterator[None]:
    """Turn a DuckDB error while reading `path` (a corrupt Parquet file, a CSV line with too
    many fields) into a `DataSourceError` naming the file, the line where DuckDB gives one, and `fix`."""
    try:
        yield
    except duckdb.Error as err:
        text = str(err)
        line = re.search(r"CSV Error on Line: (\d+)", text)
        fields = re.search(r"Expected Number of Columns: (\d+) Found: (\d+)", text)
        if line and fields:
            problem = f"line {line[1]} has {fields[2]} fields where {fields[1]} are expected"
        elif line:
            problem = f"line {line[1]}: {text.splitlines()[0]}"
        else:
            problem = text.splitlines()[0] if text else type(err).__name__
        raise DataSourceError(f"{path} cannot be read: {problem}. {fix}") from None


def relation_columns(con: duckdb.DuckDBPyConnection, relation_sql: str) -> list[str]:
    return [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {relation_sql}").fetchall()]


# Issue 13: C0 control characters other than tab, and DEL, are refused in ids, titles and
# genre names (RE2 escapes, so the SQL literal stays printable).
CONTROL_CHARACTERS_RE = r"[\x00-\x08\x0A-\x1F\x7F]"
_CONTROL = re.compile(CONTROL_CHARACTERS_RE)


def control_value_sql(column: str, is_list: bool = False) -> str:
    """SQL for the value of `column` (a text or a list of texts) that holds a control
    character, NULL when none does; `count()` of it counts the offending rows."""
    col, pattern = sql_identifier(column), sql_literal(CONTROL_CHARACTERS_RE)
    if is_list:
        return f"list_filter({col}, lambda g: regexp_matches(g, {pattern}))[1]"
    return f"CASE WHEN regexp_matches({col}, {pattern}) THEN {col} END"


def raise_control_character(
    con: duckdb.DuckDBPyConnection,
    relation_sql: str,
    path: Path,
    value_sql: str,
    field_name: str,
    count: int,
    n_rows: int,
) -> None:
    """Raise for `count` rows whose `value_sql` holds a control character, with the first."""
    row, value = con.execute(
        f"SELECT _row, _value FROM (SELECT row_number() OVER () AS _row, {value_sql} AS _value "
        f"FROM {relation_sql}) WHERE _value IS NOT NULL LIMIT 1"
    ).fetchone()  # type: ignore[misc]
    match = _CONTROL.search(value)
    code = ord(match.group()) if match else 0
    raise DataSourceError(
        f"{path}: field `{field_name}` holds control character U+{code:04X} in {count} of "
        f"{n_rows} rows (first at data row {row}: {value!r}); remove control characters (C0 "
        "other than tab, and DEL) from ids, titles and genre names, then re-export the file."
    )


def refuse_control_characters(
    con: duckdb.DuckDBPyConnection,
    relation_sql: str,
    path: Path,
    fields: Mapping[str, str],
    lists: Sequence[str] = (),
) -> None:
    """One streaming scan of `relation_sql`: raise on a control character in any of `fields`
    (relation column -> the file's name for it); `lists` are list-of-text columns."""
    values = {c: control_value_sql(c, c in lists) for c in fields}
    counts = con.execute(
        f"SELECT count(*), {', '.join(f'count({v})' for v in values.values())} FROM {relation_sql}"
    ).fetchone()
    assert counts is not None
    for (column, value_sql), count in zip(values.items(), counts[1:], strict=True):
        if count:
            raise_control_character(
                con, relation_sql, path, value_sql, fields[column], count, counts[0]
            )


def _suggest_delimiter(columns: list[str]) -> str:
    if len(columns) != 1:
        return ""
    for delim, name in (
        (";", "';'"),
        ("\t", "'\\t' (tab)"),
        ("|", "'|'"),
        (",", "','"),
        ("::", "'::'"),
    ):
        if delim in columns[0]:
            return f" The file has a single column {columns[0]!r}: it looks {name}-separated; set `delimiter`."
    return ""


def require_columns(
    con: duckdb.DuckDBPyConnection,
    relation_sql: str,
    path: Path,
    required: Sequence[str],
    fix: str | None = None,
) -> list[str]:
    """The relation's columns; raises when a required one is missing, listing what the file
    has and `fix` (default: map the column in the source config)."""
    have = relation_columns(con, relation_sql)
    missing = [c for c in required if c not in have]
    if missing:
        hint = (
            f" {fix}"
            if fix
            else f"{_suggest_delimiter(have)} Rename the column or map it in the source config "
            "(e.g. `user_column`, `item_column`, `timestamp_column`)."
        )
        raise DataSourceError(
            f"{path} has no column {', '.join(repr(m) for m in missing)} (columns found: {have})."
            + hint
        )
    return have


def _timestamp_expr(column: str, unit: TimestampUnit) -> str:
    col = sql_identifier(column)
    if unit == "datetime":
        return f"CAST(epoch(TRY_CAST({col} AS TIMESTAMP)) AS BIGINT)"
    # Integral text, or a float written by tools such as RecBole ("881250949.0").
    as_int = f"COALESCE(TRY_CAST({col} AS BIGINT), TRY_CAST(TRY_CAST({col} AS DECIMAL(38, 6)) AS BIGINT))"
    return f"({as_int} // 1000)" if unit == "ms" else as_int


def write_interactions(
    con: duckdb.DuckDBPyConnection,
    relation_sql: str,
    path: Path,
    columns: InteractionColumns,
    out: Path,
) -> int:
    """Validate the source columns, then stream the contract's four columns to `out` (Parquet).

    `relation_sql` is a FROM-able DuckDB expression over `path` whose fields may be text.
    """
    required = [columns.user_id, columns.item_id, columns.timestamp]
    if columns.rating:
        required.append(columns.rating)
    require_columns(con, relation_sql, path, required)
    ts = _timestamp_expr(columns.timestamp, columns.timestamp_unit)
    rating = (
        f"TRY_CAST({sql_identifier(columns.rating)} AS FLOAT)"
        if columns.rating
        else "CAST(NULL AS FLOAT)"
    )
    select = (
        f"SELECT trim(CAST({sql_identifier(columns.user_id)} AS VARCHAR)) AS user_id, "
        f"trim(CAST({sql_identifier(columns.item_id)} AS VARCHAR)) AS item_id, "
        f"{ts} AS timestamp, {rating} AS rating, "
        f"CAST({sql_identifier(columns.timestamp)} AS VARCHAR) AS _ts_text, "
        + (
            f"CAST({sql_identifier(columns.rating)} AS VARCHAR) AS _rating_text "
            if columns.rating
            else "NULL AS _rating_text "
        )
        + f"FROM {relation_sql}"
    )
    con.execute(f"CREATE OR REPLACE TEMP VIEW _ingest AS {select}")
    _raise_on_problems(con, path, columns)
    copy_to_parquet(
        con, "SELECT user_id, item_id, timestamp, rating FROM _ingest", out, row_group_size=131_072
    )
    (rows,) = con.execute(f"SELECT count(*) FROM {read_parquet(out)}").fetchone()  # type: ignore[misc]
    return int(rows)


def _raise_on_problems(
    con: duckdb.DuckDBPyConnection, path: Path, columns: InteractionColumns
) -> None:
    # NaN, inf and text beyond float32 (TRY_CAST gives inf) are no rating.
    bad_rating_sql = (
        "_rating_text IS NOT NULL AND trim(_rating_text) <> '' "
        "AND (rating IS NULL OR isnan(rating) OR isinf(rating))"
    )
    counts = con.execute(
        f"""
        SELECT count(*) AS n_rows,
               count(*) FILTER (WHERE user_id IS NULL OR user_id = '') AS null_user,
               count(*) FILTER (WHERE item_id IS NULL OR item_id = '') AS null_item,
               count(*) FILTER (WHERE _ts_text IS NULL OR trim(_ts_text) = '') AS null_ts,
               count(*) FILTER (WHERE _ts_text IS NOT NULL AND trim(_ts_text) <> '' AND timestamp IS NULL) AS bad_ts,
               count(*) FILTER (WHERE timestamp < 0) AS negative_ts,
               count(*) FILTER (WHERE {bad_rating_sql}) AS bad_rating,
               count({control_value_sql("user_id")}) AS control_user,
               count({control_value_sql("item_id")}) AS control_item
        FROM _ingest
        """
    ).fetchone()
    assert counts is not None
    n_rows, null_user, null_item, null_ts, bad_ts, negative_ts, bad_rating = counts[:7]
    control_user, control_item = counts[7:]
    if n_rows == 0:
        raise DataSourceError(
            f"{path} has no data rows (only a header, or nothing); point the source at a file "
            "with interactions."
        )

    def example(condition: str, col: str) -> str:
        row = con.execute(
            f"SELECT _line, {col} FROM (SELECT row_number() OVER () AS _line, * FROM _ingest) "
            f"WHERE {condition} LIMIT 1"
        ).fetchone()
        return "" if row is None else f" (first at data row {row[0]}: {row[1]!r})"

    if null_user or null_item or null_ts:
        field_name, count, cond = next(
            (f, c, cond)
            for f, c, cond in (
                (columns.user_id, null_user, "user_id IS NULL OR user_id = ''"),
                (columns.item_id, null_item, "item_id IS NULL OR item_id = ''"),
                (columns.timestamp, null_ts, "_ts_text IS NULL OR trim(_ts_text) = ''"),
            )
            if c
        )
        last = con.execute(
            "SELECT max(_line) = (SELECT count(*) FROM _ingest) FROM "
            f"(SELECT row_number() OVER () AS _line, * FROM _ingest) WHERE {cond}"
        ).fetchone()
        truncated = count == 1 and last is not None and last[0]
        hint = (
            "the last line is cut short: the file looks truncated; re-export or re-download it"
            if truncated
            else "drop those rows upstream, or check the delimiter and the column mapping"
        )
        shown = "concat_ws(' | ', user_id, item_id, _ts_text)"
        raise DataSourceError(
            f"{path}: field `{field_name}` is empty in {count} of {n_rows} rows"
            f"{example(cond, shown)}; {hint}."
        )
    for field_name, column, count in (
        (columns.user_id, "user_id", control_user),
        (columns.item_id, "item_id", control_item),
    ):
        if count:
            value_sql = control_value_sql(column)
            raise_control_character(con, "_ingest", path, value_sql, field_name, count, n_rows)
    if bad_ts:
        unit = columns.timestamp_unit
        want = (
            "an ISO date-time"
            if unit == "datetime"
            else f"an integer number of {'seconds' if unit == 's' else 'milliseconds'} within int64"
        )
        raise DataSourceError(
            f"{path}: field `{columns.timestamp}` is not {want} in {bad_ts} of {n_rows} rows"
            f"{example('_ts_text IS NOT NULL AND timestamp IS NULL', '_ts_text')}. Fix those values, or set "
            "`timestamp_unit` ('s', 'ms' or 'datetime') in the source config."
        )
    if negative_ts:
        raise DataSourceError(
            f"{path}: field `{columns.timestamp}` is negative in {negative_ts} of {n_rows} rows"
            f"{example('timestamp < 0', '_ts_text')}; timestamps are seconds since 1970-01-01, "
            "so drop or repair those rows."
        )
    if bad_rating:
        raise DataSourceError(
            f"{path}: field `{columns.rating}` is not a number in {bad_rating} of {n_rows} rows"
            f"{example(bad_rating_sql, '_rating_text')}; ratings are finite numbers within float32 "
            "(|r| < 3.4e38): fix them, or map no rating column (`rating_column: null`)."
        )
