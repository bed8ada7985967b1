"""Shared fixtures: a storage root per test and writers of tiny input files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recsae_pipeline.storage.registry import ArtifactPaths


@pytest.fixture
def paths(tmp_path: Path) -> ArtifactPaths:
    return ArtifactPaths(tmp_path / "store")


def write_text(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and leave the other core to the rest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
