"""Fuzzed input files: every reader ends in a `DataSourceError` naming the file, or in tables
that meet the raw contracts, with nothing half-written (issue 13, items 3 and 6).

The properties live in `fuzz_support.check_case`; `benchmarks/fuzz_readers.py` runs them with
thousands of examples. Each break the fuzzing found is pinned below by its smallest input.
"""

from __future__ import annotations

import re
import tempfile
from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from recsae_pipeline.data.ingest import DataSourceError
from recsae_pipeline.data.sources import ingest
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline_tests import fuzz_support
from recsae_pipeline_tests.fuzz_support import (
    CONTROL_CHARACTERS,
    READERS,
    Case,
    Failure,
    base_files,
    case_of,
    cases,
    check_case,
    known_break,
    set_field,
)

FUZZ = settings(
    max_examples=30,  # ~0.1 s each: a few seconds per reader; the benchmark runs thousands
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=30),  # a busy shared machine, not a hang (that is HANG_SECONDS)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def check(case: Case, tmp_path: Path) -> Failure | None:
    return check_case(case, Path(tempfile.mkdtemp(dir=tmp_path)))


@pytest.mark.parametrize("reader", sorted(READERS))
def test_valid_files_of_every_layout_pass_the_property(reader: str, tmp_path: Path) -> None:
    """The unmutated layouts are accepted: the property can fail for reasons other than input."""
    for layout in READERS[reader]:
        files = base_files(layout)
        case = case_of(layout, files, files[0].name, files[0].render(), "valid")
        assert check(case, tmp_path) is None, layout


def test_check_case_reports_crashes_contract_breaks_and_leftovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The property is not vacuous: a reader that crashes, writes a table off the contract or
    leaves a temp file is reported, and none of them passes as a known break."""
    files = base_files("csv")
    case = case_of("csv", files, files[0].name, files[0].render(), "valid")

    def crash(source, paths):
        raise RuntimeError("boom")

    def off_contract(source, paths):
        pq.write_table(pa.table({"user_id": [1]}), paths.raw_interactions)

    def leftover(source, paths):
        (paths.raw_dir / ".interactions.parquet.1234.tmp").write_bytes(b"")

    for reader, signature in (
        (crash, "builtins.RuntimeError"),
        (off_contract, "accepted, but raw interactions columns"),
        (leftover, "temp files left"),
    ):
        monkeypatch.setattr(fuzz_support, "ingest", reader)
        failure = check(case, tmp_path)
        assert failure is not None and signature in failure.signature, failure
        assert known_break(failure) is None


def _fuzz(reader: str):
    @FUZZ
    @given(case=cases(reader))
    def run(case: Case, tmp_path: Path) -> None:
        event(case.input_class.split(" in ")[0])
        failure = check(case, tmp_path)
        assert failure is None or known_break(failure), (
            f"{case.input_class}: {failure}\ninput {case.mutated}: {dict(case.files)[case.mutated]!r}"
        )

    return run


test_fuzz_tabular_reader = _fuzz("tabular")
test_fuzz_movielens_reader = _fuzz("movielens")
test_fuzz_recbole_reader = _fuzz("recbole")


# --- issue 13, item 3: control characters are refused, naming file, column, row and fix ----
#
# Expected message (the format of ingest.py's other field errors):
#   {path}: field `{column}` holds control character U+{code:04X} in {n} of {rows} rows
#   (first at data row {row}: {value!r}); remove control characters (C0 other than tab, and
#   DEL) from ids, titles and genre names, then re-export the file.
# `column` is the file's own name for the field (`item_id:token` in RecBole, `movieId` in
# ml-20m; the contract name for headerless files), `row` counts data rows from 1.

# (layout, file, data row index, field index, column named in the message)
CONTROL_CASES = [
    ("csv", "interactions.csv", 1, 0, "user_id"),
    ("csv", "interactions.csv", 2, 1, "item_id"),
    ("parquet", "interactions.parquet", 1, 1, "item_id"),
    ("csv", "items.csv", 0, 0, "item_id"),
    ("csv", "items.csv", 1, 1, "title"),
    ("tsv", "items.tsv", 1, 3, "genres"),
    ("csv+parquet items", "items.parquet", 0, 3, "genres"),
    ("ml-100k", "u.data", 1, 1, "item_id"),
    ("ml-100k", "u.item", 1, 1, "title"),
    ("ml-1m", "ratings.dat", 0, 0, "user_id"),
    ("ml-1m", "movies.dat", 1, 1, "title"),
    ("ml-1m", "movies.dat", 1, 2, "genres"),
    ("ml-20m", "ratings.csv", 1, 1, "movieId"),
    ("ml-20m", "movies.csv", 0, 1, "title"),
    ("ml-20m", "movies.csv", 0, 2, "genres"),
    ("recbole", "x.inter", 1, 1, "item_id:token"),
    ("recbole", "x.item", 0, 1, "movie_title:token_seq"),
    ("recbole", "x.item", 1, 3, "class:token_seq"),
]
CHARS = ["\x00", "\x1b", "\x7f", "\x08", "\x0b"]


def control_case(layout: str, name: str, row: int, col: int, char: str) -> Case:
    files = base_files(layout)
    target = next(f for f in files if f.name == name)
    value = target.rows[row][col]
    at = len(value) // 2  # inside the value; in a genre list, inside one genre name
    changed = set_field(target, row, col, value[:at] + char + value[at:])
    return case_of(layout, files, name, changed.render(), f"control character in {name}")


def expect_control_character_refused(
    case: Case, root: Path, column: str, row: int, char: str
) -> None:
    src = root / "src"
    src.mkdir(parents=True)
    for name, data in case.files:
        (src / name).write_bytes(data)
    with pytest.raises(DataSourceError) as info:
        ingest(case.source(src), ArtifactPaths(root / "store"))
    message = str(info.value)
    for pattern in (
        re.escape(str(src / case.mutated)),
        re.escape(f"field `{column}`"),
        rf"control character U\+{ord(char):04X}",
        r"in 1 of \d+ rows",
        rf"first at data row {row + 1}\b",
        r"remove control characters",
    ):
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"


@pytest.mark.parametrize(("layout", "name", "row", "col", "column"), CONTROL_CASES)
def test_control_character_is_refused_naming_file_column_and_row(
    layout: str, name: str, row: int, col: int, column: str, tmp_path: Path
) -> None:
    char = CHARS[CONTROL_CASES.index((layout, name, row, col, column)) % len(CHARS)]
    case = control_case(layout, name, row, col, char)
    expect_control_character_refused(case, tmp_path, column, row, char)


@settings(FUZZ, max_examples=20)
@given(
    spec=st.sampled_from(CONTROL_CASES),
    char=st.sampled_from([c for c in CONTROL_CHARACTERS if c not in "\n\r"]),  # not row breaks
)
def test_any_control_character_in_an_id_title_or_genre_is_refused(
    spec: tuple[str, str, int, int, str], char: str, tmp_path: Path
) -> None:
    layout, name, row, col, column = spec
    case = control_case(layout, name, row, col, char)
    expect_control_character_refused(case, Path(tempfile.mkdtemp(dir=tmp_path)), column, row, char)


def test_tab_inside_a_title_is_kept(tmp_path: Path) -> None:
    """Tab is the one C0 character the screening allows (in a comma-separated file)."""
    case = control_case("csv", "items.csv", 1, 1, "\t")
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    assert check_case(case, root) is None
    titles = pq.read_table(ArtifactPaths(root / "store").raw_items).column("title").to_pylist()
    assert "Al\tien" in titles


# --- breaks found by the fuzzing: each input class, with a minimal input --------------------
#
# Each broke the property before it was fixed (a raw DuckDB error, a KeyError, a catalog
# Binder error, a partial write, or a NaN accepted); each now ends in a `DataSourceError`
# naming the file (the property) whose message says what is wrong (the pattern).

BREAKS = {
    "corrupt Parquet file": ("parquet", "interactions.parquet", b"PAR1", "too small to be a Parquet"),
    "corrupt Parquet item file": ("csv+parquet items", "items.parquet", b"\x00", "cannot be read"),
    "Parquet file cut short": ("parquet", "interactions.parquet", None, "cannot be read"),
    "extra field on a headerless MovieLens line": (
        "ml-100k", "u.data", b"196\t242\t3\t881250949\tx\n",
        "line 1 has 5 fields where 4 are expected. Restore the original GroupLens file",
    ),
    "extra field on a MovieLens ml-1m movies.dat line": (
        "ml-1m", "movies.dat", b"1193::Heat (1995)::Drama::x\n", "line 1 has 4 fields where 3",
    ),
    "byte 0x80-0x9f in a latin-1 MovieLens file": (
        "ml-1m", "movies.dat", b"1193::Heat\x85 (1995)::Drama\n",
        r"byte 0x85 at byte offset 10 \(line 1\) is a C1 control code.*re-save it as UTF-8",
    ),
    "\\x01 (the quote character) in a MovieLens item line": (
        "ml-100k", "u.item", b"242|\x01Kolya (1996)\n",
        "field `title` holds control character U\\+0001 in 1 of 1 rows",
    ),
    "RecBole .item without an item_id field": (
        "recbole", "x.item", b"movie_title:token_seq\nKolya\n",
        "no `item_id` field .*`item_id:token`",
    ),
    "item file refused after the interactions were published (tabular)": (
        "csv", "items.csv", b"title\nHeat\n", "no column 'item_id'",
    ),
    "item file refused after the interactions were published (RecBole)": (
        "recbole", "x.item", b"", r"empty \(0 bytes\)",
    ),
    "item file with a column named file_row_number": (
        "csv", "items.csv", b"item_id,title,file_row_number\ni1,Heat,1\n",
        "column 'file_row_number' has a name the pipeline adds.*rename it",
    ),
    "item file with a column named interactions": (
        "csv", "items.csv", b"item_id,title,interactions\ni1,Heat,1\n", "column 'interactions'",
    ),
    "NaN rating": (
        "csv", "interactions.csv", b"user_id,item_id,timestamp,rating\nu1,i1,1700000000,nan\n",
        "field `rating` is not a number in 1 of 1 rows \\(first at data row 1: 'nan'\\)",
    ),
    "rating overflowing float32 (1e308 -> inf)": (
        "csv", "interactions.csv", b"user_id,item_id,timestamp,rating\nu1,i1,1700000000,1e308\n",
        "field `rating` is not a number.*'1e308'.*finite",
    ),
    "infinite rating": (
        "tsv", "interactions.tsv", b"user_id\titem_id\ttimestamp\trating\nu1\ti1\t1700000000\t-inf\n",
        "field `rating` is not a number",
    ),
    "NUL byte inside an item id": (
        "csv", "interactions.csv", b"user_id,item_id,timestamp,rating\nu1,i\x001,1700000000,4\n",
        "field `item_id` holds control character U\\+0000 in 1 of 1 rows \\(first at data row 1: "
        "'i\\\\x001'\\)",
    ),
}  # fmt: skip


def test_the_property_catches_every_class_when_the_fix_is_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`check_case` reports a reader that lets a DuckDB error escape or publishes the
    interactions before refusing the items: the repros below can fail."""

    def raw_error(source, paths):
        raise duckdb.InvalidInputException("CSV Error on Line: 1")

    def partial(source, paths):
        paths.raw_interactions.write_bytes(b"new")
        raise DataSourceError(str(source.items_path))

    for reader, signature in (
        (raw_error, "_duckdb.InvalidInputException"),
        (partial, "partial write"),
    ):
        monkeypatch.setattr(fuzz_support, "ingest", reader)
        layout, name, data, _ = BREAKS[
            "item file refused after the interactions were published (tabular)"
        ]
        failure = check(case_of(layout, base_files(layout), name, data, "x"), tmp_path)
        assert failure is not None and signature in failure.signature, failure


@pytest.mark.parametrize("input_class", sorted(BREAKS))
def test_break_found_by_fuzzing_is_refused_naming_the_file(
    input_class: str, tmp_path: Path
) -> None:
    layout, name, data, pattern = BREAKS[input_class]
    files = base_files(layout)
    if data is None:  # cut a valid file in half
        data = next(f for f in files if f.name == name).render()
        data = data[: len(data) // 2]
    case = case_of(layout, files, name, data, input_class)
    assert check(case, tmp_path) is None
    src = Path(tempfile.mkdtemp(dir=tmp_path))
    for file_name, content in case.files:
        (src / file_name).write_bytes(content)
    with pytest.raises(DataSourceError) as info:
        ingest(case.source(src), ArtifactPaths(src / "store"))
    assert str(src / name) in str(info.value)
    assert re.search(pattern, str(info.value)), str(info.value)
