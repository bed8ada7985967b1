"""SLMRec distillation (arXiv 2405.17890): a shallow student aligned block by block to a deep teacher.

Loss = CE + lambda1 * sum_b (1 - cos(s_b, t_b)) + lambda2 * sum_b ||s_b - t_b||_2
     + lambda3 * sum of next-item CEs of heads on the intermediate student blocks,
following the public code's sums and un-squared norm. Unlike SLMRec, which aligns the last
token only, every term here is applied at every non-padding position, matching the SASRec+
objective that supervises every position.

The teacher is frozen and in eval mode, so its states at the aligned layers are the same every
epoch: `cache_teacher_states` computes them once (forward only, stored in float16) and the loss
reads them by training-window index instead of running the deep teacher at every step. Past
`max_cache_gb` the teacher runs live at every step instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsae_pipeline.models.recommender import Recommender
from recsae_pipeline.models.training import (
    EpochReport,
    TrainConfig,
    TrainResult,
    train_examples,
    train_recommender,
)


@dataclass(frozen=True)
class DistillConfig:
    """distill=False trains the same student on CE alone (the ablation)."""

    distill: bool = True
    lambda_cosine: float = 1.0
    lambda_l2: float = 0.1
    lambda_supervision: float = 0.1
    max_cache_gb: float = 4.0
    """Largest cache of teacher states (float16) kept for the whole training; 0 disables it."""


class DistillTerms(NamedTuple):
    total: Tensor
    """The minimised loss."""
    ce: Tensor
    """Next-item cross-entropy of the student's final head."""
    cosine: Tensor
    """Sum over aligned blocks of the mean (1 - cosine similarity) to the teacher."""
    l2: Tensor
    """Sum over aligned blocks of the mean L2 distance (not squared) to the teacher."""
    supervision: Tensor
    """Sum of the next-item cross-entropies of the intermediate-block heads."""


def aligned_blocks(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices: student block b <-> teacher block b * M / N."""
    if teacher_layers % student_layers:
        raise ValueError(
            f"teacher layers {teacher_layers} are not a multiple of student layers "
            f"{student_layers}; pick a student depth that divides the teacher's"
        )
    step = teacher_layers // student_layers
    return [(b, b * step) for b in range(1, student_layers + 1)]


class DistillationLoss(nn.Module):
    """Holds the teacher, frozen in place (eval, no grad), and the student's intermediate heads
    (trained with the student, then dropped)."""

    def __init__(self, teacher: Recommender, student: Recommender, config: DistillConfig) -> None:
        super().__init__()
        if teacher.config.hidden_size != student.config.hidden_size:
            raise ValueError(
                f"teacher hidden_size {teacher.config.hidden_size} != student hidden_size "
                f"{student.config.hidden_size}; SLMRec aligns states of equal width"
            )
        self.config = config
        self.teacher = teacher.requires_grad_(False).eval()
        self.blocks = aligned_blocks(student.config.num_layers, teacher.config.num_layers)
        heads = student.config.num_layers - 1 if config.distill else 0
        self.heads = nn.ModuleList(
            nn.Linear(student.config.hidden_size, student.config.d_item, bias=False)
            for _ in range(heads)
        )

    cache: list[Tensor] | None = None
    """Per aligned block, the teacher's states [windows, max_len, hidden] (float16)."""

    @torch.no_grad()
    def cache_teacher_states(self, inputs: Tensor, batch_size: int = 256) -> bool:
        """Compute the teacher's aligned states for every training window `inputs` once; False
        (and no cache) when they would exceed `max_cache_gb`."""
        if not self.config.distill:
            return False
        hidden = self.teacher.config.hidden_size
        size = inputs.numel() * hidden * len(self.blocks) * 2
        if size > self.config.max_cache_gb * 2**30:
            return False
        device = self.teacher.item_vectors.device
        cache = [
            torch.zeros((*inputs.shape, hidden), dtype=torch.float16, device=device)
            for _ in self.blocks
        ]
        for start in range(0, len(inputs), batch_size):
            items = inputs[start : start + batch_size].to(device)
            width = max(int((items > 0).sum(1).max()), 1)
            states = self.teacher(items[:, :width], output_hidden_states=True).hidden_states
            for out, (_, t) in zip(cache, self.blocks, strict=True):
                out[start : start + len(items), :width] = states[t].half()
        self.cache = cache
        return True

    def _teacher_states(self, items: Tensor, rows: Tensor | None) -> list[Tensor]:
        if self.cache is not None and rows is not None:
            width = items.shape[1]
            rows = rows.to(self.cache[0].device)
            return [c[rows, :width].to(items.device).float() for c in self.cache]
        states = self.teacher(items, output_hidden_states=True).hidden_states
        return [states[t] for _, t in self.blocks]

    def train(self, mode: bool = True) -> DistillationLoss:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(
        self, student: Recommender, items: Tensor, targets: Tensor, rows: Tensor | None = None
    ) -> DistillTerms:
        real = targets > 0
        out = student(items, output_hidden_states=self.config.distill)
        ce = F.cross_entropy(student.scores(out.user[real]), targets[real])
        zero = ce.new_zeros(())
        if not self.config.distill:
            return DistillTerms(ce, ce, zero, zero, zero)
        with torch.no_grad():
            teacher_states = self._teacher_states(items, rows)
        cosine, l2 = zero, zero
        for (s, _), teacher_state in zip(self.blocks, teacher_states, strict=True):
            student_state, teacher_state = out.hidden_states[s][real], teacher_state[real]
            cosine = cosine + (1 - F.cosine_similarity(student_state, teacher_state, dim=-1)).mean()
            l2 = l2 + (student_state - teacher_state).norm(dim=-1).mean()
        supervision = zero
        for b, head in enumerate(self.heads, start=1):
            logits = student.scores(head(out.hidden_states[b][real]))
            supervision = supervision + F.cross_entropy(logits, targets[real])
        c = self.config
        total = (
            ce + c.lambda_cosine * cosine + c.lambda_l2 * l2 + c.lambda_supervision * supervision
        )
        return DistillTerms(total, ce, cosine, l2, supervision)


def train_student(
    student: Recommender,
    teacher: Recommender,
    sequences: list[np.ndarray],
    num_items: int,
    train_config: TrainConfig,
    distill_config: DistillConfig,
    device: torch.device,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> TrainResult:
    """The SASRec+ loop with the SLMRec loss; the student ends in its best validation state.
    The teacher's aligned states are computed once up front (`cache_teacher_states`)."""
    teacher.to(device)
    loss = DistillationLoss(teacher, student, distill_config)
    if distill_config.distill:
        inputs, _ = train_examples(sequences, student.config.max_len)
        loss.cache_teacher_states(inputs, batch_size=train_config.eval_batch_size)
    return train_recommender(
        student, sequences, num_items, train_config, device, on_epoch=on_epoch, loss_fn=loss
    )
