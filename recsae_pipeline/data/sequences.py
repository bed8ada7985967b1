"""Raw interactions -> per-user chronological item sequences with a leave-one-out split.

All heavy lifting happens in DuckDB over Parquet (k-core filtering, ordering, id remapping),
so memory stays bounded for logs far larger than the embedded default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import duckdb
import numpy as np
import pyarrow.parquet as pq

from recsae_pipeline.data.ingest import DataSourceError
from recsae_pipeline.storage.atomic import copy_to_parquet, scratch_dir
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline.storage.sql import read_parquet

INT32_MAX = 2**31 - 1
DUCKDB_MEMORY_LIMIT = "2GB"
"""What an out-of-core DuckDB build over the whole log (the k-core filter, the sequences, the
sparse feature table's sort) may hold before it spills to its temp directory; DuckDB's own
default is 80% of the machine's memory, so peak memory would grow with the log."""
ArrayOrInt = TypeVar("ArrayOrInt", int, np.ndarray)
MIN_LEAVE_ONE_OUT_LENGTH = 3  # one training transition, one validation and one test target


POPULARITY_BANDS = ("head", "torso", "tail")


def item_popularity_sql(sequences: str | Path) -> str:
    """A DuckDB query of (item_idx, n, rank, band) over the item sequences: interaction
    count, popularity rank (1 = most interactions) and band, the third of all interactions
    the item falls in (`head`: the most popular items holding the first third)."""
    return f"""
        SELECT item_idx, n, rank,
               CASE WHEN before < total / 3.0 THEN 'head'
                    WHEN before < 2 * total / 3.0 THEN 'torso' ELSE 'tail' END AS band
        FROM (
            SELECT item_idx, n, row_number() OVER (ORDER BY n DESC, item_idx) AS rank,
                   sum(n) OVER (ORDER BY n DESC, item_idx ROWS UNBOUNDED PRECEDING) - n AS before,
                   sum(n) OVER () AS total
            FROM (
                SELECT item AS item_idx, count(*) AS n
                FROM (SELECT unnest(items) AS item FROM {read_parquet(sequences)})
                GROUP BY item
            )
        )"""


@dataclass(frozen=True)
class SequenceConfig:
    """How interactions become sequences."""

    user_core: int = 5  # keep users with at least this many interactions (iteratively)
    item_core: int = 5  # keep items with at least this many interactions (iteratively)
    min_rating: float | None = None  # keep only interactions rated at least this (None: all)
    max_core_iterations: int = 50


@dataclass(frozen=True)
class SequenceStats:
    """Shape of the built dataset, for asset metadata."""

    users: int
    items: int
    interactions: int
    raw_interactions: int
    core_iterations: int
    length_percentiles: dict[str, float]
    length_histogram: list[tuple[int, int, int]]  # (low, high, users) per bin

    @property
    def density(self) -> float:
        return self.interactions / max(1, self.users * self.items)


def split_positions(n_items: ArrayOrInt) -> tuple[ArrayOrInt, ArrayOrInt, ArrayOrInt]:
    """Leave-one-out for sequences of length n: (last_train_target, valid_position, test_position).

    0-based positions. Training targets are positions 1..last_train_target (each predicted from
    the prefix before it); the validation target is the second-last item, the test target the
    last. Works on ints and numpy arrays alike.
    """
    if np.any(np.asarray(n_items) < MIN_LEAVE_ONE_OUT_LENGTH):
        raise ValueError(
            f"a leave-one-out split needs {MIN_LEAVE_ONE_OUT_LENGTH}+ items per sequence"
        )
    return n_items - 3, n_items - 2, n_items - 1


def build_sequences(paths: ArtifactPaths, config: SequenceConfig) -> SequenceStats:
    """Filter, order and remap raw interactions; write sequences, item map and user map."""
    if config.user_core < MIN_LEAVE_ONE_OUT_LENGTH:
        raise DataSourceError(
            f"user_core={config.user_core} would keep users too short for a leave-one-out split; "
            f"set user_core >= {MIN_LEAVE_ONE_OUT_LENGTH}."
        )
    with scratch_dir(paths.root) as scratch:
        con = duckdb.connect(str(Path(scratch) / "build.duckdb"))
        try:
            con.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
            return _build(con, paths, config)
        finally:
            con.close()


def _build(
    con: duckdb.DuckDBPyConnection, paths: ArtifactPaths, config: SequenceConfig
) -> SequenceStats:
    # file_row_number makes the chronological order stable: ties keep the file's order.
    rating_filter = (
        "" if config.min_rating is None else f"WHERE rating >= {float(config.min_rating)}"
    )
    con.execute(
        "CREATE TABLE kept AS SELECT user_id, item_id, timestamp, file_row_number AS row_in_file "
        f"FROM {read_parquet(paths.raw_interactions, file_row_number=True)} {rating_filter}"
    )
    (raw_rows,) = con.execute(
        f"SELECT count(*) FROM {read_parquet(paths.raw_interactions)}"
    ).fetchone()  # type: ignore[misc]
    iterations = 0
    while iterations < config.max_core_iterations:
        iterations += 1
        removed = con.execute(
            f"""
            DELETE FROM kept WHERE user_id IN (
                SELECT user_id FROM kept GROUP BY user_id HAVING count(*) < {config.user_core})
              OR item_id IN (
                SELECT item_id FROM kept GROUP BY item_id HAVING count(*) < {config.item_core})
            """
        ).fetchone()
        if not removed or removed[0] == 0:
            break
    (n_users, n_items, n_rows) = con.execute(
        "SELECT count(DISTINCT user_id), count(DISTINCT item_id), count(*) FROM kept"
    ).fetchone()  # type: ignore[misc]
    if n_users == 0:
        raise DataSourceError(
            f"{paths.raw_interactions}: no user keeps {config.user_core}+ interactions after the "
            f"{config.user_core}/{config.item_core}-core filter"
            + ("" if config.min_rating is None else f" and min_rating={config.min_rating}")
            + "; lower `user_core`/`item_core` or `min_rating`."
        )
    if n_items > INT32_MAX - 1 or n_users > INT32_MAX - 1:
        raise DataSourceError(
            f"{paths.raw_interactions}: {n_items} items / {n_users} users overflow int32 indices; "
            "raise item_core/user_core to shrink the vocabulary."
        )
    # Item index by popularity (1 = most interacted), ties by id; 0 stays padding.
    con.execute(
        "CREATE TABLE item_map AS SELECT CAST(row_number() OVER (ORDER BY count(*) DESC, item_id) "
        "AS INTEGER) AS item_idx, item_id, count(*) AS interactions FROM kept GROUP BY item_id"
    )
    con.execute(
        "CREATE TABLE user_map AS SELECT CAST(row_number() OVER (ORDER BY user_id) AS INTEGER) "
        "AS user_idx, user_id FROM (SELECT DISTINCT user_id FROM kept)"
    )
    sequences_sql = """
        SELECT u.user_idx,
               list(m.item_idx ORDER BY k.timestamp, k.row_in_file) AS items,
               list(k.timestamp ORDER BY k.timestamp, k.row_in_file) AS timestamps,
               CAST(count(*) AS INTEGER) AS n_items
        FROM kept k JOIN user_map u USING (user_id) JOIN item_map m USING (item_id)
        GROUP BY u.user_idx ORDER BY u.user_idx
    """
    paths.sequences_dir.mkdir(parents=True, exist_ok=True)
    for table_sql, out in (
        ("SELECT item_idx, item_id, interactions FROM item_map ORDER BY item_idx", paths.item_map),
        ("SELECT user_idx, user_id FROM user_map ORDER BY user_idx", paths.user_map),
        (sequences_sql, paths.sequences),
    ):
        copy_to_parquet(con, table_sql, out, row_group_size=65_536)
    return _stats(con, raw_rows, iterations, n_users, n_items, n_rows)


def _stats(
    con: duckdb.DuckDBPyConnection,
    raw_rows: int,
    iterations: int,
    n_users: int,
    n_items: int,
    n_rows: int,
) -> SequenceStats:
    quantiles = [0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]
    values = con.execute(
        f"SELECT quantile_cont(c, {quantiles}) FROM (SELECT count(*) AS c FROM kept GROUP BY user_id)"
    ).fetchone()[0]  # type: ignore[index]
    lengths = dict(
        zip(["min", "p25", "p50", "p75", "p90", "p99", "max"], map(float, values), strict=True)
    )
    edges = np.unique(
        np.geomspace(max(1.0, lengths["min"]), lengths["max"] + 2, num=13).astype(int)
    )
    hist = con.execute(
        "SELECT c FROM (SELECT count(*) AS c FROM kept GROUP BY user_id)"
    ).fetchnumpy()["c"]
    counts, _ = np.histogram(hist, bins=edges)
    bins = [
        (int(lo), int(hi) - 1, int(n))
        for lo, hi, n in zip(edges[:-1], edges[1:], counts, strict=True)
    ]
    return SequenceStats(
        users=int(n_users),
        items=int(n_items),
        interactions=int(n_rows),
        raw_interactions=int(raw_rows),
        core_iterations=iterations,
        length_percentiles=lengths,
        length_histogram=bins,
    )


def read_sequences(path: str | Path) -> tuple[list[np.ndarray], int]:
    """Item sequences in user order (index i -> user_idx i+1) and the number of items.

    Reads one row group at a time: besides the int32 sequences it returns, it holds one
    row group's Arrow column, never the whole table (or a second copy of it)."""
    file = pq.ParquetFile(path)
    sequences: list[np.ndarray] = []
    num_items = 0
    for group in range(file.num_row_groups):
        items = file.read_row_group(group, columns=["items"]).column("items").combine_chunks()
        offsets = items.offsets.to_numpy()
        flat = items.values.to_numpy().astype(np.int32)  # a copy: the Arrow buffer is freed
        sequences.extend(flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1))
        if flat.size:
            num_items = max(num_items, int(flat.max()))
    return sequences, num_items
