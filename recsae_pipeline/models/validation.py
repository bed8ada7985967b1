"""Checks on trained recommenders, and the outcome type every artifact check returns."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from recsae_pipeline.models.artifacts import load_recommender, read_metrics
from recsae_pipeline.models.metrics import PopularityScorer
from recsae_pipeline.models.training import evaluate


class CheckOutcome(NamedTuple):
    passed: bool
    description: str
    """What was measured against which bound, or what is wrong."""
    metadata: dict[str, Any]
    """The measured values, for the UI."""


def from_problems(problems: list[str], ok: str, metadata: dict[str, Any]) -> CheckOutcome:
    """Passed when `problems` is empty; the description lists them, else says `ok`."""
    return CheckOutcome(not problems, "; ".join(problems) or ok, metadata)


def beats_popularity(
    model_dir: Path, sequences: list[np.ndarray], num_items: int, device: torch.device
) -> CheckOutcome:
    """The model's saved validation NDCG@10 above the popularity ranking's."""
    popular = evaluate(
        PopularityScorer(sequences, num_items), sequences, num_items, "valid", device, sampled=False
    )["ndcg@10"]
    ours = read_metrics(model_dir)["valid"]["ndcg@10"]
    return CheckOutcome(
        ours > popular,
        f"valid NDCG@10 {ours:.4f} vs popularity {popular:.4f}",
        {"model_valid_ndcg@10": ours, "popularity_valid_ndcg@10": popular},
    )


def finite_weights(model_dir: Path) -> CheckOutcome:
    """No NaN or Inf in any saved weight."""
    state = load_recommender(model_dir, torch.device("cpu")).state_dict()
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    return CheckOutcome(
        not bad,
        "all finite" if not bad else f"non-finite: {', '.join(bad)}",
        {"tensors": len(state), "non_finite": len(bad)},
    )


def close_to_teacher(student_dir: Path, teacher_dir: Path, tolerance: float) -> CheckOutcome:
    """The student's relative test NDCG@10 loss against the teacher within `tolerance`."""
    ours, theirs = read_metrics(student_dir)["test"], read_metrics(teacher_dir)["test"]
    loss = 1 - ours["ndcg@10"] / max(theirs["ndcg@10"], 1e-12)
    return CheckOutcome(
        loss <= tolerance,
        f"relative NDCG@10 loss {loss:+.1%} (tolerance {tolerance:.0%})",
        {
            "student_ndcg@10": ours["ndcg@10"],
            "teacher_ndcg@10": theirs["ndcg@10"],
            "relative_loss": loss,
        },
    )
