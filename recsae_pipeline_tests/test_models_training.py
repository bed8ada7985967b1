"""SASRec+ training and evaluation: leave-one-out examples, exact evaluation, determinism,
early stopping that keeps the best state, and a model that actually learns."""

import math

import numpy as np
import pytest
import torch

from recsae_pipeline.models.metrics import PopularityScorer
from recsae_pipeline.models.recommender import Recommender, RecommenderConfig
from recsae_pipeline.models.training import (
    NextItemLoss,
    TrainConfig,
    evaluate,
    item_frequencies,
    length_groups,
    split_examples,
    train_examples,
    train_recommender,
)
from recsae_pipeline_tests.torch_support import CPU

NUM_ITEMS = 30


pytestmark = pytest.mark.usefixtures("one_thread")


def cyclic_sequences(users: int = 48) -> list[np.ndarray]:
    """Every user walks the catalogue in order, so the next item is always predictable."""
    rng = np.random.default_rng(0)
    return [
        (rng.integers(NUM_ITEMS) + np.arange(rng.integers(4, 14))) % NUM_ITEMS + 1
        for _ in range(users)
    ]


def tiny_sasrec(seed: int = 0) -> Recommender:
    torch.manual_seed(seed)
    return Recommender(RecommenderConfig.sasrec(NUM_ITEMS, hidden_size=16, d_item=16, max_len=8))


def test_train_examples_are_shifted_windows_of_the_training_part():
    sequences = [np.arange(1, 7), np.array([1, 2, 3]), np.array([5, 6, 7, 8])]
    inputs, targets = train_examples(sequences, max_len=3)
    assert inputs.tolist() == [[1, 2, 3], [5, 0, 0]]
    assert targets.tolist() == [[2, 3, 4], [6, 0, 0]]


def test_long_training_parts_are_cut_into_windows_with_every_target_once():
    inputs, targets = train_examples([np.arange(1, 11)], max_len=3)  # training part 1..8
    assert inputs.tolist() == [[5, 6, 7], [2, 3, 4], [1, 0, 0]]
    assert targets.tolist() == [[6, 7, 8], [3, 4, 5], [2, 0, 0]]
    assert sorted(t for t in targets.flatten().tolist() if t) == list(range(2, 9))


def test_split_examples_cut_inputs_but_keep_full_histories():
    sequences = [np.arange(1, 8)]
    inputs, targets, histories = split_examples(sequences, "valid", max_len=3)
    assert inputs[0].tolist() == [3, 4, 5] and targets.tolist() == [6]
    assert histories[0].tolist() == [1, 2, 3, 4, 5]
    inputs, targets, histories = split_examples(sequences, "test", max_len=3)
    assert inputs[0].tolist() == [4, 5, 6] and targets.tolist() == [7]
    assert histories[0].tolist() == [1, 2, 3, 4, 5, 6]


def test_evaluate_popularity_exact_values():
    # Popularity over training parts: item 1 x3, item 2 x1, the rest 0.
    sequences = [np.array([1, 1, 2, 5, 3]), np.array([1, 4, 2])]
    metrics = evaluate(PopularityScorer(sequences, 5), sequences, 5, "test", CPU)
    # User 1: seen 1, 2, 5 filtered; target 3 ties item 4 -> rank 1. User 2: target 2 -> rank 0.
    assert metrics["hr@10"] == 1.0
    assert metrics["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert metrics["mrr@10"] == pytest.approx(0.75)
    # Sampled: user 1's only unseen item is 4 (a tie, rank 1); user 2 beats 3 and 5 (rank 0).
    assert metrics["sampled_hr@1"] == 0.5
    assert metrics["sampled_mrr"] == pytest.approx(0.75)


def test_evaluate_without_seen_filtering_ranks_against_every_item():
    # RecBole's sequential protocol. User 1: target 3 (count 0) is beaten by 1 (3) and 2 (1)
    # and ties 4 and 5 -> rank 4; user 2: target 2 (count 1) is beaten by 1 only -> rank 1.
    sequences = [np.array([1, 1, 2, 5, 3]), np.array([1, 4, 2])]
    metrics = evaluate(
        PopularityScorer(sequences, 5),
        sequences,
        5,
        "test",
        CPU,
        sampled=False,
        filter_seen_items=False,
    )
    assert metrics["mrr@10"] == pytest.approx((1 / 5 + 1 / 2) / 2)


def test_same_seed_gives_identical_weights_and_metrics():
    sequences = cyclic_sequences()
    config = TrainConfig(max_epochs=2, batch_size=16, progress_bar=False, seed=7)
    runs = []
    for _ in range(2):
        model = tiny_sasrec()
        result = train_recommender(model, sequences, NUM_ITEMS, config, CPU)
        runs.append((model.state_dict(), result))
    (state_a, result_a), (state_b, result_b) = runs
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    assert result_a.best_valid == result_b.best_valid
    assert [r.train_loss for r in result_a.history] == [r.train_loss for r in result_b.history]

    other = tiny_sasrec()
    train_recommender(
        other,
        sequences,
        NUM_ITEMS,
        TrainConfig(max_epochs=2, batch_size=16, progress_bar=False, seed=8),
        CPU,
    )
    assert not torch.equal(other.item_vectors, state_a["item_emb.weight"])


def test_early_stopping_keeps_the_best_state_and_reports_every_epoch():
    sequences = cyclic_sequences()
    reports = []
    model = tiny_sasrec()
    config = TrainConfig(max_epochs=30, batch_size=16, patience=2, lr=3e-2, progress_bar=False)
    result = train_recommender(model, sequences, NUM_ITEMS, config, CPU, on_epoch=reports.append)

    assert [r.epoch for r in reports] == list(range(1, result.epochs_run + 1))
    ndcgs = [r.valid["ndcg@10"] for r in reports]
    assert result.best_epoch == int(np.argmax(ndcgs)) + 1
    assert result.epochs_run == min(config.max_epochs, result.best_epoch + config.patience)
    assert all(r.seconds > 0 and r.eta_seconds >= 0 for r in reports)
    assert reports[-1].loss_terms.keys() == {"ce"}
    assert result.train_seconds >= sum(r.seconds for r in reports)
    assert evaluate(model, sequences, NUM_ITEMS, "valid", CPU, sampled=False) == result.best_valid


def test_sasrec_and_teacher_learn_a_predictable_sequence():
    sequences = cyclic_sequences()
    popularity = evaluate(PopularityScorer(sequences, NUM_ITEMS), sequences, NUM_ITEMS, "test", CPU)
    sasrec = tiny_sasrec()
    config = TrainConfig(max_epochs=25, batch_size=16, patience=25, lr=1e-2, progress_bar=False)
    train_recommender(sasrec, sequences, NUM_ITEMS, config, CPU)
    metrics = evaluate(sasrec, sequences, NUM_ITEMS, "test", CPU)
    assert metrics["mrr@10"] > 0.9 > popularity["mrr@10"]

    torch.manual_seed(0)
    table = sasrec.item_vectors.detach().clone()
    teacher = Recommender(
        RecommenderConfig.teacher(
            NUM_ITEMS, 16, hidden_size=16, num_layers=2, num_heads=2, max_len=8
        ),
        item_table=table,
    )
    train_recommender(teacher, sequences, NUM_ITEMS, config, CPU)
    assert torch.equal(teacher.item_vectors, table)
    assert evaluate(teacher, sequences, NUM_ITEMS, "test", CPU)["mrr@10"] > 0.9


def test_sampled_softmax_learns_the_sequence_and_masks_a_drawn_target():
    """With 8 sampled negatives of 30 items SASRec still learns the cyclic walk; a negative
    drawn equal to the target does not count against it (one item: every draw is the target,
    so the loss is 0 exactly); a model with its own loss refuses the knob."""
    sequences = cyclic_sequences()
    sasrec = tiny_sasrec()
    config = TrainConfig(
        max_epochs=25, batch_size=16, patience=25, lr=1e-2, negatives=8, progress_bar=False
    )
    train_recommender(sasrec, sequences, NUM_ITEMS, config, CPU)
    assert evaluate(sasrec, sequences, NUM_ITEMS, "test", CPU)["mrr@10"] > 0.9

    torch.manual_seed(0)
    one = Recommender(RecommenderConfig.sasrec(1, hidden_size=8, d_item=8, max_len=4))
    items = torch.tensor([[1, 1, 1, 0]])
    loss = NextItemLoss(negatives=5)(one, items, torch.tensor([[1, 1, 1, 0]]))
    assert loss.total.item() == 0.0
    with pytest.raises(ValueError, match="negatives=8 samples the default next-item loss"):
        train_recommender(tiny_sasrec(), sequences, NUM_ITEMS, config, CPU, loss_fn=NextItemLoss())


def test_negatives_are_drawn_by_training_frequency_never_padding():
    sequences = [np.array([1, 1, 1, 2, 3, 4]), np.array([1, 2, 5, 6])]  # training: 1,1,1,2 | 1,2
    counts = item_frequencies(sequences, num_items=6)
    assert counts.tolist() == [0, 4, 2, 0, 0, 0, 0]
    loss = NextItemLoss(negatives=4000, item_counts=counts)
    drawn = torch.multinomial(loss.proposal, 4000, replacement=True, generator=loss.generator)
    share = torch.bincount(drawn, minlength=7).double() / 4000
    assert share[0] == 0  # padding is never a negative
    assert abs(share[1] - 5 / 12) < 0.03 and abs(share[6] - 1 / 12) < 0.02  # (count + 1) / 12


def test_length_groups_split_a_batch_longest_first_without_losing_a_window():
    lengths = torch.tensor([3, 9, 1, 7, 7, 2, 5])
    groups = length_groups(lengths, 3)
    assert sorted(torch.cat(groups).tolist()) == list(range(7))
    widths = [int(lengths[g].max()) for g in groups]
    assert widths == sorted(widths, reverse=True) and widths[0] == 9
    assert max(len(g) for g in groups) - min(len(g) for g in groups) <= 1
    assert len(length_groups(lengths[:2], 3)) == 2  # never an empty sub-batch


@pytest.mark.parametrize("kind", ["sasrec", "teacher"])
def test_sub_batches_by_length_train_the_same_model_as_one_padded_pass(kind):
    """Same batches, same loss (weighted by positions), gradients summed before the step: the
    weights after two epochs agree with one padded pass up to float rounding."""
    sequences = cyclic_sequences()
    states = []
    for groups in (1, 3):
        torch.manual_seed(0)
        if kind == "sasrec":
            model = Recommender(
                RecommenderConfig.sasrec(NUM_ITEMS, hidden_size=16, max_len=8, dropout=0.0)
            )
        else:
            table = torch.randn(NUM_ITEMS + 1, 16)
            model = Recommender(
                RecommenderConfig.teacher(
                    NUM_ITEMS, d_item=16, hidden_size=16, num_layers=2, max_len=8, dropout=0.0
                ),
                item_table=table,
            )
        config = TrainConfig(
            max_epochs=2, patience=2, batch_size=16, progress_bar=False, length_groups=groups
        )
        result = train_recommender(model, sequences, NUM_ITEMS, config, CPU)
        states.append((model.state_dict(), [r.train_loss for r in result.history]))
    (one, loss_one), (three, loss_three) = states
    for name in one:
        torch.testing.assert_close(three[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    assert loss_three == pytest.approx(loss_one, rel=1e-5)


def test_evaluation_batched_by_length_gives_each_user_their_own_rank():
    """Users are batched shortest first; every rank must come back to its own user: the same
    metrics as scoring one user at a time."""
    sequences = cyclic_sequences(40)
    model = tiny_sasrec().eval()
    batched = evaluate(model, sequences, NUM_ITEMS, "test", CPU, batch_size=7)
    single = evaluate(model, sequences, NUM_ITEMS, "test", CPU, batch_size=1)
    assert batched == pytest.approx(single, abs=1e-12)
