"""benchmarks/train_schedule.py's replay of early stopping: the epoch the training loop would
stop at and the best epoch it would keep, for each patience, on one recorded curve."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from recsae_pipeline.models.recommender import Recommender, RecommenderConfig
from recsae_pipeline.models.training import TrainConfig, train_recommender

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_schedule.py"


def load_schedule():
    spec = importlib.util.spec_from_file_location("train_schedule_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_replay_stops_where_the_training_loop_stops() -> None:
    """A plateau then a rise: short patience stops on the plateau, longer patience reaches the
    peak, and each replay equals what `train_recommender` itself does at that patience."""
    replay = load_schedule().replay
    rng = np.random.default_rng(0)
    sequences = [(rng.integers(12) + np.arange(rng.integers(4, 12))) % 12 + 1 for _ in range(40)]
    curves = {}
    for patience in (1, 3, 12):
        torch.manual_seed(0)
        model = Recommender(RecommenderConfig.sasrec(12, hidden_size=8, d_item=8, max_len=6))
        config = TrainConfig(max_epochs=12, batch_size=8, patience=patience, progress_bar=False)
        result = train_recommender(model, sequences, 12, config, torch.device("cpu"))
        curves[patience] = (result.epochs_run, result.best_epoch, result.history)
    full = [{"epoch": r.epoch, "valid_ndcg@10": r.valid["ndcg@10"]} for r in curves[12][2]]
    for patience in (1, 3):
        assert replay(full, patience) == curves[patience][:2]
