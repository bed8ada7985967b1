"""Bad input fails with a message naming the file, the field, how many rows and the fix,
and never damages what an earlier run materialized."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recsae_pipeline.data.dropfolder import read_drop
from recsae_pipeline.data.ingest import DataSourceError, InteractionColumns
from recsae_pipeline.data.sources import MovieLensSource, TabularSource, ingest
from recsae_pipeline.data.validation import QualityBounds
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline_tests.conftest import write_text

GOOD = (
    "user_id,item_id,timestamp,rating\nu1,i1,1700000000,4\nu1,i2,1700000100,5\nu2,i1,1700000200,3\n"
)


def ingest_csv(path: Path, paths: ArtifactPaths, **kwargs) -> None:
    ingest(TabularSource(path=path, **kwargs), paths)


def expect_error(path: Path, paths: ArtifactPaths, *patterns: str, **kwargs) -> str:
    with pytest.raises(DataSourceError) as info:
        ingest_csv(path, paths, **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    return message


def test_missing_column_lists_what_the_file_has(tmp_path: Path, paths: ArtifactPaths) -> None:
    f = write_text(tmp_path / "a.csv", "user_id,item_id,rating\nu1,i1,4\n")
    expect_error(
        f,
        paths,
        "no column 'timestamp'",
        r"columns found: \['user_id', 'item_id', 'rating'\]",
        "map it",
    )


def test_wrong_delimiter_is_named(tmp_path: Path, paths: ArtifactPaths) -> None:
    f = write_text(tmp_path / "a.csv", GOOD.replace(",", ";"))
    expect_error(f, paths, "no column", "looks ';'-separated", "`delimiter`")


def test_non_numeric_timestamps_counted_with_example(tmp_path: Path, paths: ArtifactPaths) -> None:
    f = write_text(tmp_path / "a.csv", GOOD + "u3,i1,yesterday,4\nu3,i2,soon,4\n")
    expect_error(
        f, paths, "field `timestamp`", "2 of 5 rows", "data row 4: 'yesterday'", "timestamp_unit"
    )


def test_negative_timestamps(tmp_path: Path, paths: ArtifactPaths) -> None:
    f = write_text(tmp_path / "a.csv", GOOD + "u3,i1,-5,4\n")
    expect_error(f, paths, "field `timestamp` is negative in 1 of 4 rows", "drop or repair")


def test_timestamp_overflowing_int64(tmp_path: Path, paths: ArtifactPaths) -> None:
    f = write_text(tmp_path / "a.csv", GOOD + "u3,i1,99999999999999999999999,4\n")
    expect_error(f, paths, "within int64", "1 of 4 rows", "99999999999999999999999")


def test_empty_file(tmp_path: Path, paths: ArtifactPaths) -> None:
    f = write_text(tmp_path / "a.csv", "")
    expect_error(f, paths, "empty \\(0 bytes\\)")


def test_header_only_file(tmp_path: Path, paths: ArtifactPaths) -> None:
    f = write_text(tmp_path / "a.csv", "user_id,item_id,timestamp,rating\n")
    expect_error(f, paths, "no data rows")


def test_non_utf8_bytes_give_line_and_encoding_fix(tmp_path: Path, paths: ArtifactPaths) -> None:
    f = write_text(
        tmp_path / "a.csv", GOOD.encode() + "u3,Caf\xe9,1700000300,4\n".encode("latin-1")
    )
    expect_error(f, paths, "not valid utf-8", "byte 0xe9", "line 5", "encoding")
    # ...and the suggested fix works.
    ingest_csv(f, paths, encoding="latin-1")
    assert pq.read_table(paths.raw_interactions).column("item_id").to_pylist()[-1] == "Café"


def test_truncated_last_line(tmp_path: Path, paths: ArtifactPaths) -> None:
    f = write_text(tmp_path / "a.csv", GOOD + "u3,i9")
    expect_error(f, paths, "field `timestamp` is empty in 1 of 4 rows", "truncated")


def test_missing_ids_in_middle_are_not_called_truncation(
    tmp_path: Path, paths: ArtifactPaths
) -> None:
    f = write_text(
        tmp_path / "a.csv",
        "user_id,item_id,timestamp,rating\nu1,,1700000000,4\nu1,,1700000001,4\nu2,i1,1700000002,4\n",
    )
    message = expect_error(f, paths, "field `item_id` is empty in 2 of 3 rows")
    assert "truncated" not in message


def test_missing_file_and_directory(tmp_path: Path, paths: ArtifactPaths) -> None:
    expect_error(tmp_path / "nope.csv", paths, "does not exist")
    with pytest.raises(DataSourceError, match="no MovieLens ratings file"):
        ingest(MovieLensSource(tmp_path), paths)


def test_failed_ingest_leaves_previous_artifacts_intact(
    tmp_path: Path, paths: ArtifactPaths
) -> None:
    good = write_text(tmp_path / "good.csv", GOOD)
    ingest_csv(good, paths)
    before = paths.raw_interactions.read_bytes()
    items_before = paths.raw_items.read_bytes()
    bad = write_text(tmp_path / "bad.csv", GOOD + "u3,i1,oops,4\n")
    with pytest.raises(DataSourceError):
        ingest_csv(bad, paths)
    assert paths.raw_interactions.read_bytes() == before
    assert paths.raw_items.read_bytes() == items_before
    assert not [p for p in paths.raw_dir.iterdir() if p.name.startswith(".")], (
        "temp files left behind"
    )


def test_bad_rating_and_unmapped_rating(tmp_path: Path, paths: ArtifactPaths) -> None:
    f = write_text(tmp_path / "a.csv", GOOD + "u3,i1,1700000300,five\n")
    expect_error(f, paths, "field `rating` is not a number in 1 of 4 rows", "rating_column: null")
    ingest_csv(f, paths, columns=InteractionColumns(rating=None))
    assert pq.read_table(paths.raw_interactions).num_rows == 4


def test_unknown_or_unsupported_encoding_is_named(tmp_path: Path, paths: ArtifactPaths) -> None:
    f = write_text(tmp_path / "a.csv", GOOD)
    expect_error(
        f, paths, "`encoding` 'klingon' is not an encoding", "'latin-1'", encoding="klingon"
    )
    expect_error(f, paths, "'cp1252' is not one the CSV reader supports", encoding="cp1252")


def test_nul_byte_inside_an_item_id_is_refused(tmp_path: Path, paths: ArtifactPaths) -> None:
    """Issue 13: a NUL in the middle of an id was stored as part of it."""
    f = write_text(tmp_path / "a.csv", GOOD + "u3,i\x009,1700000300,4\n")
    expect_error(
        f,
        paths,
        r"field `item_id` holds control character U\+0000 in 1 of 4 rows",
        r"first at data row 4: 'i\\x009'",
        r"remove control characters \(C0 other than tab, and DEL\)",
    )
    assert not paths.raw_interactions.exists()


def test_dropped_file_with_a_control_character_is_refused_unwritten(tmp_path: Path) -> None:
    """The drop folder reads drops with the same screening; nothing is written for a refused one."""
    drop = write_text(tmp_path / "drop.csv", GOOD.replace("u2", "u\x1b2"))
    out = tmp_path / "appended" / "drop.parquet"
    with pytest.raises(DataSourceError, match=r"field `user_id` holds control character U\+001B"):
        read_drop(drop, out, QualityBounds())
    assert not out.exists()
