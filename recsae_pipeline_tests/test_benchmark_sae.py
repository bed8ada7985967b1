"""The SAE benchmark scores sparsify's coder with `evaluate_sae` itself, through an adapter to
sparsify's interface (no sparsify needed: a stand-in with its interface wraps our coder)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import Tensor

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


class EncoderOutput(NamedTuple):
    """What sparsify 1.3.3's `SparseCoder.encode` returns."""

    top_acts: Tensor
    top_indices: Tensor
    pre_acts: Tensor


class SparseCoderStandIn(torch.nn.Module):
    """sparsify's SparseCoder interface (num_latents, encode, decode) over `encode`/`decode`."""

    def __init__(self, num_latents: int, encode, decode) -> None:
        super().__init__()
        self.num_latents = num_latents
        self._encode, self._decode = encode, decode

    def encode(self, x: Tensor) -> EncoderOutput:
        values, indices = self._encode(x)
        return EncoderOutput(values, indices, torch.full((len(x), self.num_latents), torch.nan))

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        return self._decode(top_acts, top_indices)


@pytest.fixture
def partition(tmp_path: Path) -> Path:
    # Held-out users' rows differ in mean from batch to batch: per-batch normalising would show
    x = np.random.default_rng(1).normal(size=(3000, 8)) + np.linspace(0, 5, 3000)[:, None]
    return write_partition(tmp_path / "acts", x)


def test_the_adapted_coder_scores_exactly_as_our_own(partition: Path):
    sae = TopKSae(SaeConfig(d_in=8, expansion=16, k=2), seed=3).eval()
    coder = SparseCoderStandIn(128, sae.encode, sae.decode).train()
    adapted = load_runner().SparsifyCoder(coder, d_in=8)

    ours = evaluate_sae(sae, partition, "cpu", batch_size=64)
    assert 0 < ours["dead_fraction"] < 1
    assert evaluate_sae(adapted, partition, "cpu", batch_size=64) == ours
    assert coder.training  # evaluated in eval mode, then put back


def test_fvu_is_one_for_the_heldout_mean_and_dead_fraction_one_without_activity(partition: Path):
    rows = load_activations(partition, 2**20, columns=("activation", "user_idx"))
    mean = rows["activation"][is_heldout(rows["user_idx"], 10)].double().mean(0).float()

    def no_latents(x: Tensor) -> tuple[Tensor, Tensor]:
        zeros = torch.zeros(len(x), 2)
        return zeros, zeros.long()

    coder = SparseCoderStandIn(16, no_latents, lambda values, _: mean.expand(len(values), -1))
    metrics = evaluate_sae(load_runner().SparsifyCoder(coder, d_in=8), partition, "cpu", 10, 64)
    assert metrics["rows"] == 300
    assert metrics["fvu"] == pytest.approx(1.0, rel=1e-6)
    assert metrics["l0"] == 0
    assert metrics["dead_fraction"] == 1.0


def load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sae.py"
    spec = importlib.util.spec_from_file_location("benchmark_sae", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_is_a_short_single_run_written_apart_from_the_results(tmp_path: Path):
    bench = load_benchmark()
    full, quick = bench.parse_args([]), bench.parse_args(["--quick"])
    assert (full.rows, full.repeats, full.out) == (500_000, 3, bench.RESULTS)
    assert (quick.rows, quick.repeats) == (bench.QUICK_ROWS, 1)
    assert quick.out.parent != bench.RESULTS.parent
    chosen = bench.parse_args(["--quick", "--rows", "8192", "--out", str(tmp_path / "q.json")])
    assert (chosen.rows, chosen.out) == (8192, tmp_path / "q.json")
