"""Sequences: k-core filter, rating threshold, chronology with stable ties, id remap, split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsae_pipeline.data.ingest import DataSourceError
from recsae_pipeline.data.sequences import (
    SequenceConfig,
    build_sequences,
    read_sequences,
    split_positions,
)
from recsae_pipeline.storage.registry import ArtifactPaths


def write_raw(paths: ArtifactPaths, rows: list[tuple[str, str, int, float | None]]) -> None:
    paths.raw_dir.mkdir(parents=True, exist_ok=True)
    users, items, ts, ratings = zip(*rows, strict=True)
    table = pa.table(
        {
            "user_id": pa.array(users, pa.string()),
            "item_id": pa.array(items, pa.string()),
            "timestamp": pa.array(ts, pa.int64()),
            "rating": pa.array(ratings, pa.float32()),
        }
    )
    pq.write_table(table, paths.raw_interactions)


def in_order(sequences: dict[str, str | list[str]]) -> list[tuple[str, str, int, float]]:
    """Raw rows of each user's items at timestamps 0, 1, ..., rated 5 (an id per letter in a
    string)."""
    return [
        (user, item, t, 5.0) for user, items in sequences.items() for t, item in enumerate(items)
    ]


def sequences_by_user(paths: ArtifactPaths) -> dict[str, list[str]]:
    item_ids = {r["item_idx"]: r["item_id"] for r in pq.read_table(paths.item_map).to_pylist()}
    users = {r["user_idx"]: r["user_id"] for r in pq.read_table(paths.user_map).to_pylist()}
    return {
        users[r["user_idx"]]: [item_ids[i] for i in r["items"]]
        for r in pq.read_table(paths.sequences).to_pylist()
    }


def test_chronological_with_stable_tie_break_and_padding_free_indices(paths: ArtifactPaths) -> None:
    # u1 watched b and a at the same second: the file order (b first) must be kept.
    write_raw(
        paths,
        [
            ("u1", "c", 30, 5),
            ("u1", "b", 10, 5),
            ("u1", "a", 10, 5),
            ("u2", "a", 1, 5),
            ("u2", "b", 2, 5),
            ("u2", "c", 3, 5),
        ],
    )
    stats = build_sequences(paths, SequenceConfig(user_core=3, item_core=1))
    assert sequences_by_user(paths) == {"u1": ["b", "a", "c"], "u2": ["a", "b", "c"]}
    seq = pq.read_table(paths.sequences)
    assert seq.schema.field("user_idx").type == pa.int32()
    assert seq.schema.field("items").type.value_type == pa.int32()
    assert seq.column("timestamps").to_pylist()[0] == [10, 10, 30]
    assert min(min(s) for s in seq.column("items").to_pylist()) == 1  # 0 stays padding
    assert (stats.users, stats.items, stats.interactions) == (2, 3, 6)
    assert stats.density == pytest.approx(1.0)


def test_k_core_is_iterative(paths: ArtifactPaths) -> None:
    write_raw(paths, in_order({"u1": "abcd", "u2": "abc", "u3": "abc", "u4": "def"}))
    stats = build_sequences(paths, SequenceConfig(user_core=3, item_core=2))
    # e, f (1 each) go -> u4 keeps only d -> u4 goes -> d has 1 left -> d goes; u1 keeps a b c.
    assert sequences_by_user(paths) == {"u1": list("abc"), "u2": list("abc"), "u3": list("abc")}
    assert stats.core_iterations >= 3
    assert stats.raw_interactions - stats.interactions == 4


def test_k_core_that_removes_everyone_explains_the_fix(paths: ArtifactPaths) -> None:
    write_raw(paths, [("u1", "a", 1, 5), ("u1", "b", 2, 5)])
    with pytest.raises(DataSourceError, match="lower `user_core`"):
        build_sequences(paths, SequenceConfig(user_core=3, item_core=1))


def test_rating_threshold(paths: ArtifactPaths) -> None:
    write_raw(
        paths,
        [("u1", i, t, r) for t, (i, r) in enumerate([("a", 5), ("b", 1), ("c", 4), ("d", 4.5)])],
    )
    build_sequences(paths, SequenceConfig(user_core=3, item_core=1, min_rating=4.0))
    assert sequences_by_user(paths) == {"u1": ["a", "c", "d"]}


def test_item_index_is_by_popularity(paths: ArtifactPaths) -> None:
    users = {"u1": ["rare", "hit", "mid"], "u2": ["hit", "mid", "x"], "u3": ["hit", "y", "z"]}
    write_raw(paths, in_order(users))
    build_sequences(paths, SequenceConfig(user_core=3, item_core=1))
    order = [r["item_id"] for r in pq.read_table(paths.item_map).to_pylist()]
    assert order[:2] == ["hit", "mid"]


def test_split_positions_and_reader(paths: ArtifactPaths) -> None:
    assert split_positions(5) == (2, 3, 4)
    np.testing.assert_array_equal(split_positions(np.array([3, 4]))[2], [2, 3])
    with pytest.raises(ValueError):
        split_positions(2)
    write_raw(paths, in_order({"u1": "abc", "u2": "cab"}))
    build_sequences(paths, SequenceConfig(user_core=3, item_core=1))
    seqs, num_items = read_sequences(paths.sequences)
    assert num_items == 3 and len(seqs) == 2 and all(s.dtype == np.int32 for s in seqs)


def test_user_core_below_split_minimum_is_refused(paths: ArtifactPaths) -> None:
    write_raw(paths, [("u1", "a", 1, 5)])
    with pytest.raises(DataSourceError, match="user_core >= 3"):
        build_sequences(paths, SequenceConfig(user_core=2))


def test_failed_rebuild_keeps_previous_sequences(tmp_path: Path, paths: ArtifactPaths) -> None:
    write_raw(paths, in_order({"u1": "abc"}))
    build_sequences(paths, SequenceConfig(user_core=3, item_core=1))
    before = paths.sequences.read_bytes()
    with pytest.raises(DataSourceError):
        build_sequences(paths, SequenceConfig(user_core=10, item_core=1))
    assert paths.sequences.read_bytes() == before
