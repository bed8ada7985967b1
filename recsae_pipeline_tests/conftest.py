"""Shared fixtures: a storage root per test, writers of tiny input files, and the tiny store
every pipeline test reads (built once per session, see `support`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from recsae_pipeline.storage.registry import ArtifactPaths

if TYPE_CHECKING:
    from recsae_pipeline_tests.support import TinyStore


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


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyStore]:
    """Every asset of the graph on a tiny synthetic log; read it, or change a `copy_to` of it
    (the session fails when a test changed the shared one)."""
    from recsae_pipeline_tests import support  # Dagster and the definitions: only when needed

    store = support.build_tiny_store(tmp_path_factory.mktemp("tiny_store"))
    verify = support.guard_unchanged(store)
    yield store
    verify()
