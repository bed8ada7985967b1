"""Ranking metrics on hand-computed cases: tie-safe ranks, seen-item filtering, sampled protocol."""

import math

import numpy as np
import pytest
import torch

from recsae_pipeline.models import metrics

INF = float("inf")


def test_rank_counts_other_items_scoring_at_least_the_target():
    scores = torch.tensor([[-INF, 0.1, 0.5, 0.3, 0.5], [-INF, 0.9, 0.2, 0.4, 0.1]])
    assert metrics.target_ranks(scores, torch.tensor([2, 1])).tolist() == [1, 0]
    assert metrics.target_ranks(scores, torch.tensor([4, 4])).tolist() == [1, 3]


def test_collapsed_or_nan_model_gets_the_worst_rank():
    collapsed = torch.zeros(2, 6)
    collapsed[:, 0] = -INF
    assert metrics.target_ranks(collapsed, torch.tensor([1, 5])).tolist() == [4, 4]
    negatives = torch.tensor([[2, 3], [1, 4]])
    assert metrics.sampled_ranks(collapsed, torch.tensor([1, 5]), negatives).tolist() == [2, 2]
    nan = torch.full((1, 6), math.nan)
    assert metrics.target_ranks(nan, torch.tensor([3])).tolist() == [5]


def test_seen_items_are_filtered_but_never_the_target():
    scores = torch.tensor([[-INF, 4.0, 3.0, 2.0, 1.0]])
    history = torch.tensor([[1, 3, 0]])
    assert metrics.target_ranks(scores, torch.tensor([3])).tolist() == [2]
    filtered = metrics.filter_seen(scores, history, torch.tensor([3]))
    assert filtered.tolist() == [[-INF, -INF, 3.0, 2.0, 1.0]]
    assert metrics.target_ranks(filtered, torch.tensor([3])).tolist() == [1]
    assert scores.tolist() == [[-INF, 4.0, 3.0, 2.0, 1.0]]


def test_full_ranking_metrics_exact_values():
    at_k = metrics.full_ranking_metrics(torch.tensor([0, 1, 3, 12, 25]))
    assert at_k["hr@10"] == pytest.approx(3 / 5)
    assert at_k["hr@20"] == pytest.approx(4 / 5)
    ndcg10 = 1 + 1 / math.log2(3) + 1 / math.log2(5)
    assert at_k["ndcg@10"] == pytest.approx(ndcg10 / 5)
    assert at_k["ndcg@20"] == pytest.approx((ndcg10 + 1 / math.log2(14)) / 5)
    assert at_k["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 5)
    assert at_k["mrr@20"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 13) / 5)


def test_sampled_ranks_and_metrics_exact_values():
    scores = torch.tensor([[-INF, 0.5, 0.9, 0.5, 0.1, 0.7]])
    # Negatives 2 (0.9) and 3 (0.5, a tie) count; 4 does not; 0 is an empty slot.
    negatives = torch.tensor([[2, 3, 4, 0, 0]])
    assert metrics.sampled_ranks(scores, torch.tensor([1]), negatives).tolist() == [2]

    at_k = metrics.sampled_metrics(torch.tensor([0, 4, 9, 30]))
    assert at_k["hr@1"] == pytest.approx(1 / 4)
    assert at_k["hr@5"] == pytest.approx(2 / 4)
    assert at_k["hr@10"] == pytest.approx(3 / 4)
    assert at_k["ndcg@5"] == pytest.approx((1 + 1 / math.log2(6)) / 4)
    assert at_k["ndcg@10"] == pytest.approx((1 + 1 / math.log2(6) + 1 / math.log2(11)) / 4)
    assert at_k["mrr"] == pytest.approx((1 + 1 / 5 + 1 / 10 + 1 / 31) / 4)


def test_negatives_are_unseen_distinct_seeded_and_capped_by_availability():
    sequences = [np.array([2, 5, 2]), np.array([1, 2, 3]), np.array([6])]
    negatives = metrics.sample_negatives(sequences, num_items=6, n=999, seed=3)
    assert negatives.shape == (3, 6)
    assert sorted(negatives[0][negatives[0] > 0]) == [1, 3, 4, 6]
    assert sorted(negatives[1][negatives[1] > 0]) == [4, 5, 6]
    assert sorted(negatives[2][negatives[2] > 0]) == [1, 2, 3, 4, 5]
    assert (negatives[0, 4:] == 0).all() and (negatives[1, 3:] == 0).all()
    assert np.array_equal(negatives, metrics.sample_negatives(sequences, 6, n=999, seed=3))

    rng = np.random.default_rng(0)
    big = [rng.choice(np.arange(1, 5001), size=300, replace=False) for _ in range(20)]
    drawn = metrics.sample_negatives(big, num_items=5000, n=999, seed=0)
    assert drawn.shape == (20, 999)
    for sequence, row in zip(big, drawn, strict=True):
        assert len(np.unique(row)) == 999 and row.min() >= 1 and row.max() <= 5000
        assert not np.isin(row, sequence).any()
    assert not np.array_equal(drawn, metrics.sample_negatives(big, 5000, n=999, seed=1))


def test_negatives_are_uniform_over_unseen_items():
    sequences = [np.array([2, 4])] * 4000
    counts = np.bincount(
        metrics.sample_negatives(sequences, num_items=6, n=1, seed=0).ravel(), minlength=7
    )
    assert counts[[0, 2, 4]].sum() == 0
    assert np.all(np.abs(counts[[1, 3, 5, 6]] - 1000) < 120)


def test_popularity_counts_only_training_parts():
    scorer = metrics.PopularityScorer(
        [np.array([1, 2, 3, 4, 5]), np.array([2, 2, 6, 7])], num_items=8
    )
    scores = scorer.predict(torch.zeros(2, 3, dtype=torch.long))
    assert scores.shape == (2, 9)
    assert scores[0].tolist() == [-INF, 1, 3, 1, 0, 0, 0, 0, 0]
    assert torch.equal(scores[0], scores[1])
