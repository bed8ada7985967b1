"""Activations: hooks read and replace a layer's state; shards hold every real position's state
at the right (user, position) with its split; rewrites are atomic; the reader shuffles with a
seed and yields every row exactly once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from recsae_pipeline.activations import shards
from recsae_pipeline.activations.hooks import edit_hidden, read_hidden
from recsae_pipeline.activations.shards import (
    activation_schema,
    default_writer_queue,
    expected_rows,
    iter_activation_batches,
    load_activations,
    write_activations,
)
from recsae_pipeline.data.batching import pad_right
from recsae_pipeline.models.recommender import Recommender, RecommenderConfig
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline_tests.torch_support import CPU

NUM_ITEMS, MAX_LEN, LAYERS = 30, 8, 2
ATOL = 1e-7  # shards vs a fresh single-user forward pass (states ~0.03; seen diffs ~2e-9)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(backbone: str = "gpt2") -> Recommender:
    torch.manual_seed(0)
    config = RecommenderConfig.sasrec(
        NUM_ITEMS,
        hidden_size=8,
        d_item=8,
        num_layers=LAYERS,
        num_heads=2,
        max_len=MAX_LEN,
        backbone=backbone,
    )
    return Recommender(config).eval()


def tiny_sequences() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 13, size=20)
    lengths[:3] = [12, 3, MAX_LEN]  # longer than, shortest, exactly max_len
    return [rng.integers(1, NUM_ITEMS + 1, size=n).astype(np.int32) for n in lengths]


def write(tmp_path: Path, layer: int = 1, **kwargs):
    out = ArtifactPaths(tmp_path).partition("sasrec", layer).activations
    kwargs = {"rows_per_shard": 30, "row_group_rows": 7, "batch_users": 6} | kwargs
    model = kwargs.pop("model", None) or tiny_model()
    return out, write_activations(model, tiny_sequences(), layer, out, CPU, **kwargs)


def block_output(model: Recommender, items: torch.Tensor, layer: int) -> torch.Tensor:
    """Reference state, independent of hooks.py: hidden_states, or a plain hook on the last block."""
    with torch.no_grad():
        if layer < model.config.num_layers:
            return model(items, output_hidden_states=True).hidden_states[layer]
        seen = []
        handle = model.layers[layer - 1].register_forward_hook(lambda m, i, o: seen.append(o))
        model(items)
        handle.remove()
        return seen[0]


def expected_labels(sequence: np.ndarray) -> list[tuple[int, int, int, str]]:
    """(position, item, target, split) for each position the model sees, by the contract."""
    n = len(sequence)
    rows = []
    for p in range(max(0, n - MAX_LEN), n):
        target = int(sequence[p + 1]) if p + 1 < n else 0
        split = {n - 2: "valid", n - 1: "test", n: "none"}.get(p + 1, "train")
        rows.append((p, int(sequence[p]), target, split))
    return rows


@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
def test_read_hidden_is_the_block_output_and_the_last_layer_is_before_the_final_norm(backbone):
    model = tiny_model(backbone)
    items = pad_right([np.array([3, 1, 4, 1, 5]), np.array([9, 2])])
    with torch.no_grad():
        states = model(items, output_hidden_states=True).hidden_states
        own_hooks = list(model.layers[0]._forward_hooks)  # transformers' recorder
        assert torch.equal(read_hidden(model, items, 1), states[1])
        last = read_hidden(model, items, LAYERS)
        assert not torch.allclose(last, states[LAYERS])
        torch.testing.assert_close(model.final_norm(last), states[LAYERS])
    assert list(model.layers[0]._forward_hooks) == own_hooks
    for bad in (0, LAYERS + 1, True):
        with pytest.raises(ValueError, match=f"pick 1..{LAYERS}"):
            read_hidden(model, items, bad)


@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
@pytest.mark.parametrize("layer", [1, LAYERS])
def test_edit_hidden_replaces_the_state_downstream_and_is_removed_after(backbone, layer):
    model = tiny_model(backbone)
    items = pad_right([np.array([3, 1, 4, 1, 5]), np.array([9, 2])])
    with torch.no_grad():
        before = model.predict(items)
        model(items, output_hidden_states=True)  # transformers installs its recorder hooks now
        own_hooks = list(model.layers[layer - 1]._forward_hooks)
        with edit_hidden(model, layer, lambda h: h):
            assert torch.equal(model.predict(items), before)
        with edit_hidden(model, layer, torch.zeros_like):
            zeroed = model.predict(items)
            assert torch.equal(read_hidden(model, items, layer), torch.zeros(2, 5, 8))
            if layer < LAYERS:
                states = model(items, output_hidden_states=True).hidden_states
                assert torch.equal(states[layer], torch.zeros(2, 5, 8))
        assert not torch.allclose(zeroed, before)
        with pytest.raises(RuntimeError, match="boom"), edit_hidden(model, layer, torch.zeros_like):
            raise RuntimeError("boom")
        with (
            edit_hidden(model, layer, lambda h: h[:, :1]),
            pytest.raises(ValueError, match="shape"),
        ):
            model.predict(items)
        assert list(model.layers[layer - 1]._forward_hooks) == own_hooks
        assert torch.equal(model.predict(items), before)


def test_edit_hidden_handles_blocks_that_return_tuples():
    class TupleBlock(nn.Module):
        def forward(self, x):
            return x + 1, "extra"

    class TupleModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = RecommenderConfig.sasrec(NUM_ITEMS, num_layers=1)
            self.layers = nn.ModuleList([TupleBlock()])

        def forward(self, x):
            return self.layers[0](x)

    model, x = TupleModel(), torch.zeros(1, 2, 3)
    with edit_hidden(model, 1, lambda h: 2 * h):
        assert model(x)[0].eq(2).all() and model(x)[1] == "extra"
        assert read_hidden(model, x, 1).eq(2).all()
    assert model(x)[0].eq(1).all()


@pytest.mark.parametrize("layer", range(1, LAYERS + 1))
def test_shards_hold_each_users_state_at_its_position_with_target_and_split(tmp_path, layer):
    model = tiny_model()
    out, report = write(tmp_path, layer, model=model)
    sequences = tiny_sequences()
    table = pq.read_table(out).sort_by([("user_idx", "ascending"), ("position", "ascending")])

    assert table.schema.equals(activation_schema(8))
    assert not any(f.nullable for f in table.schema)  # and no null-able activation value:
    assert not table.schema.field("activation").type.value_field.nullable
    assert report.rows == table.num_rows == expected_rows(sequences, MAX_LEN)
    assert (report.dim, report.n_nonfinite, report.shards) == (8, 0, len(list(out.iterdir())))
    acts = np.stack(table["activation"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(report.mean_norm, np.linalg.norm(acts, axis=1).mean(), rtol=1e-5)

    user_idx, splits = table["user_idx"].to_numpy(), np.array(table["split"].to_pylist())
    for i, sequence in enumerate(sequences):
        rows = user_idx == i + 1
        got = list(
            zip(
                table["position"].to_numpy()[rows].tolist(),
                table["item_idx"].to_numpy()[rows].tolist(),
                table["target_idx"].to_numpy()[rows].tolist(),
                splits[rows].tolist(),
                strict=True,
            )
        )
        assert got == expected_labels(sequence)
        fresh = block_output(model, torch.from_numpy(sequence[-MAX_LEN:]).long()[None], layer)[0]
        np.testing.assert_allclose(acts[rows], fresh.numpy(), rtol=0, atol=ATOL)

    for path in sorted(out.iterdir()):  # streamed: full shards of full row groups
        meta = pq.ParquetFile(path).metadata
        assert meta.num_rows == 30 or path == max(out.iterdir())
        assert all(meta.row_group(g).num_rows <= 7 for g in range(meta.num_row_groups))


def staged_shards(out: Path) -> list[Path]:
    """Shard files in the partition's temp siblings (a write in progress)."""
    return [f for t in out.parent.iterdir() if t != out for f in t.glob("part-*.parquet")]


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "activation-shard-writer"]


@pytest.mark.parametrize("writer_queue", [0, 2])
def test_a_failed_rewrite_leaves_the_previous_partition_untouched(tmp_path, writer_queue):
    out, _ = write(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    written_before_failure = []

    def fail_after_first_batch(done, total):
        deadline = time.monotonic() + 60  # the writer thread writes the first batch meanwhile
        while len(staged_shards(out)) < 2 and writer_queue and time.monotonic() < deadline:
            time.sleep(0.01)
        written_before_failure.extend(staged_shards(out))
        raise KeyboardInterrupt("killed mid-write")

    model = tiny_model("llama").train()
    with pytest.raises(KeyboardInterrupt):
        write(
            tmp_path, model=model, rows_per_shard=5, row_group_rows=5,
            batch_users=4, on_progress=fail_after_first_batch, writer_queue=writer_queue,
        )  # fmt: skip
    assert len(written_before_failure) >= 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert list(out.parent.iterdir()) == [out]
    assert writer_threads() == [] and model.training  # the thread ended, the mode is restored

    _, report = write(tmp_path, rows_per_shard=1000)  # a good rewrite leaves no stale shard
    assert (
        sorted(p.name for p in out.iterdir())
        == ["part-00000.parquet"]
        == report.shards * ["part-00000.parquet"]
    )


@pytest.mark.parametrize("fail_at", ["third row group", "closing the last shard"])
def test_a_failure_on_the_writer_thread_is_raised_in_the_caller(tmp_path, monkeypatch, fail_at):
    out, _ = write(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_group, close = shards._ShardSink._write_group, shards._ShardSink._close
    groups, staged = [], []

    def failing_write_group(self, rows):
        groups.append(rows)
        if fail_at == "third row group" and len(groups) == 3:
            staged.extend(staged_shards(out))
            raise OSError(28, "No space left on device")
        write_group(self, rows)

    def failing_close(self):
        if fail_at == "closing the last shard" and self.writer is not None:
            staged.extend(staged_shards(out))
            raise OSError(28, "No space left on device")
        close(self)

    monkeypatch.setattr(shards._ShardSink, "_write_group", failing_write_group)
    monkeypatch.setattr(shards._ShardSink, "_close", failing_close)
    rows_per_shard = 1000 if fail_at == "closing the last shard" else 5
    with pytest.raises(RuntimeError, match="failed on the writer thread") as failure:
        write(tmp_path, rows_per_shard=rows_per_shard, row_group_rows=5, batch_users=4)
    where = "batch of user_idx" if fail_at == "third row group" else fail_at
    assert "No space left on device" in str(failure.value) and where in str(failure.value)
    assert isinstance(failure.value.__cause__, OSError)
    assert staged  # a partial partition existed when it failed, and was never published
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert list(out.parent.iterdir()) == [out]
    assert writer_threads() == []


@pytest.mark.parametrize(
    ("rows_per_shard", "row_group_rows", "batch_users"), [(30, 7, 6), (1000, 1000, 1), (13, 13, 20)]
)
def test_the_writer_thread_writes_the_same_bytes_as_the_callers_thread(
    tmp_path, rows_per_shard, row_group_rows, batch_users
):
    shape = {"rows_per_shard": rows_per_shard, "row_group_rows": row_group_rows}
    files, reports = [], []
    for writer_queue in (0, 1, 3):
        out, report = write(
            tmp_path / str(writer_queue), 2, batch_users=batch_users, writer_queue=writer_queue,
            **shape,
        )  # fmt: skip
        files.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
        reports.append(report._replace(seconds=0.0, forward_seconds=0.0))
    assert files[0] == files[1] == files[2] and len(files[0]) == reports[0].shards
    assert reports[0] == reports[1] == reports[2]


def test_a_writer_thread_only_when_the_forward_leaves_a_core_free(monkeypatch):
    monkeypatch.setattr(shards.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # torch on every core: write between batches
        assert default_writer_queue(CPU) == 0
        assert default_writer_queue(torch.device("meta")) == 2  # the forward is off the CPU
        torch.set_num_threads(1)  # a core to spare
        assert default_writer_queue(CPU) == 2
    finally:
        torch.set_num_threads(threads)


def test_the_forward_passes_run_at_most_writer_queue_batches_ahead(tmp_path, monkeypatch):
    add, forwards, ahead = shards._BatchStats.add, [], []

    def slow_add(self, batch):
        time.sleep(0.02)  # a slow disk: the forward passes run ahead until the queue is full
        add(self, batch)
        ahead.append(len(forwards) - (batch.first_user_idx - 1) // 2 - 1)

    monkeypatch.setattr(shards._BatchStats, "add", slow_add)
    write(
        tmp_path,
        batch_users=2,
        writer_queue=2,
        on_progress=lambda done, total: forwards.append(done),
    )
    assert len(ahead) == len(forwards) == 10
    assert max(ahead) <= 2


def test_reader_shuffles_with_its_seed_and_yields_every_row_once(tmp_path):
    out, report = write(tmp_path)
    table = pq.read_table(out)
    stored = {
        (u, p): a
        for u, p, a in zip(
            table["user_idx"].to_pylist(),
            table["position"].to_pylist(),
            table["activation"].to_pylist(),
            strict=True,
        )
    }

    def one_pass(seed: int, split: str | None = None) -> list[tuple[int, int]]:
        batches = list(
            iter_activation_batches(
                out, batch_size=16, seed=seed, shuffle_buffer_rows=20,
                columns=("user_idx", "position", "activation"), split=split,
            )
        )  # fmt: skip
        assert all(len(b["activation"]) == 16 for b in batches[:-1])
        assert all(b["activation"].dtype == torch.float32 for b in batches)
        keys = []
        for b in batches:
            for u, p, a in zip(b["user_idx"], b["position"], b["activation"], strict=True):
                keys.append((int(u), int(p)))
                assert a.tolist() == stored[keys[-1]]  # columns stay aligned through the shuffle
        return keys

    first = one_pass(seed=0)
    assert sorted(first) == sorted(stored) and len(first) == report.rows > 20
    assert one_pass(seed=0) == first
    assert one_pass(seed=1) != first
    file_order = {key: row for row, key in enumerate(stored)}
    steps = np.diff([file_order[key] for key in first])
    kept_neighbours = int((steps == 1).sum())
    assert kept_neighbours < len(first) / 4  # rows are shuffled within the buffer, not only groups

    splits = table["split"].to_pylist()
    train = sorted(k for k, s in zip(stored, splits, strict=True) if s == "train")
    assert sorted(one_pass(seed=0, split="train")) == train


def test_load_activations_filters_by_split_and_refuses_over_budget(tmp_path):
    out, report = write(tmp_path)
    full = load_activations(out, max_bytes=report.rows * 8 * 4)
    assert full["activation"].shape == (report.rows, 8)
    assert full["activation"].dtype == torch.float32
    expected = np.stack(pq.read_table(out)["activation"].to_numpy(zero_copy_only=False))
    assert np.array_equal(full["activation"].numpy(), expected)

    valid = load_activations(out, max_bytes=10**6, columns=("user_idx",), split="valid")
    assert valid["user_idx"].tolist() == list(range(1, len(tiny_sequences()) + 1))

    with pytest.raises(MemoryError, match="iter_activation_batches"):
        load_activations(out, max_bytes=report.rows * 8 * 4 - 1)
    with pytest.raises(ValueError, match="split="):
        load_activations(out, max_bytes=10**6, split="training")
    with pytest.raises(FileNotFoundError, match="write_activations"):
        load_activations(tmp_path / "nowhere", max_bytes=10**6)


def test_an_empty_user_list_gives_a_readable_empty_partition(tmp_path):
    out = ArtifactPaths(tmp_path).partition("sasrec", 1).activations
    report = write_activations(tiny_model(), [], 1, out, CPU)
    assert (report.rows, report.shards) == (0, 1)
    assert pq.read_table(out).schema.equals(activation_schema(8))
    assert list(iter_activation_batches(out, batch_size=4)) == []
