"""Each interaction source reads its real file layout into the raw-interactions contract."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recsae_pipeline.data.ingest import InteractionColumns
from recsae_pipeline.data.sources import (
    MovieLensSource,
    RecBoleSource,
    SyntheticSource,
    TabularSource,
    ingest,
)
from recsae_pipeline.data.synthetic import SyntheticConfig
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline_tests.conftest import write_text

RAW_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("timestamp", pa.int64()),
        ("rating", pa.float32()),
    ]
)


def read(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def items_by_id(paths: ArtifactPaths) -> dict[str, dict]:
    return {r["item_id"]: r for r in read(paths.raw_items)}


def write_files(root: Path, files: dict[str, str | bytes]) -> Path:
    """A dataset folder holding `files` (name: content); returns `root`."""
    for name, content in files.items():
        write_text(root / name, content)
    return root


def test_movielens_100k_layout(tmp_path: Path, paths: ArtifactPaths) -> None:
    flags_toy = "|".join(["0", "0", "0", "1", "1", "1"] + ["0"] * 13)
    flags_gold = "|".join(["0", "1", "1"] + ["0"] * 13 + ["1", "0", "0"])
    item = (
        f"242|Kolya (1996)|24-Jan-1997||http://x|{flags_toy}\n"
        f"302|L.A. Confidential (1997)|01-Jan-1997||http://y|{flags_gold}\n"
    )
    files = {
        "u.data": "196\t242\t3\t881250949\n186\t302\t3\t891717742\n",
        "u.item": item.encode("latin-1"),
    }
    root = write_files(tmp_path / "ml-100k", files)
    report = ingest(MovieLensSource(root), paths)
    assert report.rows == 2
    assert pq.read_schema(paths.raw_interactions).equals(RAW_SCHEMA)
    assert read(paths.raw_interactions)[0] == {
        "user_id": "196",
        "item_id": "242",
        "timestamp": 881250949,
        "rating": 3.0,
    }
    items = items_by_id(paths)
    assert items["242"]["title"] == "Kolya"
    assert items["242"]["year"] == 1996
    assert items["242"]["genres"] == ["Animation", "Children's", "Comedy"]
    assert items["302"]["genres"] == ["Action", "Adventure", "Thriller"]


def test_movielens_1m_layout_is_double_colon_and_latin1(
    tmp_path: Path, paths: ArtifactPaths
) -> None:
    movies = (
        "1193::Café Society (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
    )
    files = {
        "ratings.dat": "1::1193::5::978300760\n1::661::3::978302109\n",
        "movies.dat": movies.encode("latin-1"),
    }
    root = write_files(tmp_path / "ml-1m", files)
    ingest(MovieLensSource(root), paths)
    assert [r["item_id"] for r in read(paths.raw_interactions)] == ["1193", "661"]
    items = items_by_id(paths)
    assert items["1193"]["title"] == "Café Society"
    assert items["661"]["genres"] == ["Animation", "Children's", "Musical"]


def test_movielens_csv_layout_quotes_and_no_genres(tmp_path: Path, paths: ArtifactPaths) -> None:
    files = {
        "ratings.csv": "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n",
        "movies.csv": 'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama|Romance\n'
        "3,Untitled,(no genres listed)\n",
    }
    root = write_files(tmp_path / "ml-latest-small", files)
    ingest(MovieLensSource(root), paths)
    assert read(paths.raw_interactions)[1]["rating"] == 4.5
    items = items_by_id(paths)
    assert items["1"]["title"] == "American President, The"
    assert items["1"]["year"] == 1995
    assert items["3"]["year"] is None and items["3"]["genres"] == []


def test_recbole_atomic_files(tmp_path: Path, paths: ArtifactPaths) -> None:
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    item = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    files = {
        "tiny.inter": inter + "7\t1\t3\t881250949\n7\t2\t4\t881250950.0\n",
        "tiny.item": item + "1\tToy Story\t1995\tAnimation Children's Comedy\n"
        "2\tGoldenEye\t1995\tAction Adventure Thriller\n",
    }
    root = write_files(tmp_path / "tiny", files)
    ingest(RecBoleSource(root), paths)
    assert [r["timestamp"] for r in read(paths.raw_interactions)] == [881250949, 881250950]
    items = items_by_id(paths)
    assert items["1"] == {
        "item_id": "1",
        "title": "Toy Story",
        "year": 1995,
        "genres": ["Animation", "Children's", "Comedy"],
    }


def test_tabular_csv_with_column_mapping_and_item_file(
    tmp_path: Path, paths: ArtifactPaths
) -> None:
    logs = write_text(
        tmp_path / "logs.csv",
        "customer;sku;when\nc1;A;2024-01-02 10:00:00\nc1;B;2024-01-03T11:00:00\n",
    )
    catalog = write_text(
        tmp_path / "skus.csv", "sku;name;launch;tags;brand\nA;Alpha;2020;x/y;acme\nB;Beta;;z;zeta\n"
    )
    source = TabularSource(
        path=logs,
        columns=InteractionColumns("customer", "sku", "when", None, "datetime"),
        delimiter=";",
        items_path=catalog,
        item_title_column="name",
        item_year_column="launch",
        item_genres_column="tags",
        genres_separator="/",
    )
    ingest(source, paths)
    rows = read(paths.raw_interactions)
    assert rows[0] == {"user_id": "c1", "item_id": "A", "timestamp": 1704189600, "rating": None}
    items = items_by_id(paths)
    assert items["A"] == {
        "item_id": "A",
        "title": "Alpha",
        "year": 2020,
        "genres": ["x", "y"],
        "brand": "acme",
    }
    assert items["B"]["year"] is None


def test_tabular_parquet_with_integer_ids_and_millisecond_timestamps(
    tmp_path: Path, paths: ArtifactPaths
) -> None:
    table = pa.table(
        {
            "u": pa.array([1, 2], pa.int64()),
            "i": pa.array([10, 20], pa.int32()),
            "ts": [1_700_000_000_123, 1_700_000_001_999],
            "r": [1.0, 2.0],
        }
    )
    pq.write_table(table, tmp_path / "logs.parquet")
    ingest(
        TabularSource(
            path=tmp_path / "logs.parquet", columns=InteractionColumns("u", "i", "ts", "r", "ms")
        ),
        paths,
    )
    rows = read(paths.raw_interactions)
    assert rows == [
        {"user_id": "1", "item_id": "10", "timestamp": 1_700_000_000, "rating": 1.0},
        {"user_id": "2", "item_id": "20", "timestamp": 1_700_000_001, "rating": 2.0},
    ]
    # No item file: a catalog of bare ids keeps downstream joins working.
    assert sorted(r["item_id"] for r in read(paths.raw_items)) == ["10", "20"]


def test_synthetic_source_writes_interactions_catalog_and_ground_truth(
    paths: ArtifactPaths,
) -> None:
    config = SyntheticConfig(
        n_users=40, n_items=200, mean_sequence_length=12, n_franchises=5, seed=3
    )
    report = ingest(SyntheticSource(config), paths)
    inter = pq.read_table(paths.raw_interactions)
    truth = pq.read_table(paths.ground_truth)
    assert report.rows == inter.num_rows == truth.num_rows > 0
    assert inter.schema.equals(RAW_SCHEMA)
    assert inter.column("user_id").equals(truth.column("user_id"))
    assert inter.column("timestamp").equals(truth.column("timestamp"))
    assert pq.read_table(paths.raw_items).num_rows == 200


def test_ids_are_kept_exactly_even_beyond_int64(tmp_path: Path, paths: ArtifactPaths) -> None:
    huge = "18446744073709551616999"  # would overflow int64/uint64 if parsed as a number
    logs = write_text(
        tmp_path / "logs.csv", f"user_id,item_id,timestamp\n{huge},00042,1700000000\n"
    )
    ingest(TabularSource(path=logs, columns=InteractionColumns(rating=None)), paths)
    assert read(paths.raw_interactions)[0]["user_id"] == huge
    assert read(paths.raw_interactions)[0]["item_id"] == "00042"  # leading zeros survive
