"""Ranking metrics: full ranking with seen items filtered (RecBole) and SLMRec's sampled
protocol; and every ROC AUC of the package (`pairwise_auc`, `sparse_auc`, `dense_auc`), here at
the lowest layer that the SAE statistics and the explainers share.

Ranks are 0-based and tie-safe: a target's rank counts every other candidate scoring >= it,
so a collapsed model with all-equal scores gets the worst rank, never the best (SLMRec's
double argsort put the positive first among ties).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


def target_ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """0-based rank of each target among all columns of scores [B, C]; NaN counts as a tie."""
    target_scores = scores.gather(1, targets[:, None])
    return (~(scores < target_scores)).sum(1) - 1


def filter_seen(scores: Tensor, histories: Tensor, targets: Tensor) -> Tensor:
    """A copy of scores with each user's history items (0-padded [B, H]) at -inf, but the target."""
    filtered = scores.clone()
    filtered.scatter_(1, histories, float("-inf"))
    filtered.scatter_(1, targets[:, None], scores.gather(1, targets[:, None]))
    return filtered


def sampled_ranks(scores: Tensor, targets: Tensor, negatives: Tensor) -> Tensor:
    """0-based rank of each target among itself and its negatives [B, n] (0 = no candidate)."""
    target_scores = scores.gather(1, targets[:, None])
    negative_scores = scores.gather(1, negatives).masked_fill(negatives == 0, float("-inf"))
    return (~(negative_scores < target_scores)).sum(1)


def hit_rate_at_k(ranks: Tensor, k: int) -> float:
    return (ranks < k).double().mean().item()


def ndcg_at_k(ranks: Tensor, k: int) -> float:
    return per_user_ndcg(ranks, k).mean().item()


def per_user_ndcg(ranks: Tensor, k: int) -> Tensor:
    """Each user's NDCG@k from the 0-based rank of their one target (float64): what paired
    comparisons over users resample."""
    gains = 1.0 / torch.log2(ranks.double() + 2.0)
    return torch.where(ranks < k, gains, 0.0)


def mrr_at_k(ranks: Tensor, k: int | None = None) -> float:
    """Mean reciprocal rank, truncated to 0 beyond k (untruncated when k is None)."""
    reciprocal = 1.0 / (ranks.double() + 1.0)
    if k is not None:
        reciprocal = torch.where(ranks < k, reciprocal, 0.0)
    return reciprocal.mean().item()


def full_ranking_metrics(ranks: Tensor, ks: tuple[int, ...] = (10, 20)) -> dict[str, float]:
    """HR, NDCG and MRR at each k, keyed like `ndcg@10`."""
    metrics = {}
    for k in ks:
        metrics |= {
            f"hr@{k}": hit_rate_at_k(ranks, k),
            f"ndcg@{k}": ndcg_at_k(ranks, k),
            f"mrr@{k}": mrr_at_k(ranks, k),
        }
    return metrics


def sampled_metrics(ranks: Tensor) -> dict[str, float]:
    """What SLMRec reports: HR@1/5/10, NDCG@5/10 and untruncated MRR over 1 + 999 candidates."""
    return {
        "hr@1": hit_rate_at_k(ranks, 1),
        "hr@5": hit_rate_at_k(ranks, 5),
        "hr@10": hit_rate_at_k(ranks, 10),
        "ndcg@5": ndcg_at_k(ranks, 5),
        "ndcg@10": ndcg_at_k(ranks, 10),
        "mrr": mrr_at_k(ranks),
    }


def sample_negatives(
    sequences: list[np.ndarray], num_items: int, n: int = 999, seed: int = 0
) -> np.ndarray:
    """[users, n] negatives drawn uniformly without replacement from items outside each full
    sequence (SLMRec); a user with fewer than n available items gets them all, then zeros."""
    rng = np.random.default_rng(seed)
    negatives = np.zeros((len(sequences), min(n, num_items)), dtype=np.int64)
    for user, sequence in enumerate(sequences):
        seen = np.unique(sequence)
        available = num_items - len(seen)
        picks = rng.choice(available, size=min(n, available), replace=False)
        # The i-th unseen item is i + 1 + (number of seen items s_j with s_j - 1 - j <= i).
        offsets = seen - 1 - np.arange(len(seen))
        negatives[user, : len(picks)] = picks + 1 + np.searchsorted(offsets, picks, side="right")
    return negatives


class PopularityScorer:
    """Scores every item by how often it occurs in the training parts (items[:-2]) of sequences."""

    def __init__(self, sequences: list[np.ndarray], num_items: int) -> None:
        train_items = np.concatenate([s[:-2] for s in sequences]) if sequences else np.zeros(0)
        counts = np.bincount(train_items.astype(np.int64), minlength=num_items + 1)
        self.counts = torch.from_numpy(counts.astype(np.float32))
        self.counts[0] = -math.inf

    def predict(self, items: Tensor) -> Tensor:
        """The same popularity scores [B, num_items + 1] for every sequence in the batch."""
        return self.counts.to(items.device).expand(len(items), -1)


def pairwise_auc(high: list[float], low: list[float], empty: float = 0.5) -> float:
    """P(a `high` value beats a `low` one), ties counting half; `empty` if a side is empty."""
    if not high or not low:
        return empty
    h, lo = np.asarray(high)[:, None], np.asarray(low)[None, :]
    return float(((h > lo).sum() + 0.5 * (h == lo).sum()) / (h.size * lo.size))


def column_sums(labels: Tensor, chunk: int = 64) -> Tensor:
    """Positives per column of bool `labels` [R, C], int64 [C]: `labels.sum(0)` a chunk of
    columns at a time (torch widens the whole of it to int64 first: 4 GB at 500k x 1,000)."""
    out = torch.empty(labels.shape[1], dtype=torch.int64)
    for start in range(0, labels.shape[1], chunk):
        out[start : start + chunk] = labels[:, start : start + chunk].sum(0)
    return out


def _auc_from_rank_sums(rank_sums: Tensor, n_pos: Tensor, n_rows: int) -> Tensor:
    n_neg = n_rows - n_pos
    return (rank_sums - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg).clamp(min=1)


class SparseRanks(NamedTuple):
    """What `sparse_auc` needs of a top-k code, whatever the labels: per entry of the code its
    feature, whether it is active and its rank among that feature's R values (`sparse_ranks`)."""

    indices: Tensor
    """int64 [R, k]: the code's features."""
    active: Tensor
    """float64 [R, k]: 1 where the entry is active (value > 0), else 0."""
    ranks: Tensor
    """float64 [R, k]: an active entry's rank among its feature's R values (the zero rows
    ranked first, as one tie group); 0 where the entry is inactive."""
    zeros: Tensor
    """float64 [n_latents]: rows where the feature is zero (one tie group)."""
    n_rows: int


def sparse_ranks(values: Tensor, indices: Tensor, n_latents: int) -> SparseRanks:
    """The label-independent half of `sparse_auc`: built once, it scores any number of label
    matrices (`sparse_auc_from`)."""
    n_rows = len(values)
    active = (values > 0).flatten()
    where = torch.nonzero(active).squeeze(1)  # flat positions of the active entries
    feature = indices.flatten()[where]
    # By feature, then value, then position: one sort of feature * 2^32 + the value's bits (a
    # positive float32's bits order as int32 the way its values do).
    bits = values.flatten()[where].float().contiguous().view(torch.int32).long()
    order = torch.argsort(feature.long() * 2**32 + bits, stable=True)
    counts = torch.bincount(feature, minlength=n_latents)
    starts = torch.cumsum(counts, 0) - counts
    zeros = (n_rows - counts).double()
    feature = feature[order]
    rank = zeros[feature] + (torch.arange(len(feature)) - starts[feature] + 1).double()
    ranks = torch.zeros(values.numel(), dtype=torch.float64)
    ranks[where[order]] = rank
    shape = values.shape
    return SparseRanks(
        indices.long(), active.double().view(shape), ranks.view(shape), zeros, n_rows
    )


# Entries gathered at once by the AUC sums (positives x code width): 2M x 8 bytes per array.
_GATHER_ENTRIES = 2_000_000


def _positive_pairs(labels: Tensor, width: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(rows, columns) of the positives of bool `labels`, at most `_GATHER_ENTRIES // width`
    at a time."""
    rows, columns = torch.nonzero(labels, as_tuple=True)
    step = max(1, _GATHER_ENTRIES // max(width, 1))
    for start in range(0, len(rows), step):
        yield rows[start : start + step], columns[start : start + step]


def sparse_auc_from(code: SparseRanks, labels: Tensor, chunk: int = 64) -> Tensor:
    """`sparse_auc` of a code's `sparse_ranks` against bool labels [R, C]."""
    n_pos = column_sums(labels).double()  # [C]
    n_latents, k = len(code.zeros), code.indices.shape[1]
    out = torch.empty(n_latents, labels.shape[1], dtype=torch.float64)
    for start in range(0, labels.shape[1], chunk):
        cols = slice(start, start + chunk)
        block = labels[:, cols]
        width = block.shape[1]
        # Per (column, feature): positives where the feature is active and their rank sum,
        # added up over each positive's k code entries (integers below 2^53 in float64: the
        # order of the additions cannot change a bit).
        pos_nonzero = torch.zeros(width * n_latents, dtype=torch.float64)
        rank_nonzero = torch.zeros(width * n_latents, dtype=torch.float64)
        for rows, columns in _positive_pairs(block, k):
            at = (columns.unsqueeze(1) * n_latents + code.indices[rows]).flatten()
            pos_nonzero.index_add_(0, at, code.active[rows].flatten())
            rank_nonzero.index_add_(0, at, code.ranks[rows].flatten())
        pos_nonzero = pos_nonzero.view(width, n_latents).T
        rank_nonzero = rank_nonzero.view(width, n_latents).T
        pos_zero = n_pos[cols] - pos_nonzero
        rank_sums = pos_zero * (code.zeros.unsqueeze(1) + 1) / 2 + rank_nonzero
        out[:, cols] = _auc_from_rank_sums(rank_sums, n_pos[cols], code.n_rows)
    return out.float()


def sparse_auc(
    values: Tensor, indices: Tensor, labels: Tensor, n_latents: int, chunk: int = 64
) -> Tensor:
    """ROC AUC [n_latents, C] of each feature's activation (0 where it is not in the top-k)
    at detecting each label column of `labels` (bool [R, C]); exact, with the rows where a
    feature is zero counted as one tie group (Mann-Whitney with average ranks).

    Works from the positives: each positive row adds its k code entries' ranks to its
    column's sums, about k x (positives) additions in all, and O(R * k) memory."""
    return sparse_auc_from(sparse_ranks(values, indices, n_latents), labels, chunk)


def dense_ranks(x: Tensor) -> Tensor:
    """The label-independent half of `dense_auc`: each column's ranks 1..R of x [R, d], as
    float64 [R, d] (`dense_auc_from`)."""
    n_rows = len(x)
    # numpy's sort of each column laid out as a row: ~3x torch's argsort along dim 0 here
    columns = np.ascontiguousarray(x.detach().float().cpu().numpy().T)  # [d, R]
    order = np.argsort(columns, axis=1)
    ranks = np.empty(columns.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, np.arange(1, n_rows + 1, dtype=np.float64)[None, :], axis=1)
    return torch.from_numpy(np.ascontiguousarray(ranks.T))


def dense_auc_from(ranks: Tensor, labels: Tensor, chunk: int = 64) -> Tensor:
    """`dense_auc` of columns whose `dense_ranks` are `ranks` [R, d] against bool labels: each
    column's rank sum over the positives, gathered row by positive row."""
    ranks = ranks.to(labels.device)
    d = ranks.shape[1]
    rank_sums = torch.empty(d, labels.shape[1], dtype=torch.float64)  # [d, C]
    for start in range(0, labels.shape[1], chunk):
        block = labels[:, start : start + chunk]
        sums = torch.zeros(block.shape[1], d, dtype=torch.float64)
        for rows, columns in _positive_pairs(block, d):
            sums.index_add_(0, columns, ranks[rows])
        rank_sums[:, start : start + block.shape[1]] = sums.T
    return _auc_from_rank_sums(rank_sums, column_sums(labels).double(), len(ranks)).float()


def dense_auc(x: Tensor, labels: Tensor, chunk: int = 64) -> Tensor:
    """ROC AUC [d, C] of each column of x [R, d] at detecting each label column (bool [R, C]);
    the '-' sign of a column has AUC 1 - this. Ties among continuous values are ignored.
    `chunk` label columns at a time go to float64 (the rank sums are integers below 2^53, so
    the chunking cannot change a bit)."""
    return dense_auc_from(dense_ranks(x), labels, chunk)
