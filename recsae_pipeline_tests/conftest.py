"""Shared fixtures: a storage root per test, writers of tiny input files, and the tiny store
every pipeline test reads (built once per session, see `support`)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline_tests.torch_support import one_thread

if TYPE_CHECKING:
    from recsae_pipeline_tests.support import TinyStore


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the browser tests' deployment now, in the background, when they are to run: its
    materialize run then overlaps the in-process tests instead of delaying the UI tests."""
    if not any(item.path.name == "test_ui.py" for item in session.items):
        return
    from recsae_pipeline_tests.ui_support import BACKGROUND, BackgroundDeployment, missing_browser

    if missing_browser() is None:
        background = BackgroundDeployment(Path(tempfile.mkdtemp(prefix="recsae-ui-")))
        session.config.stash[BACKGROUND] = background
        background.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    from recsae_pipeline_tests.ui_support import BACKGROUND

    background = session.config.stash.get(BACKGROUND, None)
    if background is not None:
        background.stop()


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


@pytest.fixture(name="one_thread")
def one_thread_fixture() -> Iterator[None]:
    """Tiny models run fastest on one thread, and leave the other core to the rest."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyStore]:
    """Every asset of the graph on a tiny synthetic log; read it, or change a `copy_to` of it
    (the session fails when a test changed the shared one)."""
    from recsae_pipeline_tests import support  # Dagster and the definitions: only when needed

    store = support.build_tiny_store(tmp_path_factory.mktemp("tiny_store"))
    verify = support.guard_unchanged(store)
    yield store
    verify()
