"""Steering a recommender with SAE features: add a feature's decoder direction to the hidden
state at the SAE's layer, or switch the feature off, and measure what the top 10 becomes.

- add: h' = h + alpha * d_f, d_f = `decoder_direction(f)` (what one unit of the feature adds
  to the hidden state), at every position of the sequence;
- clamp to 0: h' = h - z_f(h) * W_dec[f], i.e. decode the code with z_f = 0 and keep the
  reconstruction error, so only that feature's contribution is removed.

An edit at the last layer only changes what follows the last block (final norm, head,
scores), so those sweeps reuse the last block's states and skip the blocks.

Quality is measured on the test split exactly as the model's own evaluation (full ranking,
seen items filtered), and the genre share is the share of top-10 slots (seen items excluded)
held by items of that genre.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from recsae_pipeline.activations.hooks import edit_hidden, read_hidden
from recsae_pipeline.data.batching import pad_right, split_examples
from recsae_pipeline.data.catalog import Catalog
from recsae_pipeline.models.metrics import filter_seen, ndcg_at_k, target_ranks
from recsae_pipeline.models.recommender import Recommender
from recsae_pipeline.sae.model import TopKSae

Edit = Callable[[Tensor], Tensor]


def add_direction(sae: TopKSae, feature: int, alpha: float) -> Edit:
    """h -> h + alpha * decoder direction of `feature` (one unit of it, in hidden units)."""
    direction = sae.decoder_direction(feature).detach()

    def edit(hidden: Tensor) -> Tensor:
        return hidden + alpha * direction.to(hidden.dtype)

    return edit


def clamp_to_zero(sae: TopKSae, feature: int) -> Edit:
    """h -> h - (decode(z) - decode(z with z_f = 0)): the feature switched off, the
    reconstruction error and every other feature kept."""

    @torch.no_grad()
    def edit(hidden: Tensor) -> Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        values, indices = sae.encode(flat)
        without = values.masked_fill(indices == feature, 0.0)
        contribution = sae.decode(values, indices) - sae.decode(without, indices)
        return (flat - contribution.to(hidden.dtype)).reshape(hidden.shape)

    return edit


class SteeringUsers(NamedTuple):
    """Right-padded test inputs with their targets and full histories, on a device."""

    inputs: Tensor
    targets: Tensor
    histories: Tensor
    user_idx: np.ndarray


def steering_users(
    sequences: list[np.ndarray],
    max_len: int,
    device: torch.device | str,
    max_users: int | None = None,
    seed: int = 0,
) -> SteeringUsers:
    """The test split of (a seeded sample of at most `max_users` of) the users."""
    users = np.arange(len(sequences))
    if max_users is not None and max_users < len(users):
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    inputs, targets, histories = split_examples([sequences[u] for u in users], "test", max_len)
    return SteeringUsers(
        inputs=pad_right(inputs).to(device),
        targets=torch.from_numpy(targets).to(device),
        histories=pad_right(histories).to(device),
        user_idx=users,
    )


def _top_and_ranks(
    scores: Tensor, targets: Tensor, histories: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    scores = filter_seen(scores.float(), histories, targets)
    ranks = target_ranks(scores, targets)
    # The target was kept visible for ranking; for the list shown, hide every seen item.
    scores.scatter_(1, histories, float("-inf"))
    return scores.topk(k, dim=1).indices.cpu(), ranks.cpu()


@torch.no_grad()
def top_k_and_ranks(
    model: Recommender,
    users: SteeringUsers,
    k: int = 10,
    batch_size: int = 512,
    edit: Edit | None = None,
    last_block: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(top-k items [U, k] with seen items excluded, 0-based target ranks [U]).

    Runs the model under whatever `edit_hidden` is active. With `last_block` (the last
    block's output at each user's last position, [U, hidden], from `last_block_states`),
    `edit` is applied to it and only the final norm, head and scoring run: the same
    result for an edit at the last layer, many times faster."""
    model.eval()
    tops, ranks = [], []
    for start in range(0, len(users.targets), batch_size):
        batch = slice(start, start + batch_size)
        if last_block is not None:
            hidden = last_block[batch]
            scores = model.scores_from_last_block(edit(hidden) if edit is not None else hidden)
        else:
            scores = model.predict(users.inputs[batch])
        top, rank = _top_and_ranks(scores, users.targets[batch], users.histories[batch], k)
        tops.append(top)
        ranks.append(rank)
    return torch.cat(tops), torch.cat(ranks)


@torch.no_grad()
def last_block_states(model: Recommender, users: SteeringUsers, batch_size: int = 512) -> Tensor:
    """The last block's output at each user's last real position, [U, hidden]."""
    model.eval()
    out = []
    for start in range(0, len(users.targets), batch_size):
        items = users.inputs[start : start + batch_size]
        hidden = read_hidden(model, items, model.config.num_layers)
        last = (items > 0).sum(1) - 1
        out.append(hidden[torch.arange(len(items), device=items.device), last])
    return torch.cat(out)


def run_edit(
    model: Recommender, layer: int, users: SteeringUsers, edit: Edit, last_block: Tensor | None
) -> tuple[Tensor, Tensor]:
    """`top_k_and_ranks` with `edit` at `layer`: on the cached last-block states when the
    layer is the last one, else through a full forward pass with the edit hooked in."""
    if last_block is not None and layer == model.config.num_layers:
        return top_k_and_ranks(model, users, edit=edit, last_block=last_block)
    with edit_hidden(model, layer, edit):
        return top_k_and_ranks(model, users)


def genre_items(catalog: Catalog, genres: Sequence[str], num_items: int) -> dict[str, Tensor]:
    """genre -> bool [num_items + 1] flags of the indexed items carrying it."""
    flags = {g: torch.zeros(num_items + 1, dtype=torch.bool) for g in genres}
    for item in catalog.items.values():
        for genre in item.genres:
            if genre in flags:
                flags[genre][item.idx] = True
    return flags


def genre_share(top: Tensor, genre_items: Tensor) -> float:
    """Share of the slots of `top` [U, k] held by items flagged in genre_items (bool [items])."""
    return float(genre_items[top].double().mean())


class SteeringPoint(NamedTuple):
    genre: str
    feature: int
    mode: str
    """'baseline', 'add' or 'clamp'."""
    alpha_scale: float
    """alpha in units of the feature's max activation (0 for baseline and clamp)."""
    alpha: float
    share: float
    """Share of the genre in the top 10."""
    ndcg: float
    """Test NDCG@10 (seen items filtered)."""


def steering_sweep(
    model: Recommender,
    layer: int,
    sae: TopKSae,
    targets: dict[str, tuple[int, float]],
    genre_items: dict[str, Tensor],
    users: SteeringUsers,
    alpha_scales: Sequence[float],
    on_progress: Callable[[int, int], None] | None = None,
) -> list[SteeringPoint]:
    """For each genre -> (feature, feature's max activation): the baseline, every
    alpha = scale * max activation added, and the feature clamped to 0."""
    last_block = last_block_states(model, users) if layer == model.config.num_layers else None
    top, ranks = top_k_and_ranks(model, users)
    base_ndcg = ndcg_at_k(ranks, 10)
    points = []
    for done, (genre, (feature, scale)) in enumerate(targets.items()):
        mask = genre_items[genre]
        base_share = genre_share(top, mask)
        points.append(SteeringPoint(genre, feature, "baseline", 0.0, 0.0, base_share, base_ndcg))
        for alpha_scale in alpha_scales:
            alpha = alpha_scale * scale
            edit = add_direction(sae, feature, alpha)
            steered, steered_ranks = run_edit(model, layer, users, edit, last_block)
            share, ndcg = genre_share(steered, mask), ndcg_at_k(steered_ranks, 10)
            points.append(SteeringPoint(genre, feature, "add", alpha_scale, alpha, share, ndcg))
        edit = clamp_to_zero(sae, feature)
        clamped, clamped_ranks = run_edit(model, layer, users, edit, last_block)
        share, ndcg = genre_share(clamped, mask), ndcg_at_k(clamped_ranks, 10)
        points.append(SteeringPoint(genre, feature, "clamp", 0.0, 0.0, share, ndcg))
        if on_progress is not None:
            on_progress(done + 1, len(targets))
    return points


class GenreOutcome(NamedTuple):
    genre: str
    feature: int
    base_share: float
    best_share: float
    """Highest share among the added alphas whose NDCG@10 loss is within the bound."""
    best_alpha_scale: float
    share_ratio: float
    ndcg_loss: float
    """Relative NDCG@10 loss at that alpha (0 if no alpha qualified)."""
    clamp_share: float
    met: bool
    """share_ratio >= the required multiple."""


def summarize(
    points: Sequence[SteeringPoint], max_ndcg_loss: float = 0.2, required_ratio: float = 3.0
) -> list[GenreOutcome]:
    """Per genre: the best top-10 share reachable within `max_ndcg_loss` relative NDCG@10
    loss, against the baseline share."""
    outcomes = []
    for genre in dict.fromkeys(p.genre for p in points):
        rows = [p for p in points if p.genre == genre]
        base = next(p for p in rows if p.mode == "baseline")
        clamp = next(p for p in rows if p.mode == "clamp")
        allowed = [p for p in rows if p.mode == "add" and p.ndcg >= (1 - max_ndcg_loss) * base.ndcg]
        best = max(allowed, key=lambda p: p.share, default=base)
        if base.share > 0:
            ratio = best.share / base.share
        else:  # a genre absent from the baseline lists: any share at all is an infinite gain
            ratio = float("inf") if best.share > 0 else 1.0
        outcomes.append(
            GenreOutcome(
                genre=genre,
                feature=base.feature,
                base_share=base.share,
                best_share=best.share,
                best_alpha_scale=best.alpha_scale,
                share_ratio=ratio,
                ndcg_loss=1 - best.ndcg / base.ndcg if base.ndcg > 0 else 0.0,
                clamp_share=clamp.share,
                met=ratio >= required_ratio and best.share > base.share,
            )
        )
    return outcomes


def genre_targets(
    enrichment_rows: list[dict], max_activation: dict[int, float], min_top_items: int
) -> dict[str, tuple[int, float]]:
    """genre -> (feature, its max activation): per genre, the SAE feature whose top items are
    most enriched for it (highest purity, see `features.enrichment`) among features with at
    least `min_top_items` top items. `enrichment_rows` are rows of the enrichment table."""
    best: dict[str, tuple[float, int]] = {}
    for row in enrichment_rows:
        if row["kind"] != "feature" or row["family"] != "genre" or row["top_items"] < min_top_items:
            continue
        key = (row["purity"], -row["unit"])
        if row["value"] not in best or key > (best[row["value"]][0], -best[row["value"]][1]):
            best[row["value"]] = (row["purity"], row["unit"])
    return {
        genre: (feature, max_activation[feature])
        for genre, (_, feature) in sorted(best.items())
        if max_activation.get(feature, 0) > 0
    }
