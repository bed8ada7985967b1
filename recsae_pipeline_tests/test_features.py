"""Feature statistics and steering, unit by unit, on hand-built inputs."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from recsae_pipeline.activations.hooks import edit_hidden, read_hidden
from recsae_pipeline.activations.shards import activation_schema
from recsae_pipeline.data.batching import pad_right
from recsae_pipeline.models.metrics import dense_auc, ndcg_at_k, per_user_ndcg, sparse_auc
from recsae_pipeline.models.recommender import Recommender, RecommenderConfig
from recsae_pipeline.sae.features import (
    FEATURE_ACTIVATION_SCHEMA,
    enrichment,
    monosemanticity,
    neuron_top_items,
    sample_rows,
    write_feature_activations,
)
from recsae_pipeline.sae.model import SaeConfig, TopKSae
from recsae_pipeline.sae.steering import (
    DIRECTIONS,
    USERS_SCHEMA,
    GenreTarget,
    SteeringPoint,
    add_direction,
    added_steps,
    at_last_position,
    centroid_direction,
    clamp_to_zero,
    clamped_features,
    genre_targets,
    last_block_at_last_position,
    last_block_states,
    last_block_with_added_steps,
    layer_states,
    neuron_direction,
    random_direction,
    share_gains,
    steering_steps,
    steering_sweep,
    steering_targets,
    steering_users,
    summarize,
    top_k_and_ranks,
    user_genre_share,
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
    assert torch.equal(sparse_auc(values, indices, labels, n_latents), auc)


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
    assert torch.equal(dense_auc(x, labels, chunk=1), auc)  # chunking changes no bit


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
    # Under a partition's hive path, as in the store: no `model`/`layer` column may creep in
    out = tmp_path / "features" / "model=sasrec" / "layer=1" / "part-00000.parquet"
    report = write_feature_activations(sae, tmp_path / "p", out, "cpu")
    table = pq.read_table(out)
    assert table.schema.names == FEATURE_ACTIVATION_SCHEMA.names
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


def test_sample_rows_pads_variable_width_codes_across_row_groups(tmp_path: Path) -> None:
    # An L1 ReLU SAE keeps every positive latent: each 64-row group has its own widest row.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    write_partition(tmp_path / "p", x, np.arange(300) // 5, np.arange(300) % 30 + 1)
    config = SaeConfig(d_in=8, expansion=4, k=1, l1_coefficient=0.01)
    sae = TopKSae(config, "cpu", sample=torch.from_numpy(x), seed=0).eval()
    sample = sample_rows(sae, tmp_path / "p", max_rows=300, device="cpu")
    with torch.no_grad():
        dense = sae.dense_latents(torch.from_numpy(x))
    got = torch.zeros_like(dense).scatter_add_(1, sample.indices, sample.values)
    torch.testing.assert_close(got, dense)
    assert sample.item_idx.tolist() == (np.arange(300) % 30 + 1).tolist()


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
    assert (ranks >= 0).all() and (
        user_genre_share(plain, torch.ones(13, dtype=torch.bool)) == 1.0
    ).all()


def _point(direction: str, scale: float, share: float, ndcg: float, **kw) -> SteeringPoint:
    mode = {"none": "baseline", "sae_clamp": "clamp"}.get(direction, "add")
    own = direction in ("none", "sae", "sae_clamp")
    fields = dict(
        genre="Comedy", direction=direction, feature=3 if own else -1, neuron=-1, mode=mode,
        alpha_scale=scale, alpha=2.0 * scale, step_norm=scale, share=share, ndcg=ndcg,
        share_active=None, n_active=4, n_users=10,
    )  # fmt: skip
    return SteeringPoint(**(fields | kw))


def test_summary_picks_each_directions_best_share_within_the_ndcg_bound() -> None:
    points = [
        _point("none", 0, 0.10, 0.20, share_active=0.5),
        _point("sae", 1, 0.25, 0.19),
        _point("sae", 2, 0.35, 0.17),
        _point("sae", 4, 0.90, 0.05),  # too costly
        _point("centroid", 1, 0.20, 0.199),
        _point("centroid", 2, 0.95, 0.10),  # too costly
        _point("neuron", 1, 0.05, 0.30, neuron=7),
        _point("sae_clamp", 0, 0.05, 0.20, share_active=0.25),
    ]
    outcomes = {o.direction: o for o in summarize(points, max_ndcg_loss=0.2, required_ratio=3.0)}
    assert list(outcomes) == ["sae", "centroid", "neuron"]
    sae, centroid, neuron = outcomes["sae"], outcomes["centroid"], outcomes["neuron"]
    assert sae.best_share == 0.35 and sae.best_scale == sae.best_alpha_scale == 2
    assert sae.share_ratio == pytest.approx(3.5) and sae.reaches_target
    assert sae.ndcg_loss == pytest.approx(0.15) and sae.best_ndcg == 0.17
    assert (sae.clamp_share, sae.n_active, sae.base_share_active, sae.clamp_share_active) == (
        0.05, 4, 0.5, 0.25,
    )  # fmt: skip
    assert centroid.best_scale == 1 and not centroid.reaches_target and centroid.feature == -1
    assert centroid.clamp_share is None and centroid.n_active is None
    # Its best scale within the bound, even when that lowers the share.
    assert neuron.best_share == 0.05 and neuron.best_scale == 1 and neuron.neuron == 7
    assert neuron.share_ratio == pytest.approx(0.5) and not neuron.reaches_target
    only_costly = summarize([p for p in points if p.alpha_scale != 1])
    assert only_costly[1].direction == "centroid" and only_costly[1].best_scale == 0.0
    assert only_costly[1].best_share == 0.10  # no scale within the bound: the unsteered share
    absent = [p._replace(share=0.0) for p in points]
    assert not any(o.reaches_target for o in summarize(absent))  # 0 -> 0 is no gain
    assert all(o.share_ratio == 1.0 for o in summarize(absent))


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


def test_genre_neurons_take_the_purest_neuron_sign_by_the_features_rule() -> None:
    rows = [
        {"kind": "neuron", "unit": 3, "sign": "-", "family": "genre", "value": "Comedy", "top_items": 30, "purity": 0.7},
        {"kind": "neuron", "unit": 1, "sign": "+", "family": "genre", "value": "Comedy", "top_items": 30, "purity": 0.4},
        {"kind": "feature", "unit": 5, "sign": "+", "family": "genre", "value": "Comedy", "top_items": 60, "purity": 0.9},
        {"kind": "feature", "unit": 6, "sign": "+", "family": "genre", "value": "Drama", "top_items": 60, "purity": 0.5},
        {"kind": "neuron", "unit": 2, "sign": "+", "family": "decade", "value": "Drama", "top_items": 30, "purity": 0.99},
    ]  # fmt: skip
    targets = steering_targets(rows, {5: 2.0, 6: 1.5}, min_top_items=50)
    assert targets == [
        GenreTarget("Comedy", 5, 2.0, 3, "-"),
        GenreTarget("Drama", 6, 1.5, None, "+"),  # no neuron names it: the sweep decides
    ]


def test_centroid_is_the_genre_mean_minus_the_item_mean_as_the_blocks_read_items() -> None:
    model = tiny_model()
    flags = torch.zeros(13, dtype=torch.bool)
    flags[[2, 5, 7]] = True
    table = model.item_vectors.detach()[1:]
    expected = table[[1, 4, 6]].mean(0) - table.mean(0)  # rows 2, 5, 7 without padding
    assert torch.allclose(centroid_direction(model, flags), expected, atol=1e-6)
    teacher = Recommender(
        RecommenderConfig(kind="teacher", num_items=12, d_item=8, hidden_size=4, num_layers=1),
        item_table=torch.randn(13, 8),
    ).eval()
    mapped = centroid_direction(teacher, flags)
    teacher_table = teacher.item_vectors[1:]
    difference = teacher_table[[1, 4, 6]].mean(0) - teacher_table.mean(0)
    assert mapped.shape == (4,)
    assert torch.allclose(mapped, teacher.item_in.weight.detach() @ difference, atol=1e-6)
    with pytest.raises(ValueError, match="flags no item"):
        centroid_direction(model, torch.zeros(13, dtype=torch.bool))


def test_baselines_take_the_sae_steps_norm_at_every_scale() -> None:
    sae = TopKSae(SaeConfig(d_in=8, expansion=2, k=2), "cpu", seed=0).eval()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, 16)[:, None])  # decoder rows of unequal norm
    d = sae.decoder_direction(5)
    assert not torch.isclose(d.norm(), torch.tensor(1.0))
    baselines = {
        "centroid": centroid_direction(tiny_model(), torch.arange(13) % 3 == 0),
        "neuron": neuron_direction(8, 6, "-"),
        "random": random_direction(8, seed=0, index=2),
    }
    scales = [0.5, 1.0, 4.0]
    steps = steering_steps(sae, 5, 1.7, baselines, scales)
    assert list(steps) == ["sae", "centroid", "neuron", "random"]
    sae_norms = torch.tensor([s * 1.7 for s in scales]) * d.norm()
    assert torch.allclose(steps["sae"], torch.tensor(scales)[:, None] * 1.7 * d, atol=1e-6)
    for name, direction in baselines.items():
        assert torch.allclose(steps[name].norm(dim=1), sae_norms, rtol=1e-5), name
        cosine = F.cosine_similarity(steps[name], direction.expand(3, -1), dim=1)
        assert torch.allclose(cosine, torch.ones(3), atol=1e-5), name  # the same direction
    assert steps["neuron"][0, 6] < 0 and (steps["neuron"][:, :6] == 0).all()
    assert torch.equal(random_direction(8, 0, 2), baselines["random"])
    assert not torch.equal(random_direction(8, 0, 3), baselines["random"])


@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
@pytest.mark.parametrize("layer", [1, 2])
def test_batched_edits_equal_one_edit_at_a_time(layer: int, backbone: str) -> None:
    torch.manual_seed(0)
    config = RecommenderConfig(
        kind="sasrec", num_items=12, hidden_size=8, d_item=8, num_layers=2, num_heads=2, max_len=6,
        backbone=backbone,
    )  # fmt: skip
    model = Recommender(config).eval()
    blocks = list(model.layers)
    rng = np.random.default_rng(0)
    sequences = [rng.permutation(np.arange(1, 13))[: rng.integers(3, 9)] for _ in range(11)]
    users = steering_users(sequences, max_len=6, device="cpu")
    sae = TopKSae(SaeConfig(d_in=8, expansion=2, k=2), "cpu", seed=0).eval()
    steps = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    last = last_block_states(model, users)
    cached = last if layer == 2 else layer_states(model, users, layer)
    assert torch.equal(at_last_position(users, layer_states(model, users, 2)), last)
    at_layer = at_last_position(users, layer_states(model, users, layer))
    features = [int(f) for f in sae.encode(at_layer)[1][:3, 0]]  # active at the layer
    plain_top, _ = top_k_and_ranks(model, users)
    for states in (cached, None):  # the states at the layer reused, or every block run
        # rows_per_pass=12: passes of 2 users x 5 steps, the last one short.
        tops, ranks = added_steps(model, layer, users, steps, states, k=5, rows_per_pass=12)
        assert tops.shape == (5, 11, 5) and ranks.shape == (5, 11)
        for e, step in enumerate(steps):
            with edit_hidden(model, layer, lambda h, s=step: h + s):  # every block, one edit
                one_top, one_ranks = top_k_and_ranks(model, users)
            assert torch.equal(ranks[e], one_ranks) and torch.equal(tops[e], one_top[:, :5])
        tops, ranks = clamped_features(model, layer, users, sae, features, states, rows_per_pass=7)
        for f, feature in enumerate(features):
            with edit_hidden(model, layer, clamp_to_zero(sae, feature)):
                one_top, one_ranks = top_k_and_ranks(model, users)
            assert torch.equal(ranks[f], one_ranks) and torch.equal(tops[f], one_top)
        assert any(not torch.equal(top, plain_top) for top in tops)  # the clamps do something
    assert all(a is b for a, b in zip(model.layers, blocks, strict=True))  # the blocks are back


def test_sweep_writes_one_row_per_genre_direction_scale_and_user() -> None:
    model = tiny_model()
    rng = np.random.default_rng(0)
    sequences = [rng.permutation(np.arange(1, 13))[: rng.integers(3, 9)] for _ in range(15)]
    users = steering_users(sequences, max_len=6, device="cpu", max_users=12, seed=1)
    sae = TopKSae(SaeConfig(d_in=8, expansion=2, k=2), "cpu", seed=0).eval()
    values, indices = sae.encode(last_block_states(model, users))
    common = int(torch.mode(indices[values > 0]).values)  # active for some users, not all
    flags = {"Comedy": torch.arange(13) % 2 == 1, "Drama": torch.arange(13) % 3 == 0}
    targets = [GenreTarget("Comedy", common, 1.5, 4, "-"), GenreTarget("Drama", 9, 2.0, None)]
    scales = [1.0, 3.0]
    sweep = steering_sweep(model, 2, sae, targets, flags, users, scales, seed=0)
    table = sweep.users
    assert table.schema == USERS_SCHEMA
    rows = table.to_pylist()
    keys = [(r["genre"], r["direction"], r["scale"], r["user"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * (2 + len(DIRECTIONS) * len(scales)) * 12
    assert {r["user"] for r in rows} == set(users.user_idx.tolist())
    by_direction = {(r["genre"], r["direction"]): r for r in rows}
    assert by_direction[("Comedy", "sae")]["feature"] == common
    assert by_direction[("Comedy", "neuron")]["feature"] == 4
    assert (
        by_direction[("Comedy", "none")]["feature"]
        == -1
        == by_direction[("Drama", "random")]["feature"]
    )
    assert {r["scale"] for r in rows if r["direction"] in ("none", "sae_clamp")} == {0.0}
    # The unsteered rows are the model's own per-user test NDCG@10 and genre share.
    _, ranks = top_k_and_ranks(model, users)
    none = [r for r in rows if r["genre"] == "Comedy" and r["direction"] == "none"]
    assert [r["ndcg10"] for r in none] == per_user_ndcg(ranks, 10).tolist()
    assert np.mean([r["ndcg10"] for r in none]) == pytest.approx(ndcg_at_k(ranks, 10))
    # `active`: the genre's feature among the active top-k at the last position, per user.
    active = ((indices == common) & (values > 0)).any(1).tolist()
    assert 0 < sum(active) < 12
    for r in rows:
        if r["genre"] == "Comedy":
            assert r["active"] == active[list(users.user_idx).index(r["user"])]
    # The Drama target named no neuron: the centroid's largest coordinate stands in.
    assert sweep.neurons_from_centroid == 1 and sweep.targets[1].neuron is not None
    outcomes = {(o.genre, o.direction): o for o in summarize(sweep.points)}
    sae = outcomes[("Comedy", "sae")]
    assert sae.n_active == sum(active)
    clamp_active = [
        r["genre_share"] for r in rows
        if r["genre"] == "Comedy" and r["direction"] == "sae_clamp" and r["active"]
    ]  # fmt: skip
    assert sae.clamp_share_active == pytest.approx(np.mean(clamp_active))
    gains = share_gains(table, {"Comedy": 3.0, "Drama": 0.0})
    assert gains["sae"].shape == (2, 12) and not gains["sae"][1].any()  # scale 0: no gain
    steered = [
        r for r in rows if (r["genre"], r["direction"], r["scale"]) == ("Comedy", "centroid", 3.0)
    ]
    gain = [s["genre_share"] - n["genre_share"] for s, n in zip(steered, none, strict=True)]
    assert gains["centroid"][0] == pytest.approx(gain)


@pytest.mark.parametrize("backbone,kv_heads", [("gpt2", None), ("llama", 2), ("llama", 1)])
def test_the_last_block_at_last_positions_is_the_full_block_there(
    backbone: str, kv_heads: int | None
) -> None:
    """Keys and values at every position, query and MLP at the last one: the block's output at
    each row's last real position, as a full forward computes it (GPT-2; Llama with RoPE,
    with and without grouped-query attention)."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = RecommenderConfig(
        kind="sasrec", num_items=12, hidden_size=8, d_item=8, num_layers=2, num_heads=2,
        max_len=7, backbone=backbone, dropout=0.0,
    )  # fmt: skip
    body = None
    if kv_heads is not None:
        body = LlamaModel(
            LlamaConfig(
                hidden_size=8,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=kv_heads,
                intermediate_size=16,
                max_position_embeddings=7,
                vocab_size=1,
                bos_token_id=None,
                eos_token_id=None,
                pad_token_id=None,
            )  # fmt: skip
        )
    model = Recommender(config, backbone=body).eval()
    rng = np.random.default_rng(0)
    sequences = [rng.permutation(np.arange(1, 13))[: rng.integers(3, 10)] for _ in range(9)]
    users = steering_users(sequences, max_len=7, device="cpu")
    lengths = (users.inputs > 0).sum(1)
    with torch.no_grad():
        entering = layer_states(model, users, 1)
        full = at_last_position(users, layer_states(model, users, 2))
        fast = last_block_at_last_position(model, entering, lengths)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)

    # Steps added at every position, factorised (the norm's scale per position, the
    # projections once per user and per step), against the E edited copies run as above;
    # gains and biases moved away from 1 and 0 so that every term of the factorisation counts.
    steps = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("bias"):
                weight.uniform_(-0.5, 0.5)
            elif "norm" in name or ".ln_" in name:
                weight.uniform_(0.5, 1.5)
        edited = (entering[None] + steps[:, None, None]).reshape(-1, *entering.shape[1:])
        slow = last_block_at_last_position(model, edited, lengths.repeat(3))
        added = last_block_with_added_steps(model, entering, lengths, steps)
    torch.testing.assert_close(added, slow, rtol=1e-5, atol=1e-5)
