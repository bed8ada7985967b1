"""Steering a recommender with SAE features: add a feature's decoder direction to the hidden
state at the SAE's layer, or switch the feature off, and measure what the top 10 becomes.

- add: h' = h + alpha * d_f, d_f = `decoder_direction(f)` (what one unit of the feature adds
  to the hidden state), at every position of the sequence;
- clamp to 0: h' = h - z_f(h) * W_dec[f], i.e. decode the code with z_f = 0 and keep the
  reconstruction error, so only that feature's contribution is removed.

Every SAE step is measured against baseline directions added at the same layer with the same
norm ||alpha * d_f||: the genre's item centroid (`centroid_direction`), the genre's best
single neuron in its sign, and a seeded random direction. The directions and scales of one
genre run as one batch: each (direction, scale) is a block of rows of the same users.

An edit at the last layer only changes what follows the last block (final norm, head,
scores), so those sweeps reuse the last block's states and skip the blocks; an edit at an
earlier layer l reuses the states at l and runs only the blocks after it.

Quality is measured on the test split exactly as the model's own evaluation (full ranking,
seen items filtered), and the genre share is the share of top-10 slots (seen items excluded)
held by items of that genre; both are kept per user, so differences get CIs over users.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple, get_args, get_type_hints

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsae_pipeline.activations.hooks import edit_hidden, read_hidden
from recsae_pipeline.data.batching import pad_right, split_examples
from recsae_pipeline.data.catalog import Catalog
from recsae_pipeline.models.metrics import filter_seen, per_user_ndcg, target_ranks
from recsae_pipeline.models.recommender import Recommender
from recsae_pipeline.sae.model import TopKSae

Edit = Callable[[Tensor], Tensor]

DIRECTIONS = ("sae", "centroid", "neuron", "random")
"""What is added at each scale: the SAE feature's decoder direction, then its baselines."""
NO_STEERING, CLAMP = "none", "sae_clamp"
"""The two measurements without a scale: the unsteered model, the feature clamped to 0."""

USERS_SCHEMA = pa.schema(
    {
        "genre": pa.string(),
        "direction": pa.string(),
        "feature": pa.int32(),
        "scale": pa.float64(),
        "user": pa.int32(),
        "genre_share": pa.float64(),
        "ndcg10": pa.float64(),
        "active": pa.bool_(),
    }
)
"""One row per (genre, direction, scale, user): `feature` is the SAE feature (sae, sae_clamp),
the neuron (neuron) or -1; `scale` is 0 for none and sae_clamp; `user` indexes `sequences`;
`active`: the genre's SAE feature is active at that user's last position."""


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
    """Each row's index in `sequences` order."""


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
    model: Recommender, users: SteeringUsers, k: int = 10, batch_size: int = 512
) -> tuple[Tensor, Tensor]:
    """(top-k items [U, k] with seen items excluded, 0-based target ranks [U]), under
    whatever `edit_hidden` is active."""
    model.eval()
    tops, ranks = [], []
    for start in range(0, len(users.targets), batch_size):
        batch = slice(start, start + batch_size)
        scores = model.predict(users.inputs[batch])
        top, rank = _top_and_ranks(scores, users.targets[batch], users.histories[batch], k)
        tops.append(top)
        ranks.append(rank)
    return torch.cat(tops), torch.cat(ranks)


@torch.no_grad()
def layer_states(
    model: Recommender, users: SteeringUsers, layer: int, batch_size: int = 512
) -> Tensor:
    """Block `layer`'s output at every position of every user, [U, T, hidden]."""
    model.eval()
    return torch.cat(
        [
            read_hidden(model, users.inputs[start : start + batch_size], layer)
            for start in range(0, len(users.targets), batch_size)
        ]
    )


def at_last_position(users: SteeringUsers, states: Tensor) -> Tensor:
    """[U, hidden]: each user's row of `states` [U, T, hidden] at their last real position."""
    last = (users.inputs > 0).sum(1) - 1
    return states[torch.arange(len(states), device=states.device), last]


class _PassThrough(nn.Module):
    def forward(self, hidden_states: Tensor, *args: object, **kwargs: object) -> Tensor:
        return hidden_states


class _Fixed(nn.Module):
    def __init__(self, hidden: Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: Tensor, *args: object, **kwargs: object) -> Tensor:
        return self.hidden.to(hidden_states.dtype)


@contextmanager
def blocks_after(model: Recommender, layer: int, hidden: Tensor) -> Iterator[None]:
    """While active, a forward pass skips blocks 1..`layer`: block `layer` outputs `hidden`
    [B, T, hidden] (the batch's states there, edited or not) and the blocks before it pass
    their input on, so only the blocks after `layer` run. (The backbones call each module
    of their layer list in turn and take the tensor it returns, so swapping the modules is
    enough; the originals are put back on exit, also after an error.)"""
    blocks = model.layers
    saved = [blocks[i] for i in range(layer)]
    try:
        for i in range(layer - 1):
            blocks[i] = _PassThrough()
        blocks[layer - 1] = _Fixed(hidden)
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


def _last_position_attention(q: Tensor, k: Tensor, v: Tensor, last: Tensor, scale: float) -> Tensor:
    """One query per row [B, heads, 1, d] over keys/values [B, kv heads, T, d], each row
    attending to its positions 0..last (what causal attention gives its last real position)."""
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each kv head serves a group
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    visible = torch.arange(k.shape[2], device=k.device)[None, :] <= last[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], scale=scale)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`transformers`' `apply_rotary_pos_emb` for one tensor [B, heads, T, d]: that function
    rotates a query and a key per call, so rotating only the keys (every position: the
    steering sweep's largest cost) through it paid for them twice. The same operations."""
    from transformers.models.llama.modeling_llama import rotate_half

    return (x * cos.unsqueeze(1)) + (rotate_half(x) * sin.unsqueeze(1))


def _rotary(model: Recommender, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE's (cos, sin) [1, T, d] at positions 0..T-1 of `hidden` [B, T, c], from the Llama
    backbone's rotary embedding."""
    rotary = next(m.rotary_emb for m in model.backbone.modules() if hasattr(m, "rotary_emb"))
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    return rotary(hidden, position_ids=positions)


def last_block_at_last_position(model: Recommender, hidden: Tensor, lengths: Tensor) -> Tensor:
    """The last block's output at each row's last real position [B, hidden], from the states
    entering it [B, T, hidden]: keys and values at every position, but the query, attention
    output and MLP only at the last one (all `predict` reads), so the block costs a fraction
    of a full pass. GPT-2 and Llama blocks (RoPE from the backbone's rotary embedding)."""
    block = model.layers[-1]
    rows = torch.arange(len(hidden), device=hidden.device)
    last = lengths.to(hidden.device) - 1
    if model.config.backbone == "gpt2":
        attn = block.attn
        q, k, v = attn.c_attn(block.ln_1(hidden)).split(attn.split_size, dim=2)
        heads = (attn.num_heads, attn.head_dim)
        q = q[rows, last].view(len(rows), 1, *heads).transpose(1, 2)
        k, v = (t.view(*t.shape[:2], *heads).transpose(1, 2) for t in (k, v))
        out = _last_position_attention(q, k, v, last, attn.scaling)
        x = hidden[rows, last] + attn.c_proj(out.reshape(len(rows), -1))
        return x + block.mlp(block.ln_2(x))
    attn = block.self_attn
    cos, sin = _rotary(model, hidden)
    h = block.input_layernorm(hidden)
    d = attn.head_dim
    q = attn.q_proj(h[rows, last]).view(len(rows), 1, -1, d).transpose(1, 2)
    k = attn.k_proj(h).view(*h.shape[:2], -1, d).transpose(1, 2)
    v = attn.v_proj(h).view(*h.shape[:2], -1, d).transpose(1, 2)
    q = _rope(q, cos[0, last][:, None], sin[0, last][:, None])
    k = _rope(k, cos, sin)
    out = _last_position_attention(q, k, v, last, attn.scaling)
    x = hidden[rows, last] + attn.o_proj(out.transpose(1, 2).reshape(len(rows), -1))
    return x + block.mlp(block.post_attention_layernorm(x))


def _norm_parts(norm: nn.Module, hidden: Tensor, steps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The pre-attention norm of `hidden` [b, T, c] + each of `steps` [E, c] as
    (a_h [b, T, c], a_step [E, c], scale [E, b, T]): norm(h + step) = (a_h + a_step) / scale +
    the norm's bias, for RMSNorm (Llama: a = gain x state) and LayerNorm (GPT-2: a = gain x
    the centred state), since the squared norm of h + step is |h|^2 + 2 h.step + |step|^2."""
    if isinstance(norm, nn.LayerNorm):
        h = hidden - hidden.mean(-1, keepdim=True)
        s = steps - steps.mean(-1, keepdim=True)
        eps, gain = norm.eps, norm.weight
    else:  # LlamaRMSNorm
        h, s, eps, gain = hidden, steps, norm.variance_epsilon, norm.weight
    width = hidden.shape[-1]
    cross = torch.einsum("btc,ec->ebt", h, s)
    squares = (h * h).sum(-1)[None] + 2 * cross + (s * s).sum(-1)[:, None, None]
    return gain * h, gain * s, torch.sqrt(squares / width + eps)


def _projection(layer: Callable[[Tensor], Tensor], bias: Tensor | None, a: Tensor) -> Tensor:
    """The linear part of a projection (its bias taken off), on the last dimension of `a`."""
    out = layer(a)
    return out if bias is None else out - bias


def last_block_with_added_steps(
    model: Recommender, hidden: Tensor, lengths: Tensor, steps: Tensor
) -> Tensor:
    """`last_block_at_last_position` of `hidden` [b, T, hidden] + each of `steps` [E, hidden]
    added at every position, [E * b, hidden] (row e * b + i: user i under step e), without
    building the E copies of the keys and values: the norm before attention is affine in its
    input up to one scale per position (`_norm_parts`), and the key and value projections (and
    RoPE) are linear, so each key is (K_h + K_step) / scale + a constant. K_h and V_h are
    projected once per user, K_step and V_step once per step; what grows with E x T is only the
    attention's dot products, a small fraction of the projections it replaces."""
    block = model.layers[-1]
    b, width, _ = hidden.shape
    e = len(steps)
    last = lengths.to(hidden.device) - 1
    rows = torch.arange(b, device=hidden.device)
    steps = steps.to(hidden.dtype)
    entering_last = (hidden[rows, last][None] + steps[:, None]).reshape(e * b, -1)  # [E*b, c]
    if model.config.backbone == "gpt2":
        attn, norm = block.attn, block.ln_1
        heads, kv_heads, d = attn.num_heads, attn.num_heads, attn.head_dim
        c = attn.embed_dim
        weight, bias = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: x @ weight + bias

        def linear(part: int) -> Callable[[Tensor], Tensor]:
            w, bb = weight[:, part * c : (part + 1) * c], bias[part * c : (part + 1) * c]
            return lambda x: x @ w + bb

        q_proj, k_proj, v_proj = linear(0), linear(1), linear(2)
        k_bias, v_bias = bias[c : 2 * c], bias[2 * c :]
        o_proj = attn.c_proj
        mlp_norm = block.ln_2
    else:
        attn, norm = block.self_attn, block.input_layernorm
        d = attn.head_dim
        heads = attn.q_proj.out_features // d
        kv_heads = attn.k_proj.out_features // d
        q_proj, k_proj, v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        k_bias, v_bias = attn.k_proj.bias, attn.v_proj.bias
        o_proj = attn.o_proj
        mlp_norm = block.post_attention_layernorm
    a_h, a_step, scale = _norm_parts(norm, hidden, steps)
    norm_bias = norm.bias if isinstance(norm, nn.LayerNorm) else None
    offset = torch.zeros_like(steps[0]) if norm_bias is None else norm_bias
    # per projection: linear(a) / scale + const, const = the projection of the norm's bias
    k_h = _projection(k_proj, k_bias, a_h).view(b, width, kv_heads, d).transpose(1, 2)
    v_h = _projection(v_proj, v_bias, a_h).view(b, width, kv_heads, d).transpose(1, 2)
    k_s = _projection(k_proj, k_bias, a_step).view(e, kv_heads, 1, d)
    v_s = _projection(v_proj, v_bias, a_step).view(e, kv_heads, d)
    k_c = k_proj(offset).view(kv_heads, 1, d).expand(kv_heads, width, d)
    v_c = v_proj(offset).view(kv_heads, d)
    q = q_proj(norm(entering_last)).view(e, b, heads, d)
    if model.config.backbone != "gpt2":
        cos, sin = _rotary(model, hidden)  # [1, T, d]
        k_h = _rope(k_h, cos, sin)
        k_s = _rope(k_s.expand(e, kv_heads, width, d), cos, sin)
        k_c = _rope(k_c[None], cos, sin)[0]
        q = _rope(q.reshape(e * b, heads, 1, d), cos[0, last][:, None].repeat(e, 1, 1),
                  sin[0, last][:, None].repeat(e, 1, 1)).view(e, b, heads, d)  # fmt: skip
    else:
        k_s = k_s.expand(e, kv_heads, width, d)
    group = heads // kv_heads  # grouped-query attention: each kv head serves `group` heads
    q = q.view(e, b, kv_heads, group, d)
    inv = 1.0 / scale  # [E, b, T]
    dots = torch.einsum("ebkgd,bktd->ebkgt", q, k_h)
    dots = dots + torch.einsum("ebkgd,ektd->ebkgt", q, k_s)
    logits = dots * inv[:, :, None, None, :] + torch.einsum("ebkgd,ktd->ebkgt", q, k_c)
    visible = torch.arange(width, device=hidden.device)[None, :] <= last[:, None]  # [b, T]
    logits = logits * attn.scaling
    logits = logits.masked_fill(~visible[None, :, None, None, :], float("-inf"))
    p = torch.softmax(logits.float(), dim=-1).to(hidden.dtype)  # [E, b, kv, g, T]
    weighted = p * inv[:, :, None, None, :]
    out = torch.einsum("ebkgt,bktd->ebkgd", weighted, v_h)
    out = out + weighted.sum(-1, keepdim=True) * v_s[:, None, :, None, :]
    out = out + v_c[None, None, :, None, :]  # the weights of p sum to 1
    x = entering_last + o_proj(out.reshape(e * b, heads * d))
    return x + block.mlp(mlp_norm(x))


def last_block_states(model: Recommender, users: SteeringUsers) -> Tensor:
    """The last block's output at each user's last real position, [U, hidden]."""
    return at_last_position(users, layer_states(model, users, model.config.num_layers))


@torch.no_grad()
def added_steps(
    model: Recommender,
    layer: int,
    users: SteeringUsers,
    steps: Tensor,
    cached: Tensor | None = None,
    k: int = 10,
    rows_per_pass: int = 4096,
) -> tuple[Tensor, Tensor]:
    """(top-k [E, U, k], target ranks [E, U]) with each of `steps` [E, hidden] added to the
    state at `layer` (every position): all steps in one batch, each a block of the same
    users. `cached`: the states at `layer`, [U, hidden] at the users' last positions when the
    layer is the last one (`last_block_states`), else [U, T, hidden] (`layer_states`), so only
    what follows the layer runs; None runs every block."""

    def edit(hidden: Tensor, rows: int) -> Tensor:
        delta = steps.repeat_interleave(rows, dim=0).to(hidden.dtype)  # [E * rows, hidden]
        return hidden + (delta if hidden.dim() == 2 else delta[:, None, :])

    return _batched(model, layer, users, len(steps), edit, cached, k, rows_per_pass, steps)


@torch.no_grad()
def clamped_features(
    model: Recommender,
    layer: int,
    users: SteeringUsers,
    sae: TopKSae,
    features: Sequence[int],
    cached: Tensor | None = None,
    k: int = 10,
    rows_per_pass: int = 512,
) -> tuple[Tensor, Tensor]:
    """(top-k [F, U, k], target ranks [F, U]) with each of `features` clamped to 0 at `layer`
    (`clamp_to_zero`), batched like `added_steps` (fewer rows a pass: every position of every
    row is encoded into all the SAE's latents)."""
    feature_ids = torch.tensor(list(features), dtype=torch.long)

    def edit(hidden: Tensor, rows: int) -> Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        values, indices = sae.encode(flat)
        per_row = feature_ids.to(indices.device).repeat_interleave(len(flat) // len(features))
        without = values.masked_fill(indices == per_row[:, None], 0.0)
        contribution = sae.decode(values, indices) - sae.decode(without, indices)
        return (flat - contribution.to(hidden.dtype)).reshape(hidden.shape)

    return _batched(model, layer, users, len(features), edit, cached, k, rows_per_pass)


def _batched(
    model: Recommender,
    layer: int,
    users: SteeringUsers,
    n_edits: int,
    edit: Callable[[Tensor, int], Tensor],
    cached: Tensor | None,
    k: int,
    rows_per_pass: int,
    added: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Runs `n_edits` edits of the same users as one batch: row e * b + i is user i of a pass
    of b users under edit e; `edit(hidden, b)` edits the states of all E * b rows. Passes take
    users in order of input length and pad only to their own longest input (right padding
    never changes a real position under causal attention); results come back in user order.
    `added`: the edits are these steps [E, hidden] added at every position (`edit` adds
    them), so at the layer before the last `last_block_with_added_steps` runs instead."""
    model.eval()
    n_users = len(users.targets)
    per_pass = max(1, rows_per_pass // n_edits)
    shortcut = cached is not None and layer == model.config.num_layers
    lengths = (users.inputs > 0).sum(1)
    order = torch.argsort(lengths, stable=True)
    tops = torch.empty((n_edits, n_users, k), dtype=torch.int64)
    ranks = torch.empty((n_edits, n_users), dtype=torch.int64)
    for start in range(0, n_users, per_pass):
        rows = order[start : start + per_pass]
        b, width = len(rows), int(lengths[rows].max())
        inputs = users.inputs[rows, :width].repeat(n_edits, 1)
        if shortcut:
            scores = model.scores_from_last_block(edit(cached[rows].repeat(n_edits, 1), b))
        elif cached is not None and layer == model.config.num_layers - 1 and added is not None:
            states = cached[rows, :width]
            last_hidden = last_block_with_added_steps(model, states, lengths[rows], added)
            scores = model.scores_from_last_block(last_hidden)
        elif cached is not None and layer == model.config.num_layers - 1:
            # Only the last block follows the edit: it runs at the last positions only.
            edited = edit(cached[rows, :width].repeat(n_edits, 1, 1), b)
            last_hidden = last_block_at_last_position(model, edited, lengths[rows].repeat(n_edits))
            scores = model.scores_from_last_block(last_hidden)
        elif cached is not None:
            edited = edit(cached[rows, :width].repeat(n_edits, 1, 1), b)
            with blocks_after(model, layer, edited):
                scores = model.predict(inputs)
        else:
            with edit_hidden(model, layer, lambda h, b=b: edit(h, b)):
                scores = model.predict(inputs)
        targets = users.targets[rows].repeat(n_edits)
        histories = users.histories[rows].repeat(n_edits, 1)
        top, rank = _top_and_ranks(scores, targets, histories, k)
        cpu_rows = rows.cpu()
        tops[:, cpu_rows] = top.view(n_edits, b, k)
        ranks[:, cpu_rows] = rank.view(n_edits, b)
    return tops, ranks


def genre_items(catalog: Catalog, genres: Sequence[str], num_items: int) -> dict[str, Tensor]:
    """genre -> bool [num_items + 1] flags of the indexed items carrying it."""
    flags = {g: torch.zeros(num_items + 1, dtype=torch.bool) for g in genres}
    for item in catalog.items.values():
        for genre in item.genres:
            if genre in flags:
                flags[genre][item.idx] = True
    return flags


def user_genre_share(top: Tensor, genre_items: Tensor) -> Tensor:
    """Each user's share of the slots of `top` [..., U, k] held by items flagged in
    `genre_items` (bool [items]), float64."""
    return genre_items[top].double().mean(-1)


# ----------------------------------------------------------------------------- directions


@torch.no_grad()
def centroid_direction(model: Recommender, genre_items: Tensor) -> Tensor:
    """The genre's item centroid minus the mean item vector, in the hidden space [hidden].

    Items enter the residual stream as `item_in(item vector)`, so the difference of means is
    mapped by `item_in`'s linear part (its bias cancels). For SASRec that map is the identity
    and the one item table is both input and output, so this is the plain table centroid; for
    the teacher and students it is the frozen table as the blocks read it."""
    table = model.item_vectors[1:].float()
    flags = genre_items[1:].to(table.device)
    if not bool(flags.any()):
        raise ValueError("the genre flags no item; pass the flags of a genre in the catalog")
    difference = table[flags].mean(0) - table.mean(0)
    mapped = model.item_in(torch.stack([difference, torch.zeros_like(difference)]))
    return (mapped[0] - mapped[1]).detach()


def random_direction(hidden_size: int, seed: int, index: int) -> Tensor:
    """A unit vector drawn from N(0, I) by a generator seeded with (seed, index)."""
    x = torch.from_numpy(np.random.default_rng([seed, index]).standard_normal(hidden_size))
    return (x / x.norm()).float()


def neuron_direction(hidden_size: int, neuron: int, sign: str) -> Tensor:
    """The basis vector of hidden dimension `neuron`, negated for sign '-'."""
    x = torch.zeros(hidden_size)
    x[neuron] = 1.0 if sign == "+" else -1.0
    return x


def steering_steps(
    sae: TopKSae,
    feature: int,
    max_activation: float,
    baselines: dict[str, Tensor],
    alpha_scales: Sequence[float],
) -> dict[str, Tensor]:
    """direction -> steps [S, hidden], one per scale: for 'sae' alpha * d_f with alpha =
    scale x `max_activation`; every baseline direction scaled to that step's norm."""
    d = sae.decoder_direction(feature).float()
    alphas = torch.tensor([s * max_activation for s in alpha_scales], device=d.device)
    sae_steps = alphas[:, None] * d[None, :]
    norms = sae_steps.norm(dim=1, keepdim=True)
    out = {"sae": sae_steps}
    for name, direction in baselines.items():
        length = direction.norm()
        if not bool(length > 0):
            raise ValueError(f"the {name} direction is zero; it has no norm to scale")
        out[name] = norms * (direction.to(d.device).float() / length)[None, :]
    return out


# ----------------------------------------------------------------------------- targets


class GenreTarget(NamedTuple):
    """What is steered for one genre."""

    genre: str
    feature: int
    """The SAE feature most enriched for the genre (`genre_targets`)."""
    max_activation: float
    neuron: int | None
    """The hidden dimension most enriched for the genre (`genre_neurons`), or None when no
    neuron's top items hold the genre: then the sweep takes the centroid's largest
    coordinate."""
    neuron_sign: str = "+"


def _purest(
    enrichment_rows: list[dict], kind: str, min_top_items: int
) -> dict[str, tuple[int, str]]:
    """genre -> (unit, sign) of the `kind` unit whose top items are most enriched for it
    (highest purity; ties: lowest unit, '+' first)."""
    best: dict[str, tuple[tuple[float, int, bool], int, str]] = {}
    for row in enrichment_rows:
        if row["kind"] != kind or row["family"] != "genre" or row["top_items"] < min_top_items:
            continue
        sign = row.get("sign", "+")
        key = (row["purity"], -row["unit"], sign == "+")
        if row["value"] not in best or key > best[row["value"]][0]:
            best[row["value"]] = (key, row["unit"], sign)
    return {genre: (unit, sign) for genre, (_, unit, sign) in sorted(best.items())}


def genre_targets(
    enrichment_rows: list[dict], max_activation: dict[int, float], min_top_items: int
) -> dict[str, tuple[int, float]]:
    """genre -> (feature, its max activation): per genre, the SAE feature whose top items are
    most enriched for it (highest purity, see `features.enrichment`) among features with at
    least `min_top_items` top items. `enrichment_rows` are rows of the enrichment table."""
    return {
        genre: (feature, max_activation[feature])
        for genre, (feature, _) in _purest(enrichment_rows, "feature", min_top_items).items()
        if max_activation.get(feature, 0) > 0
    }


def genre_neurons(enrichment_rows: list[dict]) -> dict[str, tuple[int, str]]:
    """genre -> (hidden dimension, sign): the neuron, read in one sign, whose top items are
    most enriched for the genre, by the rule `genre_targets` applies to SAE features (every
    neuron sign has its full top items, so no support bound)."""
    return _purest(enrichment_rows, "neuron", 0)


def steering_targets(
    enrichment_rows: list[dict], max_activation: dict[int, float], min_top_items: int
) -> list[GenreTarget]:
    """Per genre with an SAE target (`genre_targets`): its feature and its best neuron."""
    neurons = genre_neurons(enrichment_rows)
    return [
        GenreTarget(genre, feature, scale, *neurons.get(genre, (None, "+")))
        for genre, (feature, scale) in genre_targets(
            enrichment_rows, max_activation, min_top_items
        ).items()
    ]


# ----------------------------------------------------------------------------- the sweep


class SteeringPoint(NamedTuple):
    """One measurement, averaged over the users."""

    genre: str
    direction: str
    """'none', a `DIRECTIONS` entry, or 'sae_clamp'."""
    feature: int
    """The genre's SAE feature on the rows of its own sweep (none, sae, sae_clamp), -1 on a
    baseline direction's rows (so a join on SAE features never picks up a baseline)."""
    neuron: int
    """The neuron of the 'neuron' direction, -1 elsewhere."""
    mode: str
    """'baseline' (none), 'add' or 'clamp'."""
    alpha_scale: float
    """alpha in units of the feature's max activation (0 for none and clamp)."""
    alpha: float
    """The multiple of the direction added: of d_f for sae, of the unit vector (= step_norm)
    for a baseline."""
    step_norm: float
    """||alpha * d_f||, the norm of every direction's step at this scale."""
    share: float
    """Share of the genre in the top 10."""
    ndcg: float
    """Test NDCG@10 (seen items filtered)."""
    share_active: float | None
    """Share of the genre on the users with the feature active at their last position (None
    when there are none)."""
    n_active: int
    n_users: int


class SteeringSweep(NamedTuple):
    points: list[SteeringPoint]
    users: pa.Table
    """Per (genre, direction, scale, user): `USERS_SCHEMA`."""
    targets: list[GenreTarget]
    """The targets as steered: every neuron resolved."""
    neurons_from_centroid: int
    """Genres whose neuron no enrichment row named: taken from the centroid's largest entry."""


class _Recorder:
    """Collects per-user outcomes into `USERS_SCHEMA` columns and their means as points."""

    def __init__(self, users: SteeringUsers, k: int) -> None:
        self.user = users.user_idx.astype(np.int32)
        self.k = k
        self.columns: dict[str, list[np.ndarray]] = {n: [] for n in USERS_SCHEMA.names}
        self.points: list[SteeringPoint] = []

    def add(
        self,
        target: GenreTarget,
        direction: str,
        scale: float,
        alpha: float,
        step_norm: float,
        share: Tensor,
        ranks: Tensor,
        active: np.ndarray,
    ) -> None:
        share_np = share.numpy()
        ndcg = per_user_ndcg(ranks, self.k).numpy()
        n = len(self.user)
        unit = {"sae": target.feature, CLAMP: target.feature, "neuron": target.neuron}
        values = {
            "genre": np.full(n, target.genre, dtype=object),
            "direction": np.full(n, direction, dtype=object),
            "feature": np.full(n, unit.get(direction, -1), dtype=np.int32),
            "scale": np.full(n, scale, dtype=np.float64),
            "user": self.user,
            "genre_share": share_np,
            "ndcg10": ndcg,
            "active": active,
        }
        for name, column in values.items():
            self.columns[name].append(column)
        own_sweep = direction in (NO_STEERING, "sae", CLAMP)
        mode = {NO_STEERING: "baseline", CLAMP: "clamp"}.get(direction, "add")
        n_active = int(active.sum())
        self.points.append(
            SteeringPoint(
                genre=target.genre,
                direction=direction,
                feature=target.feature if own_sweep else -1,
                neuron=int(target.neuron) if direction == "neuron" else -1,
                mode=mode,
                alpha_scale=scale,
                alpha=alpha,
                step_norm=step_norm,
                share=float(share_np.mean()),
                ndcg=float(ndcg.mean()),
                share_active=float(share_np[active].mean()) if n_active else None,
                n_active=n_active,
                n_users=n,
            )
        )

    def table(self) -> pa.Table:
        return pa.table(
            {n: np.concatenate(self.columns[n]) for n in USERS_SCHEMA.names}, schema=USERS_SCHEMA
        )


def _resolve_neuron(target: GenreTarget, centroid: Tensor) -> GenreTarget:
    if target.neuron is not None:
        return target
    axis = int(centroid.abs().argmax())
    return target._replace(neuron=axis, neuron_sign="+" if centroid[axis] >= 0 else "-")


@torch.no_grad()
def steering_sweep(
    model: Recommender,
    layer: int,
    sae: TopKSae,
    targets: Sequence[GenreTarget],
    genre_items: dict[str, Tensor],
    users: SteeringUsers,
    alpha_scales: Sequence[float],
    seed: int = 0,
    k: int = 10,
    on_progress: Callable[[int, int], None] | None = None,
) -> SteeringSweep:
    """Per genre: the unsteered model, every direction of `DIRECTIONS` added at every
    alpha = scale x the feature's max activation (baselines at the SAE step's norm), and the
    feature clamped to 0; each user's genre share and NDCG@k, and which users have the
    feature active at their last position."""
    model.eval()
    if layer == model.config.num_layers:
        cached = last = last_block_states(model, users)
    else:
        cached = layer_states(model, users, layer)
        last = at_last_position(users, cached)
    values, indices = sae.encode(last)
    values, indices = values.cpu(), indices.cpu()
    top, ranks = top_k_and_ranks(model, users, k=k)
    clamped, clamped_ranks = clamped_features(
        model, layer, users, sae, [t.feature for t in targets], cached, k=k
    )
    hidden_size = last.shape[-1]
    recorder = _Recorder(users, k)
    resolved, from_centroid = [], 0
    for i, target in enumerate(targets):
        mask = genre_items[target.genre]
        active = ((indices == target.feature) & (values > 0)).any(1).numpy()
        centroid = centroid_direction(model, mask)
        from_centroid += target.neuron is None
        target = _resolve_neuron(target, centroid)
        resolved.append(target)
        baselines = {
            "centroid": centroid,
            "neuron": neuron_direction(hidden_size, target.neuron, target.neuron_sign),
            "random": random_direction(hidden_size, seed, i),
        }
        steps = steering_steps(sae, target.feature, target.max_activation, baselines, alpha_scales)
        recorder.add(target, NO_STEERING, 0.0, 0.0, 0.0, user_genre_share(top, mask), ranks, active)
        stacked = torch.cat([steps[d] for d in DIRECTIONS]).to(last.device)
        tops, step_ranks = added_steps(model, layer, users, stacked, cached, k=k)
        shares = user_genre_share(tops, mask)
        row = 0
        for direction in DIRECTIONS:
            for j, scale in enumerate(alpha_scales):
                norm = float(steps[direction][j].norm())
                alpha = scale * target.max_activation if direction == "sae" else norm
                recorder.add(
                    target,
                    direction,
                    float(scale),
                    alpha,
                    norm,
                    shares[row],
                    step_ranks[row],
                    active,
                )
                row += 1
        share = user_genre_share(clamped[i], mask)
        recorder.add(target, CLAMP, 0.0, 0.0, 0.0, share, clamped_ranks[i], active)
        if on_progress is not None:
            on_progress(i + 1, len(targets))
    return SteeringSweep(recorder.points, recorder.table(), resolved, from_centroid)


# ----------------------------------------------------------------------------- summary


class GenreOutcome(NamedTuple):
    """One (genre, direction): its best share within the NDCG@10 loss bound, and (on the
    SAE's row) the clamp's effect on all users and on the active ones."""

    genre: str
    direction: str
    feature: int
    """The genre's SAE feature on the 'sae' row, -1 on a baseline's."""
    neuron: int
    """The neuron of the 'neuron' row, -1 elsewhere."""
    base_share: float
    best_share: float
    """Highest share among this direction's scales whose NDCG@10 loss is within the bound
    (the unsteered share if none is)."""
    best_scale: float
    """The scale of best_share (0: no scale within the bound)."""
    best_alpha_scale: float
    """= best_scale (the name the feature browser reads)."""
    share_ratio: float
    base_ndcg: float
    best_ndcg: float
    ndcg_loss: float
    """Relative NDCG@10 loss at best_scale (0 if no scale qualified)."""
    reaches_target: bool
    """share_ratio >= the required multiple, with a gain."""
    n_users: int
    clamp_share: float | None
    """All users: the genre's share with the feature clamped to 0 (sae row only)."""
    clamp_ndcg: float | None
    n_active: int | None
    """Users with the feature active at their last position (sae row only)."""
    base_share_active: float | None
    """Active users: the unsteered share (None when n_active is 0)."""
    clamp_share_active: float | None
    """Active users: the share with the feature clamped to 0."""


def summarize(
    points: Sequence[SteeringPoint], max_ndcg_loss: float = 0.2, required_ratio: float = 3.0
) -> list[GenreOutcome]:
    """Per genre and direction: the best top-10 share reachable within `max_ndcg_loss`
    relative NDCG@10 loss, against the unsteered share."""
    outcomes = []
    for genre in dict.fromkeys(p.genre for p in points):
        rows = [p for p in points if p.genre == genre]
        base = next(p for p in rows if p.direction == NO_STEERING)
        clamp = next((p for p in rows if p.direction == CLAMP), None)
        for direction in dict.fromkeys(p.direction for p in rows if p.mode == "add"):
            added = [p for p in rows if p.direction == direction]
            allowed = [p for p in added if p.ndcg >= (1 - max_ndcg_loss) * base.ndcg]
            best = max(allowed, key=lambda p: p.share, default=base)
            if base.share > 0:
                ratio = best.share / base.share
            else:  # a genre absent from the unsteered lists: any share is an infinite gain
                ratio = float("inf") if best.share > 0 else 1.0
            on_sae = direction == "sae" and clamp is not None
            outcomes.append(
                GenreOutcome(
                    genre=genre,
                    direction=direction,
                    feature=added[0].feature,
                    neuron=added[0].neuron,
                    base_share=base.share,
                    best_share=best.share,
                    best_scale=best.alpha_scale,
                    best_alpha_scale=best.alpha_scale,
                    share_ratio=ratio,
                    base_ndcg=base.ndcg,
                    best_ndcg=best.ndcg,
                    ndcg_loss=1 - best.ndcg / base.ndcg if base.ndcg > 0 else 0.0,
                    reaches_target=ratio >= required_ratio and best.share > base.share,
                    n_users=base.n_users,
                    clamp_share=clamp.share if on_sae else None,
                    clamp_ndcg=clamp.ndcg if on_sae else None,
                    n_active=clamp.n_active if on_sae else None,
                    base_share_active=base.share_active if on_sae else None,
                    clamp_share_active=clamp.share_active if on_sae else None,
                )
            )
    return outcomes


def share_gains(
    users: pa.Table, scales: dict[str, float], directions: Sequence[str] = DIRECTIONS
) -> dict[str, np.ndarray]:
    """direction -> [genres, users]: each user's gain in genre share along the direction at
    the genre's scale in `scales` (0: unsteered, a gain of 0) over the unsteered share, from
    a `USERS_SCHEMA` table; genres in `scales` order, users in `user` order."""
    frame = users.select(["genre", "direction", "scale", "user", "genre_share"]).to_pandas()
    frame = frame.sort_values("user", kind="stable")
    by_key = {
        key: group["genre_share"].to_numpy()
        for key, group in frame.groupby(["genre", "direction", "scale"], sort=False)
    }
    out = {}
    for direction in directions:
        rows = []
        for genre, scale in scales.items():
            base = by_key[(genre, NO_STEERING, 0.0)]
            rows.append((base if scale == 0 else by_key[(genre, direction, scale)]) - base)
        out[direction] = np.stack(rows) if rows else np.zeros((0, 0))
    return out


_ARROW_TYPES = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


def as_table(rows: Sequence[NamedTuple], cls: type) -> pa.Table:
    """`rows` of the NamedTuple `cls` as a table typed by its annotations (`X | None`
    nullable), so a column of all nulls keeps its type."""
    hints = get_type_hints(cls)
    fields = []
    for name in cls._fields:
        hint = hints[name]
        args = [a for a in get_args(hint) if a is not type(None)]
        fields.append(pa.field(name, _ARROW_TYPES[args[0] if args else hint]))
    schema = pa.schema(fields)
    return pa.Table.from_pylist([r._asdict() for r in rows], schema=schema)
