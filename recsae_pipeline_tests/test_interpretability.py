"""The chance-corrected measures of `sae.interpretability` on tensors whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsae_pipeline.data.catalog import Catalog, Item
from recsae_pipeline.models.metrics import pairwise_auc
from recsae_pipeline.sae import interpretability
from recsae_pipeline.sae.interpretability import (
    DenseUnits,
    MeasureConfig,
    SparseUnits,
    Targets,
    attribute_targets,
    measure_units,
    probe_split,
    purity_chance,
    random_rotation,
    tied_auc,
    tied_aucs,
)


def _sparse_from_dense(z: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = z.topk(width, dim=1)
    return values, indices


def test_tied_auc_matches_pairwise_counting() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (300,), generator=generator).float()  # many ties
    labels = torch.rand(300, generator=generator) < 0.3
    expected = pairwise_auc(scores[labels].tolist(), scores[~labels].tolist())
    assert tied_auc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(tied_auc(scores, torch.zeros(300, dtype=torch.bool)))


def test_batched_tied_aucs_match_pairwise_counting_row_by_row() -> None:
    generator = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 6, (70, 250), generator=generator).float()  # ties in every row
    scores[::3] = torch.randn(24, 250, generator=generator)  # and rows without any
    labels = torch.rand(70, 250, generator=generator) < 0.2
    labels[5] = False  # one class only: NaN
    batched = tied_aucs(scores, labels)
    for row in range(70):
        y = labels[row]
        if not y.any():
            assert math.isnan(batched[row])
            continue
        one = pairwise_auc(scores[row][y].tolist(), scores[row][~y].tolist())
        assert batched[row].item() == pytest.approx(one, abs=1e-12)


def test_sparse_and_dense_units_agree_on_the_same_code() -> None:
    generator = torch.Generator().manual_seed(1)
    dense = torch.relu(torch.randn(400, 12, generator=generator))
    values, indices = _sparse_from_dense(dense, 12)
    sparse = SparseUnits(values, indices, 12)
    labels = torch.rand(400, 3, generator=generator) < 0.4
    rows = torch.arange(0, 400, 2)
    dense_units = DenseUnits("neurons", dense)
    torch.testing.assert_close(
        sparse.mean_differences(rows, labels), dense_units.mean_differences(rows, labels)
    )
    cols = torch.tensor([5, 0, 11])
    torch.testing.assert_close(sparse.columns(rows, cols), dense[rows][:, cols])
    again = torch.tensor([7, 3, 7, 0])  # a row asked for twice, out of order
    torch.testing.assert_close(sparse.columns(again, cols), dense[again][:, cols])
    # mean difference by hand for one column and label
    pos = labels[rows, 1]
    by_hand = dense[rows][pos, 4].mean() - dense[rows][~pos, 4].mean()
    assert float(dense_units.mean_differences(rows, labels)[4, 1]) == pytest.approx(
        float(by_hand), rel=1e-5
    )


def test_a_planted_unit_is_found_and_chance_stays_near_half() -> None:
    generator = torch.Generator().manual_seed(2)
    n, d = 3000, 8
    labels = torch.rand(n, 4, generator=generator) < 0.25
    x = torch.randn(n, d, generator=generator)
    x[:, 3] += 3.0 * labels[:, 0]  # neuron 3 '+' carries target 0
    x[:, 5] -= 3.0 * labels[:, 1]  # neuron 5 '-' carries target 1
    z = torch.zeros(n, 16)
    z[:, 7] = labels[:, 2].float() * (1 + torch.rand(n, generator=generator))  # feature 7: target 2
    values, indices = _sparse_from_dense(z, 2)
    user_idx = torch.arange(n) // 10
    targets = Targets(["a", "b", "c", "d"], ["attribute"] * 4, labels)
    measures = measure_units(
        [SparseUnits(values, indices, 16), DenseUnits("neurons", x)],
        targets,
        user_idx,
        MeasureConfig(),
    )
    table = measures.target_table().to_pylist()
    best = {(r["kind"], r["target"]): r for r in table}
    assert (best["neurons", "a"]["best_unit"], best["neurons", "a"]["best_sign"]) == (3, "+")
    assert (best["neurons", "b"]["best_unit"], best["neurons", "b"]["best_sign"]) == (5, "-")
    assert best["neurons", "a"]["probe_auc_k1"] > 0.9 and best["neurons", "b"]["probe_auc_k1"] > 0.9
    assert best["sae", "c"]["best_unit"] == 7 and best["sae", "c"]["probe_auc_k1"] == pytest.approx(
        1.0
    )
    # target d is noise for every unit: the held-out probe and the null stay near 0.5
    assert abs(best["neurons", "d"]["probe_auc_k5"] - 0.5) < 0.06
    assert abs(best["neurons", "d"]["null_best_auc"] - 0.5) < 0.06
    assert best["neurons", "a"]["excess_auc"] > 0.3
    # the shuffled null's chance level is near 0.5 for dense noise; the planted units beat it
    levels = measures.chance_levels()
    assert 0.5 < levels["neurons"]["attribute"] < 0.56
    units = {(r["kind"], r["unit"], r["sign"]): r for r in measures.unit_table().to_pylist()}
    assert units["neurons", 3, "+"]["best_attribute"] == "a"
    assert not units["sae", 0, "+"]["active"] and units["sae", 0, "+"]["best_attribute_auc"] is None


def test_probe_split_holds_out_whole_users() -> None:
    user_idx = torch.tensor([4, 4, 8, 8, 8, 12, 16, 16, 20])
    held = probe_split(user_idx)
    for u in user_idx.unique():
        assert held[user_idx == u].all() or not held[user_idx == u].any()
    assert held.any() and not held.all()


def test_history_targets_use_the_window_within_each_user(monkeypatch: pytest.MonkeyPatch) -> None:
    items = {
        0: Item(0, "x0", "A0", 2000, ("Drama",), "head", 1),
        1: Item(1, "x1", "A1", 2000, ("Comedy",), "head", 2),
    }
    catalog = Catalog(items)
    # user 1 reads drama, drama, comedy; user 2 reads comedy, drama (rows shuffled)
    item_idx = torch.tensor([1, 0, 0, 0, 1])
    user_idx = torch.tensor([1, 1, 1, 2, 2])
    position = torch.tensor([2, 0, 1, 1, 0])
    config = MeasureConfig(history_window=2, history_share=1.0, min_positives=1)
    targets = attribute_targets(item_idx, user_idx, position, catalog, config)
    column = {
        (f, n): j for j, (f, n) in enumerate(zip(targets.families, targets.names, strict=True))
    }
    drama_now = targets.labels[:, column["attribute", "genre:Drama"]].tolist()
    assert drama_now == [False, True, True, True, False]
    # window of 2, all drama: user 1 at position 0 (one item) and 1; never user 2
    drama_history = targets.labels[:, column["history", "genre:Drama"]].tolist()
    assert drama_history == [False, True, True, False, False]
    # the running counts go a chunk of attributes at a time: one at a time, the same labels
    monkeypatch.setattr(interpretability, "HISTORY_CHUNK", 1)
    chunked = attribute_targets(item_idx, user_idx, position, catalog, config)
    assert torch.equal(chunked.labels, targets.labels) and chunked.names == targets.names


def test_purity_chance_level() -> None:
    # 10 items, 2 carry the attribute: base rate 0.2; draws of all 10 items give purity 0
    matrix = torch.zeros(10, 1, dtype=torch.bool)
    matrix[:2, 0] = True
    rows = {i: 1 for i in range(10)}
    chance = purity_chance(rows, matrix, [10, 3], draws=50, seed=0)
    assert chance[10] == (0.0, 0.0)
    median, p95 = chance[3]
    # three items: 0, 1 or 2 hits; purity (share - 0.2) / 0.8 with share in {1/3, 2/3}
    assert 0.0 <= median <= p95 <= (2 / 3 - 0.2) / 0.8 + 1e-9


def test_random_rotation_is_orthogonal_and_seeded() -> None:
    q = random_rotation(16, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(q, random_rotation(16, seed=3))
    assert not torch.allclose(q, random_rotation(16, seed=4))


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="probe_ks"):
        MeasureConfig(probe_ks=())
    with pytest.raises(ValueError, match="history_share"):
        MeasureConfig(history_share=0.0)


def test_summary_counts_wins_on_both_sides() -> None:
    generator = torch.Generator().manual_seed(5)
    n = 2000
    labels = torch.rand(n, 6, generator=generator) < 0.3
    x = torch.randn(n, 4, generator=generator)
    z = labels.float() * 2.0  # one SAE feature per target, exact
    values, indices = _sparse_from_dense(z, 6)
    measures = measure_units(
        [SparseUnits(values, indices, 6), DenseUnits("neurons", x)],
        Targets([f"t{i}" for i in range(6)], ["attribute"] * 6, labels),
        torch.arange(n) // 5,
        MeasureConfig(),
    )
    summary = measures.summary()
    assert summary["sae_beats_neurons_probe_auc_k1_attribute"] == 6
    assert summary["targets_attribute"] == 6
    assert summary["sae_probe_auc_k1_attribute"] > 0.99
    assert np.isclose(summary["neurons_probe_auc_k1_attribute"], 0.5, atol=0.06)


def test_fit_probes_stop_one_by_one() -> None:
    """A probe that converges keeps the weights it converged to, whatever the other probes of
    the batch do: next to a separable target (which takes far more iterations), the others
    fit exactly as they fit alone, and the separable one as it fits alone."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 400, 2, generator=generator)
    noisy = (x[:2, :, 0] + 0.8 * torch.randn(2, 400, generator=generator)) > 0
    separable = x[2:, :, 1] > 0
    y = torch.cat([noisy, separable])
    w, b = interpretability.fit_probes(x, y)
    w_alone, b_alone = interpretability.fit_probes(x[:2], y[:2])
    w_sep, b_sep = interpretability.fit_probes(x[2:], y[2:])
    assert torch.equal(w[:2], w_alone) and torch.equal(b[:2], b_alone)
    assert torch.equal(w[2:], w_sep) and torch.equal(b[2:], b_sep)
    scores = torch.einsum("tnk,tk->tn", x, w) + b[:, None]
    assert interpretability.tied_auc(scores[2], y[2]) == 1.0  # the separable one separates


def _sparse_probe_problem(seed: int, n: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight 2-unit probes on SAE-like columns (75% zeros) and rare positives (about 5%)."""
    generator = torch.Generator().manual_seed(seed)
    draw = torch.rand(8, n, 2, generator=generator).log().neg()
    x = draw * (torch.rand(8, n, 2, generator=generator) < 0.25)
    logit = 2.5 * x[..., 0] + 1.5 * x[..., 1] - 6
    return x, torch.rand(8, n, generator=generator) < torch.sigmoid(logit)


def test_the_warm_started_probes_reach_the_from_zero_optimum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fitting a row subsample first and then all rows finds the same optimum as Newton from
    zero on all rows (to its 1e-4 step tolerance): the held-in AUCs agree to 1e-5."""
    x, y = _sparse_probe_problem(0)
    assert x.shape[1] >= 250 * interpretability.WARM_START_EVERY  # the warm path runs
    warm = interpretability.fit_probes(x, y)
    monkeypatch.setattr(interpretability, "WARM_START_EVERY", x.shape[1])  # from zero only
    cold = interpretability.fit_probes(x, y)
    for w, b in (warm, cold):
        assert torch.isfinite(w).all() and torch.isfinite(b).all()
    scores = [torch.einsum("tnk,tk->tn", x, w) + b[:, None] for w, b in (warm, cold)]
    aucs = [interpretability.tied_aucs(s, y) for s in scores]
    assert torch.allclose(aucs[0], aucs[1], atol=1e-5, rtol=0)
    assert torch.allclose(warm[0], cold[0], atol=1e-3, rtol=1e-3)


def test_a_probe_that_cycles_from_its_warm_start_is_fitted_again_from_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Newton without a line search cycles on these probes when it starts from the prior's
    intercept (zero weights); handed that start as the warm one, the probes still cycling are
    fitted again from zero, to exactly the weights of the from-zero fit, and the others
    converge to the same optimum anyway."""
    x, y = _sparse_probe_problem(0)
    newton = interpretability._newton
    retried: list[torch.Tensor] = []

    def warm_start_at_the_prior(z, target, theta, penalty, iterations):  # noqa: ANN001, ANN202
        if not retried:  # the subsample's fit: hand back the cycling start instead
            retried.append(torch.empty(0))
            prior = target.mean(1)
            theta = torch.zeros_like(theta)
            theta[:, -1] = torch.log(prior / (1 - prior))
            return theta, torch.zeros(len(theta))
        theta, last = newton(z, target, theta, penalty, iterations)
        retried.append(last > 1e-2)
        return theta, last

    monkeypatch.setattr(interpretability, "_newton", warm_start_at_the_prior)
    w, b = interpretability.fit_probes(x, y)
    cycled = retried[1]  # after the full-row steps from the bad start
    assert len(retried) == 3 and int(cycled.sum()) >= 4  # most cycled: all of them retried
    monkeypatch.setattr(interpretability, "_newton", newton)
    monkeypatch.setattr(interpretability, "WARM_START_EVERY", x.shape[1])
    w_cold, b_cold = interpretability.fit_probes(x, y)
    assert torch.equal(w[cycled], w_cold[cycled]) and torch.equal(b[cycled], b_cold[cycled])
    scores = [torch.einsum("tnk,tk->tn", x, w) + b[:, None] for w, b in ((w, b), (w_cold, b_cold))]
    aucs = [interpretability.tied_aucs(s, y) for s in scores]
    assert torch.allclose(aucs[0], aucs[1], atol=1e-5, rtol=0)
