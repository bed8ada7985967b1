"""Model directories: loading reproduces evaluation exactly, and writes are atomic."""

import json
import shutil

import numpy as np
import pytest
import torch

from recsae_pipeline.models.artifacts import load_recommender, read_metrics, save_recommender
from recsae_pipeline.models.recommender import Recommender, RecommenderConfig, student_from_teacher
from recsae_pipeline.models.training import TrainConfig, evaluate, train_recommender
from recsae_pipeline_tests.torch_support import CPU, save_llama_checkpoint

NUM_ITEMS = 20


pytestmark = pytest.mark.usefixtures("one_thread")


def sequences() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(1, NUM_ITEMS + 1, size=rng.integers(3, 12)) for _ in range(30)]


def trained_sasrec() -> Recommender:
    torch.manual_seed(0)
    model = Recommender(RecommenderConfig.sasrec(NUM_ITEMS, hidden_size=16, d_item=16, max_len=8))
    train_recommender(
        model,
        sequences(),
        NUM_ITEMS,
        TrainConfig(max_epochs=2, batch_size=8, progress_bar=False),
        CPU,
    )
    return model


def test_loaded_sasrec_reproduces_its_metrics_exactly(tmp_path):
    model = trained_sasrec()
    metrics = evaluate(model, sequences(), NUM_ITEMS, "test", CPU)
    path = save_recommender(model, tmp_path / "sasrec", metrics)
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "metrics.json",
        "model.safetensors",
    ]

    loaded = load_recommender(path, CPU)
    assert not loaded.training and loaded.config == model.config
    assert evaluate(loaded, sequences(), NUM_ITEMS, "test", CPU) == metrics
    assert read_metrics(path) == metrics


def test_teacher_from_a_checkpoint_and_its_student_load_without_the_checkpoint(tmp_path):
    checkpoint_dir = tmp_path / "llama"
    save_llama_checkpoint(checkpoint_dir, num_layers=4, intermediate_size=24, vocab_size=10)
    sasrec = trained_sasrec()
    config = RecommenderConfig.teacher(
        NUM_ITEMS, 16, hidden_size=16, num_layers=4, max_len=8, pretrained_path=str(checkpoint_dir)
    )
    teacher = Recommender(config, item_table=sasrec.item_vectors).eval()
    student = student_from_teacher(teacher, num_layers=2).eval()
    expected = {
        name: evaluate(model, sequences(), NUM_ITEMS, "valid", CPU)
        for name, model in (("teacher", teacher), ("student", student))
    }
    save_recommender(teacher, tmp_path / "teacher")
    save_recommender(student, tmp_path / "student")
    shutil.rmtree(checkpoint_dir)

    for name in ("teacher", "student"):
        loaded = load_recommender(tmp_path / name, CPU)
        assert evaluate(loaded, sequences(), NUM_ITEMS, "valid", CPU) == expected[name]
    assert (
        json.loads((tmp_path / "teacher" / "config.json").read_text())["backbone"][
            "intermediate_size"
        ]
        == 24
    )


def test_saving_replaces_atomically_and_a_failed_write_keeps_the_old_model(tmp_path):
    first = trained_sasrec()
    save_recommender(first, tmp_path / "model", {"ndcg@10": 0.1})
    second = trained_sasrec()
    with torch.no_grad():
        second.item_emb.weight.mul_(2)
    save_recommender(second, tmp_path / "model", {"ndcg@10": 0.2})
    assert torch.equal(load_recommender(tmp_path / "model", CPU).item_vectors, second.item_vectors)

    with pytest.raises(TypeError):
        save_recommender(first, tmp_path / "model", {"ndcg@10": object()})
    assert read_metrics(tmp_path / "model") == {"ndcg@10": 0.2}
    assert torch.equal(load_recommender(tmp_path / "model", CPU).item_vectors, second.item_vectors)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_loading_a_directory_without_weights_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_recommender"):
        load_recommender(tmp_path, CPU)
