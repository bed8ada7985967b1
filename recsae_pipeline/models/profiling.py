"""Inference cost of a scorer: latency per 1,000 users and peak memory above the baseline."""

from __future__ import annotations

import os
import threading
import time
from typing import NamedTuple

import numpy as np
import torch

from recsae_pipeline.data.batching import pad_right, split_examples
from recsae_pipeline.models.training import NextItemScorer

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class InferenceProfile(NamedTuple):
    ms_per_1000_users: float
    """Wall time to score every item for 1,000 users (next item after their full history)."""
    peak_memory_mb: float
    """Peak memory above the pre-inference level: CUDA allocator peak, else sampled RSS."""
    users: int
    """How many users were timed."""


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


class _PeakRss:
    """Samples resident memory every millisecond on a background thread (Linux /proc)."""

    def __enter__(self) -> _PeakRss:
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


@torch.no_grad()
def profile_inference(
    scorer: NextItemScorer,
    sequences: list[np.ndarray],
    device: torch.device,
    max_len: int,
    batch_size: int = 256,
    users: int = 1000,
    repeats: int = 3,
) -> InferenceProfile:
    """Best-of-`repeats` time to score `users` users in batches, after one warm-up batch."""
    inputs, _, _ = split_examples(sequences[:users], "test", max_len)
    batches = [
        pad_right(inputs[i : i + batch_size]).to(device) for i in range(0, len(inputs), batch_size)
    ]
    if isinstance(scorer, torch.nn.Module):
        scorer.eval()
    scorer.predict(batches[0])
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    best = float("inf")
    with _PeakRss() as rss:
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in batches:
                scorer.predict(batch)
            if on_cuda:
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if on_cuda else rss.peak - rss.base
    return InferenceProfile(best / len(inputs) * 1000 * 1000, peak / 2**20, len(inputs))
