"""Interaction sources: each writes raw interactions and the source's item catalog as Parquet.

Sources: `synthetic` (embedded, with planted ground truth), `movielens` (GroupLens files),
`recbole` (RecBole atomic files) and `tabular` (any CSV or Parquet with a column mapping).
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb

from recsae_pipeline.data import synthetic
from recsae_pipeline.data.catalog import RESERVED_ITEM_COLUMNS
from recsae_pipeline.data.ingest import (
    DataSourceError,
    DelimitedFile,
    IngestReport,
    InteractionColumns,
    TimestampUnit,
    check_file,
    delimited_relation,
    read_errors,
    refuse_control_characters,
    relation_columns,
    require_columns,
    write_interactions,
)
from recsae_pipeline.storage.atomic import (
    atomic_path,
    copy_to_parquet,
    parquet_writer,
    scratch_dir,
    write_parquet,
)
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline.storage.sql import read_parquet, sql_identifier, sql_literal

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

# GroupLens publishes an MD5 file beside each archive; the optional download checks it.
MOVIELENS_BASE_URL = "https://files.grouplens.org/datasets/movielens"
MOVIELENS_ARCHIVES = ("ml-100k", "ml-1m", "ml-20m", "ml-25m", "ml-latest-small", "ml-latest")


@dataclass(frozen=True)
class SyntheticSource:
    config: synthetic.SyntheticConfig = field(default_factory=synthetic.SyntheticConfig)
    kind: Literal["synthetic"] = "synthetic"


@dataclass(frozen=True)
class MovieLensSource:
    """A GroupLens directory: ml-100k, ml-1m, or ml-20m/25m/latest (detected from its files)."""

    path: Path
    download: str | None = None  # e.g. "ml-1m": fetch and verify the archive first if absent
    kind: Literal["movielens"] = "movielens"


@dataclass(frozen=True)
class RecBoleSource:
    """RecBole atomic files `<dir>/<name>.inter` and, if present, `<dir>/<name>.item`."""

    path: Path
    name: str | None = None  # defaults to the directory name
    kind: Literal["recbole"] = "recbole"


@dataclass(frozen=True)
class TabularSource:
    """Any CSV or Parquet file of interactions, with a column mapping; an optional item file."""

    path: Path
    columns: InteractionColumns = field(default_factory=InteractionColumns)
    delimiter: str = ","
    encoding: str = "utf-8"
    items_path: Path | None = None
    item_title_column: str | None = "title"
    item_year_column: str | None = "year"
    item_genres_column: str | None = "genres"
    genres_separator: str = "|"
    kind: Literal["tabular"] = "tabular"


Source = SyntheticSource | MovieLensSource | RecBoleSource | TabularSource


# What an ingestion writes; all of it is staged, and published only once every file passed.
_RAW_FILES = ("raw_interactions", "raw_items", "ground_truth")


def ingest(source: Source, paths: ArtifactPaths) -> IngestReport:
    """Write `raw/interactions.parquet`, `raw/items.parquet` (and ground truth when synthetic).

    Every file is written to a scratch directory first and moved into place only when all of
    them were read and checked: a refused input leaves the previous raw files as they were."""
    paths.raw_dir.mkdir(parents=True, exist_ok=True)
    with scratch_dir(paths.raw_dir) as scratch:
        staged = ArtifactPaths(Path(scratch))
        staged.raw_dir.mkdir()
        report = _ingest_into(source, staged)
        for name in _RAW_FILES:
            if getattr(staged, name).exists():  # same filesystem: each an atomic rename
                os.replace(getattr(staged, name), getattr(paths, name))
    return report


def _ingest_into(source: Source, paths: ArtifactPaths) -> IngestReport:
    if isinstance(source, SyntheticSource):
        return _ingest_synthetic(source, paths)
    con = duckdb.connect()
    try:
        if isinstance(source, MovieLensSource):
            return _ingest_movielens(con, source, paths)
        if isinstance(source, RecBoleSource):
            return _ingest_recbole(con, source, paths)
        return _ingest_tabular(con, source, paths)
    finally:
        con.close()


def _ingest_synthetic(source: SyntheticSource, paths: ArtifactPaths) -> IngestReport:
    items = synthetic.generate_items(source.config)
    rows = 0
    # Both files stream side by side and land together: interactions, then their ground truth.
    with (
        atomic_path(paths.raw_interactions) as inter_tmp,
        atomic_path(paths.ground_truth) as truth_tmp,
        parquet_writer(inter_tmp, synthetic.INTERACTION_SCHEMA) as inter_out,
        parquet_writer(truth_tmp, synthetic.GROUND_TRUTH_SCHEMA) as truth_out,
    ):
        for inter, truth in synthetic.iter_interaction_batches(source.config, items):
            inter_out.write_batch(inter.cast(synthetic.INTERACTION_SCHEMA))
            truth_out.write_batch(truth.cast(synthetic.GROUND_TRUTH_SCHEMA))
            rows += inter.num_rows
    write_parquet(items, paths.raw_items)
    return IngestReport(
        rows=rows, files=["synthetic generator"], notes=[f"seed={source.config.seed}"]
    )


def _write_catalog(
    con: duckdb.DuckDBPyConnection,
    select_sql: str,
    out: Path,
    source: Path | None = None,
    names: dict[str, str] | None = None,
) -> None:
    """Write a catalog SELECT (item_id, title, year, genres, ...) with contract types. When it
    reads the item file `source`, screen it for control characters first; `names` are the
    file's own names for item_id, title and genres (for the message)."""
    typed = (
        "SELECT CAST(item_id AS VARCHAR) AS item_id, CAST(title AS VARCHAR) AS title, "
        "CAST(year AS SMALLINT) AS year, CAST(genres AS VARCHAR[]) AS genres, * EXCLUDE "
        f"(item_id, title, year, genres) FROM ({select_sql})"
    )
    if source is not None:
        names = {"item_id": "item_id", "title": "title", "genres": "genres", **(names or {})}
        refuse_control_characters(con, f"({typed})", source, names, lists=["genres"])
    copy_to_parquet(con, typed, out)


_YEAR_FROM_TITLE = r"regexp_extract(title, '\((\d{4})\)\s*$', 1)"
_TITLE_WITHOUT_YEAR = r"trim(regexp_replace(title, '\s*\(\d{4}\)\s*$', ''))"
_HEADERLESS_RATINGS = {"ml-100k": ("u.data", "\t"), "ml-1m": ("ratings.dat", "::")}
"""The older MovieLens layouts' ratings file and delimiter; the newer ones have ratings.csv."""


def movielens_variant(path: Path) -> str:
    """Which GroupLens layout a directory holds, from its files."""
    if (path / "u.data").exists():
        return "ml-100k"
    if (path / "ratings.dat").exists():
        return "ml-1m"
    if (path / "ratings.csv").exists():
        return "ml-20m"
    raise DataSourceError(
        f"{path} holds no MovieLens ratings file (looked for u.data, ratings.dat, ratings.csv); "
        "point `path` at the unzipped GroupLens directory, or set `download` to fetch one."
    )


def download_movielens(name: str, dest: Path) -> Path:
    """Fetch a GroupLens archive, check it against the published MD5, unzip to `dest/<name>`."""
    if name not in MOVIELENS_ARCHIVES:
        raise DataSourceError(
            f"unknown MovieLens archive {name!r}; choose one of {MOVIELENS_ARCHIVES}."
        )
    target = dest / name
    if target.exists():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    url = f"{MOVIELENS_BASE_URL}/{name}.zip"
    archive = dest / f"{name}.zip"
    with urllib.request.urlopen(f"{url}.md5", timeout=60) as response:
        text = response.read().decode()  # "MD5 (ml-1m.zip) = <hex>" or "<hex>  ml-1m.zip"
    expected = (text.rsplit("=", 1)[-1] if "=" in text else text.split()[0]).strip().lower()
    with atomic_path(archive) as tmp:
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=60) as response, tmp.open("wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected:
            raise DataSourceError(
                f"{url} has MD5 {digest.hexdigest()}, GroupLens publishes {expected}; retry the download."
            )
    with atomic_path(target) as tmp, zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
        inner = tmp / name
        if inner.is_dir():  # archives hold one top-level folder
            for child in inner.iterdir():
                child.rename(tmp / child.name)
            inner.rmdir()
    return target


_MOVIELENS_FIX = "Restore the original GroupLens file (re-download or re-extract the archive)."


def _ingest_movielens(
    con: duckdb.DuckDBPyConnection, source: MovieLensSource, paths: ArtifactPaths
) -> IngestReport:
    root = Path(source.path)
    if source.download and not root.exists():
        root = download_movielens(source.download, root.parent)
    variant = movielens_variant(root)
    columns = InteractionColumns()
    if variant in _HEADERLESS_RATINGS:
        file, delimiter = _HEADERLESS_RATINGS[variant]
        names = ["user_id", "item_id", "rating", "timestamp"]
        ratings = DelimitedFile(root / file, delimiter, header=False, columns=names)
    else:
        ratings = DelimitedFile(root / "ratings.csv", ",", header=True)
        columns = InteractionColumns(user_id="userId", item_id="movieId")
    rel = delimited_relation(con, ratings)
    # The headerless files are read unquoted: a stray quote character is then just text.
    if variant == "ml-100k":
        movies = DelimitedFile(
            root / "u.item", "|", header=False, encoding="latin-1", quote="",
            columns=["item_id", "title", "release_date", "video_release_date", "url", *ML100K_GENRES],
        )  # fmt: skip
        mrel = delimited_relation(con, movies)
        flags = ", ".join(
            f"CASE WHEN {sql_identifier(g)} = '1' THEN {sql_literal(g)} END"
            for g in ML100K_GENRES[1:]
        )
        catalog = (
            f"SELECT item_id, {_TITLE_WITHOUT_YEAR} AS title, "
            f"COALESCE(TRY_CAST(nullif({_YEAR_FROM_TITLE}, '') AS SMALLINT), "
            "TRY_CAST(right(release_date, 4) AS SMALLINT)) AS year, "
            f"list_filter([{flags}], lambda g: g IS NOT NULL) AS genres FROM {mrel}"
        )
        item_col = "item_id"
    else:
        if variant == "ml-1m":
            movies = DelimitedFile(
                root / "movies.dat",
                "::",
                header=False,
                encoding="latin-1",
                quote="",
                columns=["item_id", "title", "genres"],
            )
        else:
            movies = DelimitedFile(root / "movies.csv", ",", header=True)
            require_columns(con, rel, ratings.path, ["userId", "movieId", "rating", "timestamp"])
        mrel = delimited_relation(con, movies)
        item_col = "movieId" if variant != "ml-1m" else "item_id"
        require_columns(con, mrel, movies.path, [item_col, "title", "genres"])
        catalog = (
            f"SELECT {item_col} AS item_id, {_TITLE_WITHOUT_YEAR} AS title, "
            f"TRY_CAST(nullif({_YEAR_FROM_TITLE}, '') AS SMALLINT) AS year, "
            "list_filter(string_split(genres, '|'), lambda g: g <> '(no genres listed)') AS genres "
            f"FROM {mrel}"
        )
    with read_errors(ratings.path, _MOVIELENS_FIX):
        rows = write_interactions(con, rel, ratings.path, columns, paths.raw_interactions)
    with read_errors(movies.path, _MOVIELENS_FIX):
        _write_catalog(con, catalog, paths.raw_items, movies.path, {"item_id": item_col})
    return IngestReport(
        rows=rows,
        files=[str(ratings.path), str(movies.path)],
        notes=[f"MovieLens layout {variant}"],
    )


def _parse_atomic_header(con: duckdb.DuckDBPyConnection, path: Path) -> tuple[str, dict[str, str]]:
    """RecBole atomic files are tab-separated with `name:type` headers; map name -> raw header."""
    rel = delimited_relation(con, DelimitedFile(path, "\t", header=True, quote=""))
    names = {}
    for raw in [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {rel}").fetchall()]:
        name, _, kind = raw.partition(":")
        if kind not in ("token", "token_seq", "float", "float_seq"):
            raise DataSourceError(
                f"{path}: header field {raw!r} is not `name:type` with type token, token_seq, "
                "float or float_seq; RecBole atomic files need typed headers (e.g. `item_id:token`)."
            )
        names[name] = raw
    return rel, names


_RECBOLE_FIX = "Re-export it as a RecBole atomic file: tab-separated, one `name:type` header line."


def _ingest_recbole(
    con: duckdb.DuckDBPyConnection, source: RecBoleSource, paths: ArtifactPaths
) -> IngestReport:
    root = Path(source.path)
    name = source.name or root.name
    inter = root / f"{name}.inter"
    check_file(inter, "RecBole interaction")
    rel, names = _parse_atomic_header(con, inter)
    _require_fields(inter, names, ("user_id", "item_id", "timestamp"), "sequential data needs")
    columns = InteractionColumns(
        user_id=names["user_id"], item_id=names["item_id"], timestamp=names["timestamp"],
        rating=names.get("rating"),
    )  # fmt: skip
    with read_errors(inter, _RECBOLE_FIX):
        rows = write_interactions(con, rel, inter, columns, paths.raw_interactions)
    files = [str(inter)]
    item_file = root / f"{name}.item"
    if item_file.exists():
        irel, inames = _parse_atomic_header(con, item_file)
        _require_fields(item_file, inames, ("item_id",), "item files need")
        title = next((inames[k] for k in ("movie_title", "title", "name") if k in inames), None)
        year = next((inames[k] for k in ("release_year", "year") if k in inames), None)
        genre = next(
            (inames[k] for k in ("class", "genre", "genres", "categories") if k in inames), None
        )
        catalog = (
            f"SELECT {sql_identifier(inames['item_id'])} AS item_id, "
            + (sql_identifier(title) if title else "NULL")
            + " AS title, "
            + (
                f"TRY_CAST(TRY_CAST({sql_identifier(year)} AS DOUBLE) AS SMALLINT)"
                if year
                else "NULL"
            )
            + " AS year, "
            + (f"string_split(trim({sql_identifier(genre)}), ' ')" if genre else "[]::VARCHAR[]")
            + f" AS genres FROM {irel}"
        )
        shown = {"item_id": inames["item_id"], "title": title or "", "genres": genre or ""}
        with read_errors(item_file, _RECBOLE_FIX):
            _write_catalog(con, catalog, paths.raw_items, item_file, shown)
        files.append(str(item_file))
    else:
        _write_catalog_from_interactions(con, paths)
    return IngestReport(rows=rows, files=files, notes=[f"RecBole dataset {name}"])


def _require_fields(path: Path, names: dict[str, str], need: tuple[str, ...], what: str) -> None:
    for field_name in need:
        if field_name not in names:
            kind = "float" if field_name == "timestamp" else "token"
            raise DataSourceError(
                f"{path} has no `{field_name}` field (fields: {sorted(names)}); RecBole "
                f"{what} the column `{field_name}:{kind}`."
            )


def _write_catalog_from_interactions(con: duckdb.DuckDBPyConnection, paths: ArtifactPaths) -> None:
    """No item file: a catalog of bare ids, so downstream joins still work."""
    _write_catalog(
        con,
        f"SELECT DISTINCT item_id, item_id AS title, NULL AS year, []::VARCHAR[] AS genres "
        f"FROM {read_parquet(paths.raw_interactions)} ORDER BY item_id",
        paths.raw_items,
    )


_TABULAR_FIX = (
    "Re-export it as a CSV with a header row (check `delimiter` in the source config) or as "
    "Parquet."
)


def _ingest_tabular(
    con: duckdb.DuckDBPyConnection, source: TabularSource, paths: ArtifactPaths
) -> IngestReport:
    path = Path(source.path)
    check_file(path, "interaction")
    with read_errors(path, _TABULAR_FIX):
        rel = _tabular_relation(con, path, source.delimiter, source.encoding)
        rows = write_interactions(con, rel, path, source.columns, paths.raw_interactions)
    files = [str(path)]
    if source.items_path is None:
        _write_catalog_from_interactions(con, paths)
        return IngestReport(rows=rows, files=files, notes=["no item file: titles are item ids"])
    items_path = Path(source.items_path)
    check_file(items_path, "item")
    with read_errors(items_path, _TABULAR_FIX):
        _write_tabular_catalog(con, source, items_path, paths.raw_items)
    files.append(str(items_path))
    return IngestReport(rows=rows, files=files)


def _write_tabular_catalog(
    con: duckdb.DuckDBPyConnection, source: TabularSource, items_path: Path, out: Path
) -> None:
    irel = _tabular_relation(con, items_path, source.delimiter, source.encoding)
    item_col = source.columns.item_id
    present = set(require_columns(con, irel, items_path, [item_col]))

    def col(name: str | None, fallback: str) -> str:
        return sql_identifier(name) if name and name in present else fallback

    genres = col(source.item_genres_column, "NULL")
    genres_sql = (
        "[]::VARCHAR[]"
        if genres == "NULL"
        else f"list_filter(string_split(CAST({genres} AS VARCHAR), {sql_literal(source.genres_separator)}), lambda g: g <> '')"
    )
    mapped = {
        item_col,
        source.item_title_column,
        source.item_year_column,
        source.item_genres_column,
    }
    extras = sorted(c for c in present if c not in mapped)
    if reserved := [c for c in extras if c in RESERVED_ITEM_COLUMNS]:
        raise DataSourceError(
            f"{items_path}: column {', '.join(repr(c) for c in reserved)} has a name the "
            f"pipeline adds to the catalog itself ({', '.join(RESERVED_ITEM_COLUMNS)}); rename "
            "it in the item file."
        )
    extra_sql = "".join(f", {sql_identifier(c)}" for c in extras)
    catalog = (
        f"SELECT {sql_identifier(item_col)} AS item_id, "
        f"COALESCE({col(source.item_title_column, 'NULL')}, {sql_identifier(item_col)}) AS title, "
        f"TRY_CAST(TRY_CAST({col(source.item_year_column, 'NULL')} AS DOUBLE) AS SMALLINT) AS year, "
        f"{genres_sql} AS genres{extra_sql} FROM {irel}"
    )
    names = {"item_id": item_col, "title": source.item_title_column or item_col}
    _write_catalog(
        con, catalog, out, items_path, {**names, "genres": source.item_genres_column or ""}
    )


def _tabular_relation(
    con: duckdb.DuckDBPyConnection, path: Path, delimiter: str, encoding: str
) -> str:
    """A scan of `path`; a Parquet file's footer is read here, so a corrupt one fails early."""
    if path.suffix.lower() in (".parquet", ".pq"):
        relation_columns(con, read_parquet(path))
        return read_parquet(path)
    return delimited_relation(con, DelimitedFile(path, delimiter, header=True, encoding=encoding))


__all__ = [
    "DataSourceError",
    "MovieLensSource",
    "RecBoleSource",
    "Source",
    "SyntheticSource",
    "TabularSource",
    "TimestampUnit",
    "ingest",
]
