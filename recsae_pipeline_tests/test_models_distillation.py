"""SLMRec distillation: every term is live and trains the student (the public code's terms were
silently off), the ablation is exactly CE, and the teacher stays frozen."""

import numpy as np
import pytest
import torch

from recsae_pipeline.models.distillation import (
    DistillationLoss,
    DistillConfig,
    aligned_blocks,
    train_student,
)
from recsae_pipeline.models.recommender import Recommender, RecommenderConfig, student_from_teacher
from recsae_pipeline.models.training import NextItemLoss, TrainConfig
from recsae_pipeline_tests.torch_support import CPU

NUM_ITEMS = 20


pytestmark = pytest.mark.usefixtures("one_thread")


def teacher_and_student() -> tuple[Recommender, Recommender]:
    torch.manual_seed(0)
    config = RecommenderConfig.teacher(
        NUM_ITEMS, 16, hidden_size=16, num_layers=4, num_heads=2, max_len=8
    )
    teacher = Recommender(config, item_table=torch.randn(NUM_ITEMS + 1, 16))
    # A fresh residual stream barely moves per layer; perturb to look like a trained teacher.
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return teacher, student_from_teacher(teacher, num_layers=2)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    items = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]])
    targets = torch.tensor([[2, 3, 4, 5, 6], [7, 8, 9, 0, 0]])
    return items, targets


def test_aligned_blocks_map_student_block_b_to_teacher_block_b_times_ratio():
    assert aligned_blocks(2, 8) == [(1, 4), (2, 8)]
    assert aligned_blocks(4, 8) == [(1, 2), (2, 4), (3, 6), (4, 8)]
    with pytest.raises(ValueError, match="not a multiple"):
        aligned_blocks(3, 8)


def test_every_distillation_term_is_nonzero_and_trains_the_student():
    teacher, student = teacher_and_student()
    loss = DistillationLoss(teacher, student, DistillConfig()).train()
    student.eval()
    terms = loss(student, *batch())
    assert len(loss.heads) == 1
    expected = terms.ce + terms.cosine + 0.1 * terms.l2 + 0.1 * terms.supervision
    assert terms.total.item() == pytest.approx(expected.item())
    first_layer = list(student.layers[0].parameters())
    for name in ("cosine", "l2", "supervision"):
        term = getattr(terms, name)
        assert term.item() > 1e-4, name
        grads = torch.autograd.grad(term, first_layer, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    head_grad = torch.autograd.grad(terms.supervision, loss.heads[0].weight, retain_graph=True)[0]
    assert head_grad.abs().sum() > 0
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_without_distillation_the_loss_is_exactly_the_cross_entropy():
    teacher, student = teacher_and_student()
    student.eval()
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    loss = DistillationLoss(teacher, student, DistillConfig(distill=False))
    terms = loss(student, *batch())
    assert torch.equal(terms.total, terms.ce)
    assert torch.equal(terms.ce, NextItemLoss()(student, *batch()).ce)
    assert terms.cosine == terms.l2 == terms.supervision == 0
    assert len(loss.heads) == 0 and not calls


def test_train_student_moves_the_student_and_leaves_the_teacher_untouched():
    teacher, _ = teacher_and_student()
    rng = np.random.default_rng(0)
    sequences = [rng.integers(1, NUM_ITEMS + 1, size=rng.integers(4, 10)) for _ in range(24)]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    config = TrainConfig(max_epochs=2, batch_size=8, patience=5, progress_bar=False)

    students = {}
    for distill in (True, False):
        student = student_from_teacher(teacher, num_layers=2)
        result = train_student(
            student, teacher, sequences, NUM_ITEMS, config, DistillConfig(distill=distill), CPU
        )
        students[distill] = student
        terms = result.history[-1].loss_terms
        assert (terms["cosine"] > 0) == distill and (terms["supervision"] > 0) == distill

    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not teacher.training
    trained, ablated = students[True].state_dict(), students[False].state_dict()
    name = "backbone.layers.0.mlp.up_proj.weight"
    assert not torch.equal(trained[name], before[name])
    assert not torch.equal(trained[name], ablated[name])
