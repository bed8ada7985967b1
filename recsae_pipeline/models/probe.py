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

from recsae_pipeline.models.recommender import Recommender
from recsae_pipeline.models.training import evaluate, train_examples


class LayerScore(NamedTuple):
    layer: int
    readout: dict[str, float]
    """Test metrics with the teacher's final norm + head applied to this layer."""
    probe: dict[str, float]
    """Test metrics of a linear head trained on this layer's frozen, normed state."""


class _LayerScorer:
    """Scores the next item from layer `layer` through `head` (a Linear hidden -> d_item)."""

    def __init__(self, model: Recommender, layer: int, head: nn.Module) -> None:
        self.model, self.layer, self.head = model, layer, head

    def user(self, states: tuple[Tensor, ...]) -> Tensor:
        h = states[self.layer]
        # transformers applies the final norm to the last entry already.
        return self.head(h if self.layer == len(states) - 1 else self.model.final_norm(h))

    @torch.no_grad()
    def predict(self, items: Tensor) -> Tensor:
        lengths = (items > 0).sum(1)
        states = self.model(items, output_hidden_states=True).hidden_states
        user = self.user(states)[torch.arange(len(items), device=items.device), lengths - 1]
        return self.model.scores(user)


def layer_scores(
    teacher: Recommender,
    sequences: list[np.ndarray],
    num_items: int,
    device: torch.device,
    probe_epochs: int = 2,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[LayerScore]:
    """Readout and trained-probe test metrics for every layer 1..L of the teacher."""
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
    for _ in range(probe_epochs):
        for index in torch.randperm(len(inputs), generator=generator).split(batch_size):
            items, target = inputs[index].to(device), targets[index].to(device)
            real = target > 0
            with torch.no_grad():
                states = teacher(items, output_hidden_states=True).hidden_states
            loss = sum(
                F.cross_entropy(
                    teacher.scores(
                        _LayerScorer(teacher, layer, heads[layer - 1]).user(states)[real]
                    ),
                    target[real],
                )
                for layer in range(1, layers + 1)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def test_metrics(layer: int, head: nn.Module) -> dict[str, float]:
        scorer = _LayerScorer(teacher, layer, head)
        return evaluate(
            scorer,
            sequences,
            num_items,
            "test",
            device,
            max_len=teacher.config.max_len,
            sampled=False,
        )

    results = []
    for layer in range(1, layers + 1):
        readout, probe = (
            test_metrics(layer, teacher.user_head),
            test_metrics(layer, heads[layer - 1]),
        )
        results.append(LayerScore(layer, readout, probe))
    return results
