"""One table comparing recommenders: test quality, size, training time and inference cost."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recsae_pipeline.data.batching import Split
from recsae_pipeline.models.metrics import per_user_ndcg
from recsae_pipeline.models.profiling import profile_inference
from recsae_pipeline.models.recommender import Recommender
from recsae_pipeline.models.training import NextItemScorer, evaluate, input_length, user_ranks


def comparison_rows(
    scorers: Mapping[str, NextItemScorer],
    saved_metrics: Mapping[str, dict[str, Any]],
    sequences: list[np.ndarray],
    num_items: int,
    device: torch.device,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """A row per scorer: test metrics (the saved ones when a model has them: a reload
    reproduces them exactly), params, depth, training time, best epoch, inference cost."""
    rows = []
    for name, scorer in scorers.items():
        saved = saved_metrics.get(name, {})
        test = saved.get("test") or evaluate(scorer, sequences, num_items, "test", device)
        cost = profile_inference(scorer, sequences, device, max_len=input_length(scorer))
        row = {
            "model": name,
            **test,
            "params": saved.get("params", 0),
            "layers": scorer.config.num_layers if isinstance(scorer, Recommender) else 0,
            "train_seconds": saved.get("train_seconds", 0.0),
            "best_epoch": saved.get("best_epoch", 0),
            "ms_per_1000_users": cost.ms_per_1000_users,
            "peak_inference_mb": cost.peak_memory_mb,
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def distillation_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The student against the teacher (speed-up, relative NDCG@10 loss) and against its
    CE-only ablation (NDCG@10 difference)."""
    by_name = {r["model"]: r for r in rows}
    teacher, student = by_name["teacher"], by_name["student"]
    return {
        "student_speedup_vs_teacher": teacher["ms_per_1000_users"]
        / max(student["ms_per_1000_users"], 1e-9),
        "student_relative_ndcg10_loss": 1 - student["ndcg@10"] / max(teacher["ndcg@10"], 1e-12),
        "distilled_minus_ce_only_ndcg10": student["ndcg@10"] - by_name["student_ce"]["ndcg@10"],
    }


def per_user_rows(
    scorers: Mapping[str, NextItemScorer],
    sequences: list[np.ndarray],
    device: torch.device,
    split: Split = "test",
    saved_ranks: Mapping[str, Tensor | None] | None = None,
) -> dict[str, np.ndarray]:
    """Columns of one row per (model, user): the user's index in `sequences`, the 0-based rank
    of their `split` target (seen items filtered) and their NDCG@10 and HR@10. A model's test
    `saved_ranks` (its training step's, `TEST_RANKS_FILE`) stand in for scoring it again:
    a reload scores exactly as the saved model did."""
    columns: dict[str, list[np.ndarray]] = {"model": [], "user": [], "rank": [], "ndcg@10": []}
    for name, scorer in scorers.items():
        ranks = (saved_ranks or {}).get(name) if split == "test" else None
        if ranks is None or len(ranks) != len(sequences):
            ranks, _ = user_ranks(scorer, sequences, split, device)
        columns["model"].append(np.full(len(ranks), name, dtype=object))
        columns["user"].append(np.arange(len(ranks), dtype=np.int32))
        columns["rank"].append(ranks.numpy().astype(np.int32))
        columns["ndcg@10"].append(per_user_ndcg(ranks, 10).numpy())
    out = {k: np.concatenate(v) for k, v in columns.items()}
    out["hr@10"] = (out["rank"] < 10).astype(np.float64)
    return out
