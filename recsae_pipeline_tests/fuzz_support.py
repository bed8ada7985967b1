"""Fuzz inputs for the file readers and the property they must keep, shared by
`test_fuzz_readers.py` and `benchmarks/fuzz_readers.py`.

A case is one valid source layout (tabular CSV/TSV/Parquet, MovieLens ml-100k/ml-1m/ml-20m,
RecBole atomic files) with one file mutated. `check_case` ingests it the way the
`raw_interactions` asset does (`ingest(source, paths)`) over a storage root that already holds
a complete materialization, then builds the catalog as `item_catalog` does, and returns what
broke the property, or None.
"""

from __future__ import annotations

import re
import tempfile
import threading
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import strategies as st

from recsae_pipeline.data.catalog import MAX_YEAR, MIN_YEAR, build_catalog
from recsae_pipeline.data.ingest import DataSourceError
from recsae_pipeline.data.sources import (
    ML100K_GENRES,
    MovieLensSource,
    RecBoleSource,
    Source,
    TabularSource,
    ingest,
)
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline_tests.test_sources import RAW_SCHEMA

# The raw contract as the source tests pin it, plus the columns every raw item file starts with.
ITEM_SCHEMA = pa.schema([("item_id", pa.string()), ("title", pa.string()), ("year", pa.int16()),
                         ("genres", pa.list_(pa.string()))])  # fmt: skip
# Issue 13, item 3: C0 characters other than tab, and DEL, are refused in ids, titles, genres.
CONTROL_CHARACTERS = tuple(chr(c) for c in [*range(0x09), *range(0x0A, 0x20), 0x7F])
READERS = {
    "tabular": ("csv", "tsv", "parquet", "csv+parquet items"),
    "movielens": ("ml-100k", "ml-1m", "ml-20m"),
    "recbole": ("recbole",),
}
HANG_SECONDS = 60.0  # far above any honest read of a few hundred bytes, even on a busy machine
ODD_NUMBERS = (
    "9" * 25, "-1", "-9223372036854775809", "9223372036854775808", "nan", "NaN", "inf",
    "-inf", "1e308", "1e39", "-0", "0", "1.5", "", " ", "0x1A", "+5", "1_000", "١٢٣",
)  # fmt: skip


@dataclass(frozen=True)
class InputFile:
    """One input file as rows of text fields, and how it is written."""

    name: str
    header: tuple[str, ...] | None
    rows: tuple[tuple[str, ...], ...]
    delimiter: str = ","
    encoding: str = "utf-8"
    parquet: bool = False

    def render(self) -> bytes:
        if self.parquet:
            return _parquet_bytes(self)
        lines = [self.header] if self.header is not None else []
        text = "".join(
            self.delimiter.join(_quote(f, self.delimiter) for f in line) + "\n"
            for line in [*lines, *self.rows]
        )
        return text.encode(self.encoding, errors="replace")


def _quote(value: str, delimiter: str) -> str:
    if delimiter == "," and any(c in value for c in ',"\n\r'):
        return '"' + value.replace('"', '""') + '"'
    return value


def _parquet_column(values: list[str]) -> pa.Array:
    """Integers when every value is one that fits int64, floats when every value parses, else text."""
    if values and all(re.fullmatch(r"[+-]?\d{1,18}", v) for v in values):
        return pa.array([int(v) for v in values], pa.int64())
    try:
        return pa.array([float(v) for v in values], pa.float64())
    except ValueError:
        return pa.array(values, pa.string())


def _parquet_bytes(spec: InputFile) -> bytes:
    header = spec.header or ()
    width = len(header)
    rows = [tuple(r[:width]) + ("",) * (width - len(r)) for r in spec.rows]
    columns = [_parquet_column([r[i] for r in rows]) for i in range(width)]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_arrays(columns, names=list(header)), sink)
    return sink.getvalue().to_pybytes()


@dataclass(frozen=True)
class Case:
    """A source layout with its files as bytes; `mutated` names the file that was changed."""

    reader: str
    layout: str
    files: tuple[tuple[str, bytes], ...]
    mutated: str
    input_class: str

    def source(self, root: Path) -> Source:
        if self.reader == "movielens":
            return MovieLensSource(root)
        if self.reader == "recbole":
            return RecBoleSource(root, name="x")
        names = dict(self.files)
        inter = next(n for n in names if n.startswith("interactions"))
        items = next((n for n in names if n.startswith("items")), None)
        return TabularSource(
            path=root / inter,
            delimiter="\t" if self.layout == "tsv" else ",",
            items_path=root / items if items else None,
        )


def _ml100k_flags(*genres: str) -> tuple[str, ...]:
    return tuple("1" if g in genres else "0" for g in ML100K_GENRES)


def base_files(layout: str) -> tuple[InputFile, ...]:
    """The valid files of one layout (each reader's tests in test_sources.py read the same)."""
    if layout in READERS["tabular"]:
        delim = "\t" if layout == "tsv" else ","
        inter = InputFile(
            "interactions.parquet" if layout == "parquet" else f"interactions.{layout[:3]}",
            ("user_id", "item_id", "timestamp", "rating"),
            (("u1", "i1", "1700000000", "4"), ("u1", "i2", "1700000100", "5"),
             ("u2", "i1", "1700000200", "3")),
            delim, parquet=layout == "parquet",
        )  # fmt: skip
        items_parquet = layout != "csv" and layout != "tsv"
        items = InputFile(
            "items.parquet" if items_parquet else f"items.{layout}",
            ("item_id", "title", "year", "genres"),
            (("i1", "Heat, The", "1995", "Crime|Drama"), ("i2", "Alien", "1979", "Horror|Sci-Fi")),
            delim, parquet=items_parquet,
        )  # fmt: skip
        return inter, items
    if layout == "ml-100k":
        return (
            InputFile(
                "u.data", None, (("196", "242", "3", "881250949"), ("186", "302", "3", "891717742")),
                "\t",
            ),
            InputFile(
                "u.item", None,
                (("242", "Kolya (1996)", "24-Jan-1997", "", "http://x",
                  *_ml100k_flags("Animation", "Comedy")),
                 ("302", "L.A. Confidential (1997)", "01-Jan-1997", "", "http://y",
                  *_ml100k_flags("Crime", "Thriller"))),
                "|", "latin-1",
            ),
        )  # fmt: skip
    if layout == "ml-1m":
        return (
            InputFile(
                "ratings.dat", None, (("1", "1193", "5", "978300760"), ("1", "661", "3", "978302109")),
                "::",
            ),
            InputFile(
                "movies.dat", None,
                (("1193", "Café Society (1975)", "Drama"),
                 ("661", "James and the Giant Peach (1996)", "Animation|Children's|Musical")),
                "::", "latin-1",
            ),
        )  # fmt: skip
    if layout == "ml-20m":
        return (
            InputFile(
                "ratings.csv", ("userId", "movieId", "rating", "timestamp"),
                (("1", "2", "3.5", "1112486027"), ("1", "29", "4.0", "1112484676")),
            ),
            InputFile(
                "movies.csv", ("movieId", "title", "genres"),
                (("2", "Jumanji (1995)", "Adventure|Children"),
                 ("29", "City of Lost Children, The (1995)", "(no genres listed)")),
            ),
        )  # fmt: skip
    return (
        InputFile(
            "x.inter", ("user_id:token", "item_id:token", "rating:float", "timestamp:float"),
            (("196", "242", "3", "881250949"), ("186", "302", "3", "891717742.0")), "\t",
        ),
        InputFile(
            "x.item", ("item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"),
            (("242", "Kolya", "1996", "Animation Comedy"), ("302", "L.A. Confidential", "1997", "Crime")),
            "\t",
        ),
    )  # fmt: skip


def case_of(
    layout: str, files: tuple[InputFile, ...], mutated: str, data: bytes, label: str
) -> Case:
    reader = next(r for r, layouts in READERS.items() if layout in layouts)
    rendered = tuple((f.name, data if f.name == mutated else f.render()) for f in files)
    return Case(reader, layout, rendered, mutated, label)


# --- mutations: each draws one change to one file and names its input class -------------


def _pick_field(draw: st.DrawFn, spec: InputFile) -> tuple[int, int]:
    row = draw(st.integers(0, len(spec.rows) - 1))
    return row, draw(st.integers(0, len(spec.rows[row]) - 1))


def set_field(spec: InputFile, row: int, col: int, value: str) -> InputFile:
    rows = list(spec.rows)
    rows[row] = rows[row][:col] + (value,) + rows[row][col + 1 :]
    return replace(spec, rows=tuple(rows))


def _field_mutation(draw: st.DrawFn, spec: InputFile) -> tuple[str, InputFile]:
    kind = draw(
        st.sampled_from(
            ["control character", "NUL byte", "odd number", "any text", "missing field",
             "extra field", "missing column", "extra column", "header repeated as a row",
             "header only"]
        )
    )  # fmt: skip
    row, col = _pick_field(draw, spec)
    value = spec.rows[row][col]
    if kind in ("control character", "NUL byte"):
        char = "\x00" if kind == "NUL byte" else draw(st.sampled_from(CONTROL_CHARACTERS))
        at = draw(st.integers(0, len(value)))
        return kind, set_field(spec, row, col, value[:at] + char + value[at:])
    if kind == "odd number":
        number = draw(
            st.one_of(
                st.sampled_from(ODD_NUMBERS),
                st.integers().map(str),
                st.floats(allow_nan=True, allow_infinity=True).map(repr),
            )
        )
        return kind, set_field(spec, row, col, number)
    if kind == "any text":
        return kind, set_field(spec, row, col, draw(st.text(max_size=20)))
    if kind == "missing field" and not spec.parquet:
        return kind, replace(
            spec, rows=spec.rows[:row] + (spec.rows[row][:-1],) + spec.rows[row + 1 :]
        )
    if kind == "extra field" and not spec.parquet:
        return kind, replace(
            spec, rows=spec.rows[:row] + (spec.rows[row] + ("extra",),) + spec.rows[row + 1 :]
        )
    if kind == "missing column":
        header = None if spec.header is None else spec.header[:col] + spec.header[col + 1 :]
        return kind, replace(
            spec, header=header, rows=tuple(r[:col] + r[col + 1 :] for r in spec.rows)
        )
    if kind == "extra column":
        names = [*(spec.header or ()), "extra", "", "file_row_number", "interactions", "a b"]
        name = draw(st.sampled_from(names))  # an existing name: a duplicated header
        header = None if spec.header is None else (*spec.header, name)
        return kind, replace(spec, header=header, rows=tuple((*r, "x") for r in spec.rows))
    if kind == "header repeated as a row" and spec.header is not None:
        return kind, replace(spec, rows=(spec.header, *spec.rows))
    if kind == "header only":
        return kind, replace(spec, rows=())
    return "unchanged", spec


def _byte_mutation(draw: st.DrawFn, spec: InputFile) -> tuple[str, bytes]:
    data = spec.render()
    kinds = ["random bytes", "empty file", "truncated", "byte replaced", "byte inserted"]
    if not spec.parquet:
        kinds += ["BOM", "CRLF line ends", "CR line ends", "wrong encoding"]
    kind = draw(st.sampled_from(kinds))
    if kind == "random bytes":
        return kind, draw(st.binary(max_size=400))
    if kind == "empty file":
        return kind, b""
    if kind == "truncated":
        return kind, data[: draw(st.integers(0, len(data)))]
    if kind in ("byte replaced", "byte inserted"):
        at = draw(st.integers(0, len(data) - 1))
        byte = bytes([draw(st.integers(0, 255))])
        return kind, data[:at] + byte + data[at + (kind == "byte replaced") :]
    if kind == "BOM":
        bom = draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"]))
        return kind, bom + data
    if kind == "CRLF line ends":
        return kind, data.replace(b"\n", b"\r\n")
    if kind == "CR line ends":
        return kind, data.replace(b"\n", b"\r")
    # Wrong encoding: a title with accents, written in a codec other than the one it is read as.
    text = data.decode(spec.encoding).replace(spec.rows[0][1], "Amélie Señor Ünïcode ✓", 1)
    codecs = [c for c in ("utf-8", "latin-1", "cp1252", "utf-16", "utf-32") if c != spec.encoding]
    return kind, text.encode(draw(st.sampled_from(codecs)), errors="replace")


@st.composite
def cases(draw: st.DrawFn, reader: str) -> Case:
    """One valid layout of `reader` with one file changed by one field or byte mutation."""
    layout = draw(st.sampled_from(READERS[reader]))
    files = base_files(layout)
    target = draw(st.sampled_from(files))
    if draw(st.booleans()):
        label, changed = _field_mutation(draw, target)
        data = changed.render()
    else:
        label, data = _byte_mutation(draw, target)
    return case_of(layout, files, target.name, data, f"{label} in {target.name}")


# --- the property --------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """A broken property: `signature` names the kind of break (stable across examples)."""

    signature: str
    detail: str

    def __str__(self) -> str:
        return f"{self.signature}: {self.detail}"


_PREVIOUS: dict[str, bytes] = {}


def previous_materialization() -> dict[str, bytes]:
    """`raw/interactions.parquet` and `raw/items.parquet` of a good earlier run, made once, from
    ids no case uses, so a refused case that replaced either file is caught."""
    if not _PREVIOUS:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            inter, items = (
                replace(f, rows=tuple(tuple(f"prev-{v}" if j < 2 else v for j, v in enumerate(r))
                                      for r in f.rows))
                for f in base_files("csv")
            )  # fmt: skip
            for f in (inter, items):
                (root / f.name).write_bytes(f.render())
            paths = ArtifactPaths(root / "store")
            ingest(TabularSource(root / inter.name, items_path=root / items.name), paths)
            _PREVIOUS["interactions.parquet"] = paths.raw_interactions.read_bytes()
            _PREVIOUS["items.parquet"] = paths.raw_items.read_bytes()
    return _PREVIOUS


def _run_with_limit(fn, seconds: float) -> BaseException | None:
    """Run `fn` in a thread; the exception it raised, or TimeoutError when it outlives `seconds`."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed back to the caller to classify
            outcome.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return TimeoutError(f"still running after {seconds:.0f} s")
    return outcome[0]


def _last_line(err: BaseException) -> str:
    return traceback.format_exception_only(type(err), err)[-1].strip()[:300]


def _leftovers(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _fields(schema: pa.Schema) -> list[tuple[str, str]]:
    """Names and types; nullability is not part of the contract."""
    return [
        (f.name, f"list<{f.type.value_type}>" if pa.types.is_list(f.type) else str(f.type))
        for f in schema
    ]


def contract_violations(paths: ArtifactPaths) -> list[str]:
    """What in `raw/` breaks the raw-interactions or raw-item contract (docs/ARCHITECTURE.md)."""
    problems = []
    schema = pq.read_schema(paths.raw_interactions)
    if _fields(schema) != _fields(RAW_SCHEMA):
        return [f"raw interactions columns {_fields(schema)}"]
    con = duckdb.connect()
    try:
        (rows, empty_id, bad_ts, bad_rating) = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE user_id IS NULL OR trim(user_id) = '' "
            "OR item_id IS NULL OR trim(item_id) = ''), "
            "count(*) FILTER (WHERE timestamp IS NULL OR timestamp < 0), "
            "count(*) FILTER (WHERE rating IS NOT NULL AND (isnan(rating) OR isinf(rating))) "
            "FROM read_parquet(?)",
            [str(paths.raw_interactions)],
        ).fetchone()  # type: ignore[misc]
    finally:
        con.close()
    if rows == 0:
        problems.append("no rows")
    if empty_id:
        problems.append("empty user or item id")
    if bad_ts:
        problems.append("null or negative timestamp")
    if bad_rating:
        problems.append("non-finite rating")
    items = _fields(pq.read_schema(paths.raw_items))[:4]
    if items != _fields(ITEM_SCHEMA):
        problems.append(f"raw items columns start {items}")
    return problems


def catalog_violations(paths: ArtifactPaths) -> list[str]:
    """What in `catalog/items.parquet` breaks the item-catalog contract (validate_catalog)."""
    table = pq.read_table(paths.items, columns=["item_id", "title", "year"]).to_pydict()
    ids = table["item_id"]
    problems = []
    if None in ids or len(set(ids)) != len(ids):
        problems.append("catalog item ids null or repeated")
    if None in table["title"]:
        problems.append("catalog title null")
    if any(y is not None and not MIN_YEAR <= y <= MAX_YEAR for y in table["year"]):
        problems.append("catalog year out of range")
    return problems


def check_case(case: Case, workdir: Path) -> Failure | None:
    """Ingest `case` over a previous good materialization; None when the property holds."""
    src = workdir / "src"
    src.mkdir(parents=True)
    for name, data in case.files:
        (src / name).write_bytes(data)
    paths = ArtifactPaths(workdir / "store")
    paths.raw_dir.mkdir(parents=True)
    previous = previous_materialization()
    paths.raw_interactions.write_bytes(previous["interactions.parquet"])
    paths.raw_items.write_bytes(previous["items.parquet"])
    where = f"{case.reader}/{case.layout} {case.mutated}"

    err = _run_with_limit(lambda: ingest(case.source(src), paths), HANG_SECONDS)
    if isinstance(err, TimeoutError):
        return Failure(f"{where}: hang", str(err))
    if leftovers := _leftovers(paths.raw_dir):
        return Failure(f"{where}: temp files left", ", ".join(leftovers))
    if isinstance(err, DataSourceError):
        message = str(err)
        if str(src / case.mutated) not in message:
            return Failure(f"{where}: error does not name the file", message)
        if paths.raw_interactions.read_bytes() != previous["interactions.parquet"]:
            return Failure(
                f"{where}: partial write (raw interactions replaced, then refused)", message
            )
        if paths.raw_items.read_bytes() != previous["items.parquet"]:
            return Failure(f"{where}: partial write (raw items replaced, then refused)", message)
        return None
    if err is not None:
        replaced = paths.raw_interactions.read_bytes() != previous["interactions.parquet"]
        return Failure(
            f"{where}: {type(err).__module__}.{type(err).__name__}",
            _last_line(err) + (" [raw interactions already replaced]" if replaced else ""),
        )
    if problems := contract_violations(paths):
        return Failure(f"{where}: accepted, but {problems[0]}", "; ".join(problems))
    err = _run_with_limit(lambda: build_catalog(paths), HANG_SECONDS)
    if err is not None:
        return Failure(
            f"{where}: catalog build {type(err).__module__}.{type(err).__name__}", _last_line(err)
        )
    if problems := catalog_violations(paths) + [
        f"temp files {n}" for n in _leftovers(paths.items.parent)
    ]:
        return Failure(f"{where}: catalog {problems[0]}", "; ".join(problems))
    return None


# Breaks the fuzzing found and not fixed yet (issue 13, item 3: "any other corruption"): a
# regex over `str(failure)` -> input class, each pinned by an xfail(strict=True) test in
# test_fuzz_readers.py. Every class found so far is fixed; test_fuzz_readers.py::BREAKS keeps
# their repros as regression tests.
KNOWN_BREAKS: dict[str, str] = {}


def known_break(failure: Failure) -> str | None:
    """The input class of a break already pinned by an xfail test, or None for a new one."""
    text = str(failure).replace("\n", " ")
    return next((name for pattern, name in KNOWN_BREAKS.items() if re.search(pattern, text)), None)
