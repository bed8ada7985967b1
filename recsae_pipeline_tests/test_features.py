"""Feature statistics and steering, unit by unit, on hand-built inputs."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsae_pipeline.activations.hooks import edit_hidden, read_hidden
from recsae_pipeline.activations.shards import activation_schema
from recsae_pipeline.data.batching import pad_right
from recsae_pipeline.models.metrics import dense_auc, sparse_auc
from recsae_pipeline.models.recommender import Recommender, RecommenderConfig
from recsae_pipeline.sae.features import (
    enrichment,
    monosemanticity,
    neuron_top_items,
    write_feature_activations,
)
from recsae_pipeline.sae.model import SaeConfig, TopKSae
from recsae_pipeline.sae.steering import (
    SteeringPoint,
    add_direction,
    clamp_to_zero,
    genre_share,
    genre_targets,
    last_block_states,
    run_edit,
    steering_users,
    summarize,
    top_k_and_ranks,
)
from recsae_pipeline.storage.registry import shard_name


def reference_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a positive outscores a negative, ties counting one half (brute force)."""
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return (greater + 0.5 * ties) / (len(pos) * len(neg))


def test_sparse_auc_matches_brute_force_with_the_zero_tie_group() -> None:
    gen = torch.Generator().manual_seed(0)
    rows, n_latents, k = 300, 12, 3
    pre = torch.rand(rows, n_latents, generator=gen)
    values, indices = pre.topk(k, dim=1)
    values[:50, 0] = 0.0  # some top-k slots inactive (ReLU zeros) are not entries
    labels = torch.rand(rows, 4, generator=gen) < torch.tensor([0.1, 0.3, 0.5, 0.05])
    labels[:, 3] |= (indices == 5).any(1)  # a concept that feature 5 detects well
    auc = sparse_auc(values, indices, labels, n_latents, chunk=3)
    dense = torch.zeros(rows, n_latents).scatter(1, indices, values)
    for f in range(n_latents):
        for c in range(labels.shape[1]):
            want = reference_auc(dense[:, f].numpy(), labels[:, c].numpy())
            assert auc[f, c].item() == pytest.approx(want, abs=1e-5)
    assert auc[5, 3] > 0.9


def test_dense_auc_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 5, generator=gen)
    labels = torch.rand(200, 2, generator=gen) < 0.3
    x[:, 2] += 3 * labels[:, 0]
    auc = dense_auc(x, labels)
    for d in range(5):
        for c in range(2):
            want = reference_auc(x[:, d].numpy(), labels[:, c].numpy())
            assert auc[d, c].item() == pytest.approx(want, abs=1e-5)
    assert auc[2, 0] > 0.9


def _attrs(con: duckdb.DuckDBPyConnection) -> None:
    # Items 1-4 are Comedy, 5-8 Drama; item 1 also in franchise F.
    rows = [(i, "genre", "Comedy") for i in range(1, 5)] + [
        (i, "genre", "Drama") for i in range(5, 9)
    ]
    rows.append((1, "franchise", "F"))
    con.register("attrs_in", pa.table({"item_idx": [r[0] for r in rows], "family": [r[1] for r in rows], "value": [r[2] for r in rows]}))  # fmt: skip
    con.execute("CREATE TEMP TABLE attrs AS SELECT * FROM attrs_in")


def test_enrichment_purity_and_monosemanticity_against_the_base_rate() -> None:
    con = duckdb.connect()
    _attrs(con)
    # Items 1-8 occur: base rate of Comedy = Drama = 0.5, of franchise F = 1/8.
    con.register("base", pa.table({"item_idx": list(range(1, 9))}))
    top = pa.table(
        {
            "unit": [0] * 4 + [1] * 4 + [2] * 2,
            "sign": ["+"] * 10,
            "item_idx": [1, 2, 3, 4, 1, 5, 2, 6, 1, 3],
            "value": [1.0] * 10,
        }
    )
    con.register("top", top)
    table = enrichment(con, "top", "base", min_support=3)
    rows = {(r["unit"], r["family"], r["value"]): r for r in table.to_pylist()}
    assert rows[(0, "genre", "Comedy")]["share"] == 1.0
    assert rows[(0, "genre", "Comedy")]["purity"] == pytest.approx(1.0)
    assert rows[(1, "genre", "Comedy")]["purity"] == pytest.approx(0.0)  # half, as by chance
    assert rows[(0, "franchise", "F")]["lift"] == pytest.approx(0.25 / 0.125)
    assert not any(unit == 2 for unit, _, _ in rows)  # below min_support
    mono = {r["unit"]: r for r in monosemanticity(table).to_pylist()}
    assert mono[0]["best_attribute"] == "genre:Comedy"
    assert mono[0]["monosemanticity"] == pytest.approx(1.0)
    assert mono[1]["monosemanticity"] == pytest.approx((0.25 - 0.125) / 0.875)


def write_partition(directory: Path, x: np.ndarray, users: np.ndarray, items: np.ndarray) -> None:
    directory.mkdir(parents=True)
    table = pa.table(
        {
            "user_idx": users.astype(np.int32),
            "position": np.arange(len(x), dtype=np.int32),
            "item_idx": items.astype(np.int32),
            "target_idx": items.astype(np.int32),
            "split": ["train"] * len(x),
            "activation": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]),
        },
        schema=activation_schema(x.shape[1]),
    )
    pq.write_table(table, directory / shard_name(0), row_group_size=64)


def test_neuron_top_items_are_distinct_items_by_extreme_value_in_both_signs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)).astype(np.float32)
    items = rng.integers(1, 60, size=500)
    write_partition(tmp_path / "p", x, np.arange(500) // 10, items)
    top = neuron_top_items(tmp_path / "p", top_n=7).to_pylist()
    for dim in range(3):
        per_item_max = {i: x[items == i, dim].max() for i in np.unique(items)}
        per_item_min = {i: x[items == i, dim].min() for i in np.unique(items)}
        plus = {r["item_idx"]: r["value"] for r in top if r["unit"] == dim and r["sign"] == "+"}
        minus = {r["item_idx"]: r["value"] for r in top if r["unit"] == dim and r["sign"] == "-"}
        assert len(plus) == len(minus) == 7
        assert set(plus) == set(sorted(per_item_max, key=per_item_max.get, reverse=True)[:7])
        assert set(minus) == set(sorted(per_item_min, key=per_item_min.get)[:7])
        assert all(plus[i] == pytest.approx(per_item_max[i]) for i in plus)
        assert all(minus[i] == pytest.approx(per_item_min[i]) for i in minus)


def test_feature_activations_are_the_sae_code_sorted_by_feature(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    write_partition(tmp_path / "p", x, np.arange(300) // 5, np.arange(300) % 30 + 1)
    sae = TopKSae(
        SaeConfig(d_in=8, expansion=4, k=3), "cpu", sample=torch.from_numpy(x), seed=0
    ).eval()
    out = tmp_path / "features" / "part-00000.parquet"
    report = write_feature_activations(sae, tmp_path / "p", out, "cpu")
    table = pq.read_table(out)
    assert report.rows == 300 and report.entries == len(table)
    features = table["feature"].to_numpy()
    assert (np.diff(features) >= 0).all()
    with torch.no_grad():
        values, indices = sae.encode(torch.from_numpy(x))
    want = {
        (p, int(i)): float(v)
        for p in range(300)
        for v, i in zip(values[p], indices[p], strict=True)
        if v > 0
    }
    got = {
        (p, f): v
        for p, f, v in zip(
            table["position"].to_pylist(),
            features.tolist(),
            table["value"].to_pylist(),
            strict=True,
        )
    }
    assert got.keys() == want.keys()
    assert all(got[key] == pytest.approx(want[key], rel=1e-6) for key in want)
    assert not list(out.parent.glob(".*"))  # no temp or scratch files left behind


def tiny_model() -> Recommender:
    torch.manual_seed(0)
    config = RecommenderConfig(
        kind="sasrec", num_items=12, hidden_size=8, d_item=8, num_layers=2, num_heads=1, max_len=6
    )
    return Recommender(config).eval()


def test_clamp_removes_exactly_the_feature_contribution() -> None:
    sae = TopKSae(SaeConfig(d_in=8, expansion=2, k=2), "cpu", seed=0).eval()
    h = torch.randn(3, 4, 8)
    values, indices = sae.encode(h.reshape(-1, 8))
    feature = int(indices[0, 0])
    z = (values * (indices == feature)).sum(-1)
    edited = clamp_to_zero(sae, feature)(h)
    removed = (h - edited).reshape(-1, 8)
    assert torch.allclose(removed, z[:, None] * sae.decoder_direction(feature), atol=1e-6)
    unused = next(f for f in range(16) if not (indices == f).any())
    assert torch.equal(clamp_to_zero(sae, unused)(h), h)


def test_adding_a_direction_shifts_the_hidden_state_and_the_top_10_hides_seen_items() -> None:
    model = tiny_model()
    sequences = [np.array([1, 2, 3, 4, 5]), np.array([6, 7, 8, 9]), np.array([2, 4, 6, 8, 10])]
    users = steering_users(sequences, max_len=6, device="cpu")
    sae = TopKSae(SaeConfig(d_in=8, expansion=2, k=2), "cpu", seed=0).eval()
    before = read_hidden(model, users.inputs, 1)
    with edit_hidden(model, 1, add_direction(sae, 3, 2.5)):
        after = read_hidden(model, users.inputs, 1)
        steered, _ = top_k_and_ranks(model, users, k=5)
    assert torch.allclose(
        after - before, 2.5 * sae.decoder_direction(3).expand_as(before), atol=1e-5
    )
    plain, ranks = top_k_and_ranks(model, users, k=5)
    assert not torch.equal(plain, steered)  # the edit reaches the scores
    seen = pad_right([s[:-1] for s in sequences])
    for top in (plain, steered):
        assert not any(int(i) in set(seen[u].tolist()) for u in range(3) for i in top[u])
    assert (ranks >= 0).all() and genre_share(plain, torch.ones(13, dtype=torch.bool)) == 1.0


def test_summary_picks_the_best_share_within_the_ndcg_bound() -> None:
    points = [
        SteeringPoint("Comedy", 3, "baseline", 0, 0, 0.10, 0.20),
        SteeringPoint("Comedy", 3, "add", 1, 2.0, 0.25, 0.19),
        SteeringPoint("Comedy", 3, "add", 2, 4.0, 0.35, 0.17),
        SteeringPoint("Comedy", 3, "add", 4, 8.0, 0.90, 0.05),  # too costly
        SteeringPoint("Comedy", 3, "clamp", 0, 0, 0.05, 0.20),
    ]
    (outcome,) = summarize(points, max_ndcg_loss=0.2, required_ratio=3.0)
    assert outcome.best_share == 0.35 and outcome.best_alpha_scale == 2
    assert outcome.share_ratio == pytest.approx(3.5) and outcome.met
    assert outcome.ndcg_loss == pytest.approx(0.15) and outcome.clamp_share == 0.05
    absent = [p._replace(genre="Western", share=0.0) for p in points]
    (outcome,) = summarize(absent)
    assert outcome.share_ratio == 1.0 and not outcome.met  # 0 -> 0 is no gain


def test_genre_targets_take_the_purest_supported_feature() -> None:
    rows = [
        {"kind": "feature", "unit": 1, "family": "genre", "value": "Comedy", "top_items": 100, "purity": 0.6},
        {"kind": "feature", "unit": 2, "family": "genre", "value": "Comedy", "top_items": 10, "purity": 0.9},
        {"kind": "neuron", "unit": 3, "family": "genre", "value": "Comedy", "top_items": 100, "purity": 0.95},
        {"kind": "feature", "unit": 4, "family": "decade", "value": "1990s", "top_items": 100, "purity": 0.9},
        {"kind": "feature", "unit": 5, "family": "genre", "value": "Drama", "top_items": 100, "purity": 0.3},
    ]  # fmt: skip
    targets = genre_targets(rows, {1: 2.0, 2: 1.0, 5: 0.5}, min_top_items=50)
    assert targets == {"Comedy": (1, 2.0), "Drama": (5, 0.5)}


@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
def test_last_layer_fast_path_equals_the_full_forward(backbone: str) -> None:
    torch.manual_seed(0)
    config = RecommenderConfig(
        kind="sasrec", num_items=30, hidden_size=8, d_item=8, num_layers=2, num_heads=2, max_len=6,
        backbone=backbone,
    )  # fmt: skip
    model = Recommender(config).eval()
    rng = np.random.default_rng(0)
    sequences = [rng.permutation(np.arange(1, 31))[: rng.integers(3, 12)] for _ in range(20)]
    users = steering_users(sequences, max_len=6, device="cpu")
    sae = TopKSae(SaeConfig(d_in=8, expansion=2, k=3), "cpu", seed=0).eval()
    last = last_block_states(model, users)
    for edit in (add_direction(sae, 2, 3.0), clamp_to_zero(sae, 4), None):
        fast_top, fast_ranks = top_k_and_ranks(model, users, edit=edit, last_block=last)
        if edit is None:
            slow_top, slow_ranks = top_k_and_ranks(model, users)
        else:
            with edit_hidden(model, 2, edit):
                slow_top, slow_ranks = top_k_and_ranks(model, users)
        assert torch.equal(fast_ranks, slow_ranks) and torch.equal(fast_top, slow_top)
        assert torch.equal(run_edit(model, 2, users, edit or (lambda h: h), last)[1], slow_ranks)
