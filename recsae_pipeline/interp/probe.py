"""Run crafted item sequences through a model and its SAE: a feature's activation at every position."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from recsae_pipeline.activations.hooks import read_hidden
from recsae_pipeline.data.batching import pad_right
from recsae_pipeline.models.recommender import Recommender
from recsae_pipeline.sae.model import TopKSae


class FeatureProbe:
    """Runs item sequences through the recommender and reads SAE features at its layer."""

    def __init__(
        self, model: Recommender, sae: TopKSae, layer: int, device: torch.device | str = "cpu"
    ) -> None:
        self.model = model.eval()
        self.sae = sae.eval()
        self.layer = layer
        self.device = torch.device(device)
        self.runs = 0
        """Sequences run so far (the experiment budget)."""

    @torch.no_grad()
    def activations(
        self, sequences: Sequence[Sequence[int]], feature: int, batch_size: int = 256
    ) -> list[np.ndarray]:
        """The feature's activation at every position of each sequence (0 where it is not
        among the top k). Sequences longer than the model's max_len keep their last max_len
        items, and the returned arrays cover those."""
        if not 0 <= feature < self.sae.config.n_latents:
            raise ValueError(
                f"feature {feature} is out of range 0..{self.sae.config.n_latents - 1}"
            )
        max_len = self.model.config.max_len
        cut = [np.asarray(list(s)[-max_len:], dtype=np.int64) for s in sequences]
        if any(len(s) == 0 for s in cut):
            raise ValueError("every experiment sequence needs at least one item")
        if any((s <= 0).any() or (s > self.model.config.num_items).any() for s in cut):
            raise ValueError(f"item ids must be in 1..{self.model.config.num_items}")
        out: list[np.ndarray] = []
        for start in range(0, len(cut), batch_size):
            batch = cut[start : start + batch_size]
            items = pad_right(batch).to(self.device)
            hidden = read_hidden(self.model, items, self.layer)
            flat = hidden.reshape(-1, hidden.shape[-1])
            values, indices = self.sae.encode(flat)
            acts = (values * (indices == feature)).sum(-1).reshape(items.shape).cpu().numpy()
            out.extend(acts[row, : len(seq)].astype(np.float32) for row, seq in enumerate(batch))
        self.runs += len(cut)
        return out
