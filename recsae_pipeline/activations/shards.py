"""Activations at one layer as Parquet shards: a streaming writer and a shuffling reader.

One row per real (non-padding) position of a user's sequence, as the model sees it: the last
`max_len` items of the full sequence, so a user longer than `max_len` contributes only the
positions n - max_len .. n - 1 (each computed with that window as context, exactly as the
model scores the test item). `position` is 0-based in the full sequence; the row's target is
the next item, labelled by the leave-one-out split of the full sequence.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from recsae_pipeline.activations.hooks import layer_block, read_hidden
from recsae_pipeline.data.batching import pad_right
from recsae_pipeline.models.recommender import Recommender
from recsae_pipeline.storage.atomic import atomic_path, parquet_writer
from recsae_pipeline.storage.registry import SHARD_GLOB, shard_name

SPLITS = ("train", "valid", "test", "none")
"""Split of a row by its target: leave-one-out of the full sequence; "none" = last item."""
INT_COLUMNS = ("user_idx", "position", "item_idx", "target_idx")
_ACTIVATION_LEAF = "activation.list.element"
"""The Parquet leaf column of the activation values (pyarrow's compliant list naming),
written plain (`parquet_writer`): hidden states are near-random bits (zstd saved ~7%), and
the codec, the dictionary attempt and the min/max scan were most of the encoding time; the
label columns keep the codec, dictionaries and statistics (DuckDB prunes on them)."""


class ShardReport(NamedTuple):
    rows: int
    """Rows written: one per real position the model saw (see `expected_rows`)."""
    shards: int
    """Parquet files in the partition."""
    bytes: int
    """Total size of the shard files on disk."""
    seconds: float
    """Wall time of the whole write."""
    forward_seconds: float
    """Part of it spent in the model's forward passes and the copy to CPU."""
    dim: int
    """Width d of each activation (the model's hidden size)."""
    n_nonfinite: int
    """Activation values that are NaN or infinite; 0 for a healthy model."""
    mean_norm: float
    """Mean L2 norm of the activation rows."""


def activation_type(dim: int) -> pa.DataType:
    """The activation column's type: `dim` float32 values, none of them null (a non-finite
    value is a NaN, never a null). `benchmarks/shard_encoding.py` times its Parquet write
    against the nullable list it replaced."""
    return pa.list_(pa.field("element", pa.float32(), nullable=False), dim)


def activation_schema(dim: int) -> pa.Schema:
    """The shard schema for activations of width `dim` (DESIGN.md, data contracts); no column
    holds nulls."""
    return pa.schema(
        [pa.field(name, pa.int32(), nullable=False) for name in INT_COLUMNS]
        + [
            pa.field("split", pa.string(), nullable=False),
            pa.field("activation", activation_type(dim), nullable=False),
        ]
    )


def expected_rows(sequences: Sequence[np.ndarray], max_len: int) -> int:
    """Rows `write_activations` writes: each user's length, capped at the model's max_len."""
    return sum(min(len(s), max_len) for s in sequences)


class _ShardSink:
    """Appends tables, writing row groups of `row_group_rows` into shards of `rows_per_shard`;
    holds at most one row group plus the last appended table in memory."""

    def __init__(
        self, directory: Path, schema: pa.Schema, rows_per_shard: int, row_group_rows: int
    ) -> None:
        self.directory, self.schema = directory, schema
        self.rows_per_shard, self.row_group_rows = rows_per_shard, row_group_rows
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.writer: pq.ParquetWriter | None = None
        self.shard_rows = 0
        self.shards = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self._group_rows():
            self._write_group(self._group_rows())

    def finish(self) -> int:
        """Flush and close; an empty partition still gets one (empty) shard with the schema."""
        while self.pending_rows:
            self._write_group(min(self.pending_rows, self._group_rows()))
        if self.writer is None and self.shards == 0:
            self._open()
        self._close()
        return self.shards

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _group_rows(self) -> int:
        return min(self.row_group_rows, self.rows_per_shard - self.shard_rows)

    def _open(self) -> None:
        path = self.directory / shard_name(self.shards)
        self.writer = parquet_writer(path, self.schema, plain=[_ACTIVATION_LEAF])

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.shards += 1
            self.shard_rows = 0

    def _write_group(self, rows: int) -> None:
        table = pa.concat_tables(self.pending)
        rest = table.slice(rows)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows -= rows
        if self.writer is None:
            self._open()
        self.writer.write_table(table.slice(0, rows), row_group_size=rows)
        self.shard_rows += rows
        if self.shard_rows == self.rows_per_shard:
            self._close()


def _position_columns(
    lengths: np.ndarray, windows: Sequence[np.ndarray], first_user_idx: int
) -> dict[str, pa.Array]:
    """Every column but the activation, for the windows the model sees (user by user, in
    order), from each user's full length and window (its last max_len items)."""
    width = np.array([len(w) for w in windows], dtype=np.int64)
    n = np.repeat(lengths, width)  # the full length of each row's user
    ends = np.cumsum(width)
    offset = np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - width, width)
    position = (n - np.repeat(width, width) + offset).astype(np.int32)
    items = np.concatenate(windows).astype(np.int32, copy=False)
    targets = np.empty_like(items)  # the next item: the window's own next, 0 after the last
    targets[:-1] = items[1:]
    targets[ends[width > 0] - 1] = 0
    # target at position + 1: train up to n - 3, then valid, test, none (0..3)
    split_codes = np.clip(position - n + 4, 0, 3).astype(np.int8)
    return {
        "user_idx": pa.array(
            np.repeat(np.arange(len(windows), dtype=np.int32) + first_user_idx, width)
        ),
        "position": pa.array(position),
        "item_idx": pa.array(items),
        "target_idx": pa.array(targets),
        "split": pc.take(pa.array(SPLITS, pa.string()), pa.array(split_codes)),
    }


class _Batch(NamedTuple):
    """One forward pass's output, handed from the caller to the writer."""

    first_user_idx: int
    lengths: np.ndarray
    """Full length of each user's sequence."""
    windows: list[np.ndarray]
    """Each user's last max_len items, as the model saw them."""
    hidden: np.ndarray
    """float32 [users, T, d]: the block output, padding positions included."""


class _BatchStats:
    """Turns batches into shard rows and keeps the report's running statistics."""

    def __init__(self, sink: _ShardSink) -> None:
        self.sink = sink
        self.rows, self.nonfinite, self.norm_sum = 0, 0, 0.0

    def add(self, batch: _Batch) -> None:
        _, steps, dim = batch.hidden.shape
        widths = np.array([len(w) for w in batch.windows])
        real = np.flatnonzero(np.arange(steps) < widths[:, None])
        # [rows, d], user by user, position by position: one copy, into the buffer Arrow keeps
        acts = np.take(batch.hidden.reshape(-1, dim), real, axis=0)
        squares = np.einsum("ij,ij->i", acts, acts)  # float32; finite iff every value is
        if not np.isfinite(squares).all():  # rare: count exactly, norms in float64
            self.nonfinite += acts.size - int(np.count_nonzero(np.isfinite(acts)))
            squares = np.einsum("ij,ij->i", acts, acts, dtype=np.float64)
        self.norm_sum += float(np.sqrt(squares).sum(dtype=np.float64))
        self.rows += len(acts)
        columns = _position_columns(batch.lengths, batch.windows, batch.first_user_idx)
        columns["activation"] = pa.FixedSizeListArray.from_arrays(  # zero-copy views of acts
            pa.array(acts.reshape(-1)), type=activation_type(dim)
        )
        self.sink.add(pa.table(columns, schema=self.sink.schema))


class _WriterThread:
    """Runs `stats.add` for each submitted batch on one background thread, so that Parquet
    encoding and compression (which release the GIL) overlap the caller's next forward pass.

    At most `depth` batches wait in the queue, so memory stays flat however far the forward
    passes run ahead. A failure on the thread is raised in the caller at its next `submit` or
    at `close`; after it, or after `cancel`, the thread discards what is queued and closes the
    sink without finishing it, so the staged partition is never complete.
    """

    def __init__(self, stats: _BatchStats, depth: int, where: Path) -> None:
        self.stats, self.where = stats, where
        self.queue: queue.Queue[_Batch | None] = queue.Queue(maxsize=depth)  # None: the end
        self.cancelled = threading.Event()
        self.error: BaseException | None = None
        self.failed_at = ""
        self.shards = 0
        self.thread = threading.Thread(
            target=self._run, name="activation-shard-writer", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        while (batch := self.queue.get()) is not None:
            if self.error is not None or self.cancelled.is_set():
                continue  # drain, so that the caller never blocks on a full queue
            try:
                self.stats.add(batch)
            except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller
                last = batch.first_user_idx + len(batch.windows) - 1
                self.error = exc
                self.failed_at = f"the batch of user_idx {batch.first_user_idx}..{last}"
        try:
            if self.error is None and not self.cancelled.is_set():
                self.shards = self.stats.sink.finish()
                return
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller
            self.error, self.failed_at = exc, "closing the last shard"
        with contextlib.suppress(Exception):  # the error that counts is recorded already
            self.stats.sink.abort()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(
                f"writing activation shards under {self.where} failed on the writer thread at "
                f"{self.failed_at}: {type(self.error).__name__}: {self.error}; nothing was "
                "published, the previous partition (if any) is untouched"
            ) from self.error

    def submit(self, batch: _Batch) -> None:
        self._raise_if_failed()
        self.queue.put(batch)

    def close(self) -> int:
        """Finish the last shard once everything queued is written; the number of shards."""
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()
        return self.shards

    def cancel(self) -> None:
        """Stop without finishing (the caller failed); returns once the thread has ended."""
        if self.thread.is_alive():
            self.cancelled.set()
            self.queue.put(None)
            self.thread.join()


def default_writer_queue(device: torch.device) -> int:
    """`write_activations`' writer queue when none is given: 2 (a writer thread) when the
    forward pass leaves a core free (it runs on an accelerator, or torch uses fewer threads
    than this process may run on), else 0 (write on the caller's thread). A writer thread
    beside torch's threads on every core preempts one of them and each parallel op waits for
    it: on 2 cores the forward ran 1.47x slower and extraction took longer than writing
    between batches (benchmarks/activations.py)."""
    if device.type != "cpu":
        return 2
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 2 if cores > torch.get_num_threads() else 0


def write_activations(
    model: Recommender,
    sequences: Sequence[np.ndarray],
    layer: int,
    out_dir: Path,
    device: torch.device,
    batch_users: int = 256,
    rows_per_shard: int = 200_000,
    row_group_rows: int = 65_536,
    on_progress: Callable[[int, int], None] | None = None,
    writer_queue: int | None = None,
) -> ShardReport:
    """Write block `layer`'s output for every user (sequences[i] is user_idx i + 1) to shards.

    Streams: memory holds `writer_queue` + 1 batches of users plus one row group. The model is
    moved to `device` and run in eval mode (its mode is restored after). Rows are gathered,
    encoded and compressed on a writer thread while the next batch runs forward; with
    `writer_queue=0` all of it runs on the caller's thread instead (same bytes);
    `writer_queue=None` picks one by `default_writer_queue`. The partition is built in a
    temp sibling and renamed over `out_dir` only when complete, so a crash, or an error on
    the writer thread (raised here as a RuntimeError), leaves the previous partition as it
    was. `on_progress(done_users, total_users)` runs after each batch's
    forward pass.
    """
    layer_block(model, layer)  # fail on a bad layer before any work
    if writer_queue is None:
        writer_queue = default_writer_queue(device)
    if batch_users < 1 or rows_per_shard < 1 or row_group_rows < 1 or writer_queue < 0:
        raise ValueError(
            f"batch_users={batch_users}, rows_per_shard={rows_per_shard}, "
            f"row_group_rows={row_group_rows}, writer_queue={writer_queue}; all must be >= 1 "
            "(writer_queue >= 0)"
        )
    started = time.perf_counter()
    max_len, dim = model.config.max_len, model.config.hidden_size
    was_training = model.training
    model.to(device).eval()
    forward_seconds = 0.0
    out_dir = Path(out_dir)
    try:
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            stats = _BatchStats(
                _ShardSink(tmp, activation_schema(dim), rows_per_shard, row_group_rows)
            )
            writer = _WriterThread(stats, writer_queue, out_dir) if writer_queue else None
            try:
                for start in range(0, len(sequences), batch_users):
                    batch = sequences[start : start + batch_users]
                    windows = [np.asarray(s[-max_len:]) for s in batch]
                    if sum(len(w) for w in windows):
                        tick = time.perf_counter()
                        hidden = read_hidden(model, pad_right(windows).to(device), layer)
                        hidden = hidden.float().cpu().numpy()  # zero-copy on CPU in float32
                        forward_seconds += time.perf_counter() - tick
                        lengths = np.array([len(s) for s in batch], dtype=np.int64)
                        item = _Batch(start + 1, lengths, windows, hidden)
                        if writer is not None:
                            writer.submit(item)
                        else:
                            stats.add(item)
                    if on_progress is not None:
                        on_progress(min(start + batch_users, len(sequences)), len(sequences))
                shards = writer.close() if writer is not None else stats.sink.finish()
            except BaseException:
                if writer is not None:
                    writer.cancel()
                else:
                    stats.sink.abort()
                raise
    finally:
        model.train(was_training)
    rows = stats.rows
    size = sum(p.stat().st_size for p in out_dir.glob(SHARD_GLOB))
    return ShardReport(
        rows=rows,
        shards=shards,
        bytes=size,
        seconds=time.perf_counter() - started,
        forward_seconds=forward_seconds,
        dim=dim,
        n_nonfinite=stats.nonfinite,
        mean_norm=stats.norm_sum / rows if rows else float("nan"),
    )


def _shard_files(partition: Path) -> list[pq.ParquetFile]:
    files = sorted(Path(partition).glob(SHARD_GLOB))
    if not files:
        raise FileNotFoundError(
            f"{partition} holds no {SHARD_GLOB}; materialize the activations with "
            "write_activations first"
        )
    return [pq.ParquetFile(f) for f in files]


def _check_request(columns: Sequence[str], split: str | None) -> list[str]:
    columns = list(columns)
    known = (*INT_COLUMNS, "activation")
    unknown = [c for c in columns if c not in known]
    if not columns or unknown:
        raise ValueError(
            f"columns={columns}; pick from {list(known)} (filter rows by `split=` instead of "
            "reading the split column)"
        )
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {list(SPLITS)} or None for all rows")
    return columns


def _read_group(
    shard: pq.ParquetFile, group: int, columns: list[str], split: str | None
) -> dict[str, np.ndarray]:
    """One row group's columns as numpy (activation as float32 [rows, d]), split-filtered."""
    table = shard.read_row_group(group, columns=columns + (["split"] if split else []))
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    arrays = {}
    for name in columns:
        column = table[name].combine_chunks()
        if name == "activation":
            dim = column.type.list_size
            arrays[name] = column.flatten().to_numpy().reshape(-1, dim)
        else:
            arrays[name] = column.to_numpy()
    return arrays


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def iter_in_file_order(
    partition_dir: Path,
    columns: Sequence[str] = ("activation",),
    split: str | None = None,
) -> Iterator[dict[str, Tensor]]:
    """One pass over the partition in file order, one row group at a time (deterministic;
    for encoding and statistics, where shuffling is not wanted)."""
    columns = _check_request(columns, split)
    for shard in _shard_files(partition_dir):
        for group in range(shard.num_row_groups):
            part = _read_group(shard, group, columns, split)
            if len(part[columns[0]]):
                # Arrow hands out read-only buffers; torch wants writable memory.
                yield {
                    name: torch.from_numpy(np.require(values, requirements="W"))
                    for name, values in part.items()
                }


def partition_rows(partition_dir: Path) -> int:
    """Rows in the partition, from the Parquet footers."""
    return sum(shard.metadata.num_rows for shard in _shard_files(partition_dir))


def iter_activation_batches(
    partition_dir: Path,
    batch_size: int,
    seed: int = 0,
    shuffle_buffer_rows: int = 262_144,
    columns: Sequence[str] = ("activation",),
    split: str | None = None,
) -> Iterator[dict[str, Tensor]]:
    """One shuffled pass over the partition as dicts of tensors keyed by column name.

    activation is float32 [B, d], the other columns int32 [B]. Row groups are visited in a
    seeded random order and pooled until the buffer holds `shuffle_buffer_rows` rows, which
    are then permuted (seeded) and yielded; leftovers short of a batch carry into the next
    buffer. Every row (of `split`, if given) comes exactly once; only the last batch may be
    smaller. Memory: about twice the buffer plus one row group. Pass seed + epoch for a new
    order per epoch.
    """
    if batch_size < 1 or shuffle_buffer_rows < 1:
        raise ValueError(f"batch_size={batch_size}, shuffle_buffer_rows={shuffle_buffer_rows}")
    columns = _check_request(columns, split)
    shards = _shard_files(partition_dir)
    groups = [(s, g) for s, shard in enumerate(shards) for g in range(shard.num_row_groups)]
    rng = np.random.default_rng(seed)
    buffer: list[dict[str, np.ndarray]] = []
    buffered = 0

    def drain(final: bool) -> Iterator[dict[str, Tensor]]:
        nonlocal buffer, buffered
        pooled = _concat(buffer)
        order = rng.permutation(buffered)
        keep = buffered if final else buffered - buffered % batch_size
        for start in range(0, keep, batch_size):
            index = order[start : min(start + batch_size, keep)]
            yield {name: torch.from_numpy(values[index]) for name, values in pooled.items()}
        leftover = order[keep:]
        buffer = [{name: values[leftover] for name, values in pooled.items()}]
        buffered = len(leftover)

    for g in rng.permutation(len(groups)):
        shard, group = groups[g]
        part = _read_group(shards[shard], group, columns, split)
        buffer.append(part)
        buffered += len(part[columns[0]])
        if buffered >= shuffle_buffer_rows:
            yield from drain(final=False)
    if buffered:
        yield from drain(final=True)


def load_activations(
    partition_dir: Path,
    max_bytes: int,
    columns: Sequence[str] = ("activation",),
    split: str | None = None,
) -> dict[str, Tensor]:
    """The whole partition's columns as tensors (file order), if they fit in `max_bytes`.

    The size checked is the in-memory size of the requested columns over all rows, before the
    split filter; over budget it raises and the caller should stream with
    `iter_activation_batches`.
    """
    columns = _check_request(columns, split)
    shards = _shard_files(partition_dir)
    total_rows = sum(shard.metadata.num_rows for shard in shards)
    dim = shards[0].schema_arrow.field("activation").type.list_size
    row_bytes = sum(4 * dim if name == "activation" else 4 for name in columns)
    needed = total_rows * row_bytes
    if needed > max_bytes:
        raise MemoryError(
            f"{partition_dir}: {total_rows} rows x {row_bytes} bytes of {columns} = {needed} "
            f"bytes exceeds max_bytes={max_bytes}; stream it with iter_activation_batches or "
            "raise the budget"
        )
    out = {
        name: np.empty((total_rows, dim), np.float32)
        if name == "activation"
        else np.empty(total_rows, np.int32)
        for name in columns
    }
    filled = 0
    for shard in shards:
        for group in range(shard.num_row_groups):
            part = _read_group(shard, group, columns, split)
            rows = len(part[columns[0]])
            for name, values in part.items():
                out[name][filled : filled + rows] = values
            filled += rows
    return {name: torch.from_numpy(values[:filled]) for name, values in out.items()}
