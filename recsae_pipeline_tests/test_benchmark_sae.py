"""The SAE benchmark scores sparsify's coder with `evaluate_sae`'s definitions (no sparsify
needed: the runner imports it only to train)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from recsae_pipeline.activations.shards import load_activations
from recsae_pipeline.sae.model import SaeConfig, TopKSae
from recsae_pipeline.sae.training import evaluate_sae, is_heldout
from recsae_pipeline_tests.test_sae import write_partition

RUNNER = Path(__file__).resolve().parents[1] / "benchmarks" / "sparsify" / "run_sparsify.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def load_runner():
    spec = importlib.util.spec_from_file_location("run_sparsify", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def partition(tmp_path: Path) -> Path:
    # Held-out users' rows differ in mean from batch to batch: per-batch normalising would show
    x = np.random.default_rng(1).normal(size=(3000, 8)) + np.linspace(0, 5, 3000)[:, None]
    return write_partition(tmp_path / "acts", x)


def test_heldout_metrics_match_evaluate_sae(partition: Path):
    sae = TopKSae(SaeConfig(d_in=8, expansion=16, k=2), seed=3).eval()

    def reconstruct(x):
        values, indices = sae.encode(x)
        return sae.decode(values, indices), values, indices

    ours = evaluate_sae(sae, partition, "cpu", batch_size=64)
    runner = load_runner().heldout_metrics(reconstruct, partition, 128, "cpu", batch_size=64)
    assert 0 < ours["dead_fraction"] < 1
    assert runner == pytest.approx(ours, rel=1e-9)


def test_fvu_is_one_for_the_heldout_mean_and_dead_fraction_one_without_activity(partition: Path):
    rows = load_activations(partition, 2**20, columns=("activation", "user_idx"))
    mean = rows["activation"][is_heldout(rows["user_idx"], 10)].double().mean(0).float()

    def predict_mean(x):
        zeros = torch.zeros(len(x), 2)
        return mean.expand_as(x), zeros, zeros.long()

    metrics = load_runner().heldout_metrics(predict_mean, partition, 16, "cpu", batch_size=64)
    assert metrics["rows"] == 300
    assert metrics["fvu"] == pytest.approx(1.0, rel=1e-6)
    assert metrics["l0"] == 0
    assert metrics["dead_fraction"] == 1.0
