"""Activation shards' on-disk encoding: label columns compressed with statistics, activation
floats plain; shards written the old way (every column zstd) read the same through every
reader and DuckDB; the report's NaN/Inf count and mean norm stay exact on unhealthy states."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recsae_pipeline.activations import shards
from recsae_pipeline.activations.shards import (
    INT_COLUMNS,
    iter_activation_batches,
    iter_in_file_order,
    load_activations,
)
from recsae_pipeline.storage.atomic import PARQUET_COMPRESSION, parquet_writer
from recsae_pipeline_tests.test_activations import write

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = [*INT_COLUMNS, "split"]


def column_chunks(out: Path) -> dict[str, list[pq.ColumnChunkMetaData]]:
    chunks: dict[str, list[pq.ColumnChunkMetaData]] = {}
    for path in sorted(out.iterdir()):
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                chunk = meta.row_group(g).column(c)
                chunks.setdefault(chunk.path_in_schema, []).append(chunk)
    return chunks


def test_labels_are_compressed_with_statistics_and_activations_are_plain(tmp_path):
    out, _ = write(tmp_path)
    chunks = column_chunks(out)
    assert sorted(chunks) == sorted([*LABELS, shards._ACTIVATION_LEAF])
    for name in LABELS:
        assert all(c.compression == PARQUET_COMPRESSION.upper() for c in chunks[name])
        assert all(c.is_stats_set and c.statistics.has_min_max for c in chunks[name])
    for chunk in chunks[shards._ACTIVATION_LEAF]:
        assert chunk.compression == "UNCOMPRESSED"
        assert "PLAIN" in chunk.encodings and "PLAIN_DICTIONARY" not in chunk.encodings
        assert "RLE_DICTIONARY" not in chunk.encodings
        assert not (chunk.is_stats_set and chunk.statistics.has_min_max)


def rewrite_with_the_store_codec(src: Path, dst: Path) -> None:
    """The same shards as the writer made them before: every column zstd, dictionaries and
    statistics everywhere (`storage.atomic.parquet_writer`), row groups kept."""
    dst.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        shard = pq.ParquetFile(path)
        with parquet_writer(dst / path.name, shard.schema_arrow) as writer:
            for g in range(shard.num_row_groups):
                writer.write_table(shard.read_row_group(g))


def test_shards_written_with_zstd_activations_read_the_same(tmp_path):
    new, report = write(tmp_path / "new")
    old = tmp_path / "old" / "activations" / "model=sasrec" / "layer=1"
    rewrite_with_the_store_codec(new, old)
    assert all(c.compression == "ZSTD" for c in column_chunks(old)[shards._ACTIVATION_LEAF])

    columns = ("user_idx", "position", "activation")
    for reader in (
        lambda p: list(iter_in_file_order(p, columns=columns)),
        lambda p: list(iter_activation_batches(p, batch_size=16, seed=3, columns=columns)),
        lambda p: [load_activations(p, max_bytes=10**7, columns=columns, split="train")],
    ):
        got_new, got_old = reader(new), reader(old)
        assert len(got_new) == len(got_old) > 0
        for a, b in zip(got_new, got_old, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    sql = (
        "SELECT user_idx, position, activation[3] AS a3, "
        "sqrt(list_sum(list_transform(activation::FLOAT[], lambda x: x * x))) AS norm "
        "FROM read_parquet('{}/*.parquet') ORDER BY user_idx, position"
    )
    rows_new = duckdb.sql(sql.format(new)).fetchall()
    assert rows_new == duckdb.sql(sql.format(old)).fetchall()
    assert len(rows_new) == report.rows
    assert np.mean([r[3] for r in rows_new]) == pytest.approx(report.mean_norm, rel=1e-5)


@pytest.mark.parametrize("writer_queue", [0, 2])
def test_nonfinite_and_huge_states_are_counted_exactly(tmp_path, monkeypatch, writer_queue):
    """NaN/Inf at real positions count (at padding they do not); finite values whose float32
    squares overflow still give a finite norm."""
    read_hidden = shards.read_hidden

    def unhealthy(model, items, layer):
        hidden = read_hidden(model, items, layer).clone()
        real = items > 0
        hidden[0, 0, 0], hidden[0, 0, 1] = float("nan"), float("inf")
        hidden[~real] = float("nan")  # padding: never written, never counted
        hidden[1, 0] = 1e30  # finite, but its float32 square is inf
        return hidden

    monkeypatch.setattr(shards, "read_hidden", unhealthy)
    out, report = write(tmp_path, batch_users=6, writer_queue=writer_queue)
    batches = -(-20 // 6)  # tiny_sequences() has 20 users
    assert report.n_nonfinite == 2 * batches
    assert np.isnan(report.mean_norm)

    acts = load_activations(out, max_bytes=10**7)["activation"].numpy()
    assert int((~np.isfinite(acts)).sum()) == report.n_nonfinite

    def only_huge(model, items, layer):
        hidden = read_hidden(model, items, layer).clone()
        hidden[1, 0] = 1e30
        return hidden

    monkeypatch.setattr(shards, "read_hidden", only_huge)
    out, report = write(tmp_path / "huge", batch_users=6, writer_queue=writer_queue)
    acts = load_activations(out, max_bytes=10**7)["activation"].numpy().astype(np.float64)
    assert report.n_nonfinite == 0
    expected = np.linalg.norm(acts, axis=1).mean()
    assert np.isfinite(report.mean_norm)
    np.testing.assert_allclose(report.mean_norm, expected, rtol=1e-6)
