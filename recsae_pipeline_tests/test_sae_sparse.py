"""The SAE's fast training paths agree with the plain ones: `top_k` picks torch.topk's latents,
the sparse passes (`_KeptPreActivations`, `_SparseDecode`) give autograd's dense losses and
gradients for every sparsity rule, with and without whitening and AuxK, the chunked encoder
gives the same code on one thread or split between workers and at any batch size after
another, and `train_sae` trains the same SAE either way, running its loop on one thread and
giving the caller's thread count back; the prefetching reader keeps the order, raises its
source's error and stops when closed."""

from __future__ import annotations

import copy
import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from recsae_pipeline.sae import model as sae_model
from recsae_pipeline.sae.model import (
    KeptLatents,
    SaeConfig,
    TopKSae,
    _group_size,
    intra_op_threads,
    top_k,
)
from recsae_pipeline.sae.training import SaeTrainConfig, prefetched, train_sae
from recsae_pipeline_tests.test_sae import write_partition

pytestmark = pytest.mark.usefixtures("one_thread")


def as_sets(indices: torch.Tensor) -> list[set[int]]:
    return [set(row) for row in indices.tolist()]


def dense_code(out, n_latents: int) -> torch.Tensor:
    values = out.latent_values.detach()
    return torch.zeros(len(values), n_latents).scatter(-1, out.latent_indices, values)


@pytest.mark.parametrize(("n", "k"), [(2048, 32), (1024, 32), (256, 32), (128, 4), (40, 7)])
def test_top_k_picks_the_latents_torch_topk_picks(n: int, k: int):
    pre = torch.randn(300, n, generator=torch.Generator().manual_seed(n + k))
    values, ids = top_k(pre, k)
    reference = pre.topk(k, dim=-1, sorted=False)
    assert as_sets(ids) == as_sets(reference.indices)
    assert torch.equal(values, pre.gather(-1, ids))
    assert ids.dtype == torch.long and ids.shape == (300, k)


def test_top_k_finds_the_largest_entries_when_they_share_one_group():
    # All k largest of a row in one strided group (columns j, j + n/s, ...) and the rest of
    # that row's groups holding the next largest: the group step must still keep them all
    n, k = 2048, 32
    assert _group_size(n, k) == 8
    groups = n // 8
    pre = torch.rand(4, n)
    pre[0, torch.arange(8) * groups] = 10 + torch.arange(8.0)  # 8 of the top k in group 0
    pre[1, :k] = 5 + torch.rand(k)  # the top k in k adjacent groups
    pre[2] = -torch.rand(n)  # every entry negative
    pre[3, ::groups] = torch.inf
    assert as_sets(top_k(pre, k)[1]) == as_sets(pre.topk(k, dim=-1, sorted=False).indices)


def test_group_sizes_balance_the_two_selections():
    assert [_group_size(n, 32) for n in (2048, 4096, 8192, 1024, 256)] == [8, 8, 16, 4, 1]
    assert _group_size(2048 + 2, 32) == 1  # no power of two >= 4 divides it


@pytest.mark.parametrize(
    "config",
    [
        SaeConfig(d_in=16, expansion=8, k=4),
        SaeConfig(d_in=16, expansion=8, k=4, batch_topk=True),
        SaeConfig(d_in=16, expansion=8, k=4, whitening_shrinkage=0.1),
        SaeConfig(d_in=16, expansion=8, k=4, aux_k=3),  # AuxK picks 3 of the dead
        SaeConfig(d_in=16, expansion=8, k=4, aux_k=100),  # AuxK takes every dead latent
        SaeConfig(d_in=16, expansion=8, k=4, l1_coefficient=0.1),
    ],
    ids=["topk", "batch_topk", "whitened", "auxk_top", "auxk_all", "relu_l1"],
)
def test_the_sparse_passes_give_autograds_dense_losses_and_gradients(config: SaeConfig):
    x = torch.randn(300, 16) * torch.linspace(0.2, 3, 16) + 1
    dead = torch.zeros(config.n_latents, dtype=torch.bool)
    dead[::3] = True
    outputs, grads = {}, {}
    for sparse in (True, False):
        sae = TopKSae(config, sample=x[:200], seed=1).train()
        sae.sparse_backward = sparse
        out = sae(x, dead)
        out.loss.backward()
        outputs[sparse] = out
        grads[sparse] = {name: p.grad for name, p in sae.named_parameters()}
    assert outputs[True].auxk_loss > 0
    for field in ("loss", "fvu", "auxk_loss", "l0", "reconstruction"):
        torch.testing.assert_close(
            getattr(outputs[True], field), getattr(outputs[False], field), rtol=1e-5, atol=1e-6
        )
    # The same code, whatever order each row lists its latents in
    n = config.n_latents
    torch.testing.assert_close(dense_code(outputs[True], n), dense_code(outputs[False], n))
    for name, dense in grads[False].items():
        assert dense.abs().max() > 0, name
        torch.testing.assert_close(
            grads[True][name], dense, rtol=1e-4, atol=1e-6 * dense.abs().max()
        )


def test_the_kept_latents_matrix_and_its_transpose_are_the_dense_code():
    indices = torch.tensor([[3, 0, 5], [5, 1, 3]])
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    dense = torch.zeros(2, 7).scatter(-1, indices, values)
    latents = KeptLatents(indices, 7)
    assert torch.equal(latents.matrix(values).to_dense(), dense)
    assert torch.equal(latents.transposed(values).to_dense(), dense.T)
    pointers, rows, order = latents.by_latent()
    assert pointers.tolist() == [0, 1, 2, 2, 4, 4, 6, 6]
    assert rows.tolist() == [0, 1, 0, 1, 0, 1]  # latent 0, 1, 3 (both rows), 5 (both rows)
    assert order.tolist() == [1, 4, 0, 5, 2, 3]


def test_the_chunked_encoder_gives_one_code_on_one_thread_or_split_between_workers():
    config = SaeConfig(d_in=8, expansion=16, k=4)
    x = torch.randn(3 * sae_model.CHUNK_ROWS + 5, 8)  # chunks short of a full one too
    sae = TopKSae(config, sample=x, seed=2).train()
    dead = torch.zeros(config.n_latents, dtype=torch.bool)
    dead[5:40] = True
    outputs = []
    for threads in (None, 2, 3):
        sae.dense_threads = threads
        outputs.append(sae(x, dead))
    for out in outputs[1:]:
        for field in ("loss", "auxk_loss", "latent_values", "reconstruction"):
            assert torch.equal(getattr(out, field), getattr(outputs[0], field))
        assert as_sets(out.latent_indices) == as_sets(outputs[0].latent_indices)


def test_a_reused_workspace_encodes_every_batch_size_as_a_fresh_model():
    config = SaeConfig(d_in=8, expansion=16, k=4)
    sample = torch.randn(500, 8)
    reused = TopKSae(config, sample=sample, seed=2).train()
    for rows in (300, 100, 450):
        x = torch.randn(rows, 8)
        fresh = copy.deepcopy(reused)
        fresh._workspace = None
        torch.testing.assert_close(reused(x).reconstruction, fresh(x).reconstruction)
        with torch.no_grad():  # eval-style calls skip the sparse passes entirely
            torch.testing.assert_close(reused(x).reconstruction, fresh(x).reconstruction)


def test_intra_op_threads_sets_and_restores_the_count():
    before = torch.get_num_threads()
    with intra_op_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), intra_op_threads(2):
        raise RuntimeError("restored anyway")
    assert torch.get_num_threads() == before
    with intra_op_threads(None):
        assert torch.get_num_threads() == before


def test_training_with_the_sparse_passes_trains_the_same_sae(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    x = np.random.default_rng(4).normal(size=(3000, 16)) @ np.random.default_rng(5).normal(
        size=(16, 16)
    )
    partition = write_partition(tmp_path / "acts", x)
    config = SaeConfig(d_in=16, expansion=8, k=4, dead_after_rows=600)
    train = SaeTrainConfig(batch_size=256, rows_seen=6000, log_every=5, lr=3e-3)
    results = {}
    for sparse in (True, False):
        monkeypatch.setattr(TopKSae, "sparse_backward", sparse)
        results[sparse] = train_sae(partition, train, config, "cpu")
    assert any(point.auxk_loss > 0 for point in results[True].curve)
    for point, dense in zip(results[True].curve, results[False].curve, strict=True):
        assert point.fvu == pytest.approx(dense.fvu, rel=1e-3)
        assert point.auxk_loss == pytest.approx(dense.auxk_loss, rel=1e-3, abs=1e-6)
    assert results[True].heldout["fvu"] == pytest.approx(results[False].heldout["fvu"], rel=1e-3)


def test_training_runs_its_loop_on_one_thread_and_gives_the_threads_back(tmp_path: Path):
    partition = write_partition(tmp_path / "acts", np.random.default_rng(0).normal(size=(800, 8)))
    seen: list[int] = []
    with intra_op_threads(2):
        result = train_sae(
            partition,
            SaeTrainConfig(batch_size=128, rows_seen=512, log_every=1),
            SaeConfig(d_in=8, expansion=4, k=2),
            "cpu",
            on_progress=lambda rows, total, point: seen.append(torch.get_num_threads()),
        )
        assert torch.get_num_threads() == 2
    assert seen == [1, 1, 1, 1]
    assert result.sae.dense_threads == 2


def test_prefetched_keeps_the_order_and_raises_the_sources_error():
    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad shard")

    reader = prefetched(failing())
    assert next(reader) == 1
    with pytest.raises(ValueError, match="bad shard"):
        next(reader)


def test_closing_prefetched_stops_its_producer():
    produced: list[int] = []

    def endless():
        for i in itertools.count():
            produced.append(i)
            yield i

    reader = prefetched(endless(), depth=2)
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    reader.close()  # joins the producer
    count = len(produced)
    assert count <= 3 + 2 + 1  # consumed, queued, one in hand
    assert not any(t.name == "recsae-sae-reader" for t in threading.enumerate())
