"""SLMRec's redundancy analysis: how well each teacher layer's hidden state predicts the next item.

Two readings per layer l: `readout` sends h_l through the teacher's own final norm and user
head (no training, SLMRec's "infer" curve); `probe` trains a fresh linear head on the frozen,
normed h_l (how much next-item information the layer holds, SLMRec's "train" curve, cheaply).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsae_pipeline.data.batching import pad_right, split_examples
from recsae_pipeline.models.metrics import filter_seen, full_ranking_metrics, target_ranks
from recsae_pipeline.models.recommender import Recommender
from recsae_pipeline.models.training import length_groups, train_examples


class LayerScore(NamedTuple):
    layer: int
    readout: dict[str, float]
    """Test metrics with the teacher's final norm + head applied to this layer."""
    probe: dict[str, float]
    """Test metrics of a linear head trained on this layer's frozen, normed state."""


def _layer_user(
    model: Recommender, states: tuple[Tensor, ...], layer: int, head: nn.Module
) -> Tensor:
    """User vectors read from hidden state `layer` through `head` (a Linear hidden -> d_item)."""
    h = states[layer]
    # transformers applies the final norm to the last entry already.
    return head(h if layer == len(states) - 1 else model.final_norm(h))


@torch.no_grad()
def _test_ranks(
    model: Recommender,
    heads: list[nn.Module],
    sequences: list[np.ndarray],
    device: torch.device,
    batch_size: int,
) -> list[Tensor]:
    """Per (layer, head) pair, every test user's full-ranking rank (seen items filtered): one
    forward pass of the deep model per batch serves every layer and head."""
    layers = model.config.num_layers
    inputs, targets, histories = split_examples(sequences, "test", model.config.max_len)
    ranks: list[list[Tensor]] = [[] for _ in range(layers * len(heads))]
    for start in range(0, len(sequences), batch_size):
        batch = slice(start, start + batch_size)
        items = pad_right(inputs[batch]).to(device)
        target = torch.from_numpy(targets[batch]).to(device)
        seen = pad_right(histories[batch]).to(device)
        last = (items > 0).sum(1) - 1
        rows = torch.arange(len(items), device=device)
        states = model(items, output_hidden_states=True).hidden_states
        for layer in range(1, layers + 1):
            for h, head in enumerate(heads):
                head = head[layer - 1] if isinstance(head, nn.ModuleList) else head
                user = _layer_user(model, states, layer, head)[rows, last]
                scores = filter_seen(model.scores(user).float(), seen, target)
                ranks[(layer - 1) * len(heads) + h].append(target_ranks(scores, target).cpu())
    return [torch.cat(r) for r in ranks]


def layer_scores(
    teacher: Recommender,
    sequences: list[np.ndarray],
    num_items: int,
    device: torch.device,
    probe_epochs: int = 2,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    eval_batch_size: int = 256,
    groups: int = 3,
) -> list[LayerScore]:
    """Readout and trained-probe test metrics for every layer 1..L of the teacher. The teacher
    runs once per training batch for all L probes, and once per test batch for all 2L readings.
    Each batch runs as `groups` sub-batches of similar length (`training.length_groups`)."""
    teacher = teacher.to(device).eval().requires_grad_(False)
    layers = teacher.config.num_layers
    generator = torch.Generator().manual_seed(seed)
    heads = nn.ModuleList(
        nn.Linear(teacher.config.hidden_size, teacher.config.d_item, bias=False)
        for _ in range(layers)
    )
    with torch.no_grad():
        for head in heads:  # start every probe from the teacher's own head
            head.weight.copy_(teacher.user_head.weight)
    heads.to(device)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr)
    inputs, targets = train_examples(sequences, teacher.config.max_len)
    lengths = (inputs > 0).sum(1)
    for _ in range(probe_epochs):
        for index in torch.randperm(len(inputs), generator=generator).split(batch_size):
            # The frozen teacher runs per sub-batch of similar lengths; the probes train on
            # the real positions of all of them at once.
            at_layer: list[list[Tensor]] = [[] for _ in range(layers + 1)]
            real_targets = []
            for group in length_groups(lengths[index], groups):
                rows = index[group]
                width = int(lengths[rows].max())
                items, target = inputs[rows, :width].to(device), targets[rows, :width].to(device)
                real = target > 0
                with torch.no_grad():
                    states = teacher(items, output_hidden_states=True).hidden_states
                for layer in range(1, layers + 1):
                    at_layer[layer].append(states[layer][real])
                real_targets.append(target[real])
            target = torch.cat(real_targets)
            states = tuple(torch.cat(h) if h else None for h in at_layer)
            loss = sum(
                F.cross_entropy(
                    teacher.scores(_layer_user(teacher, states, layer, heads[layer - 1])),
                    target,
                )
                for layer in range(1, layers + 1)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    heads.eval()
    ranks = _test_ranks(teacher, [teacher.user_head, heads], sequences, device, eval_batch_size)
    return [
        LayerScore(
            layer,
            full_ranking_metrics(ranks[2 * (layer - 1)]),
            full_ranking_metrics(ranks[2 * (layer - 1) + 1]),
        )
        for layer in range(1, layers + 1)
    ]
