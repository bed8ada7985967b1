"""One writer at a time per (asset, partition): a second writer waits, saying for whom, or
fails clearly after the timeout; a killed holder releases its lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from recsae_pipeline.storage.locks import LOCK_TIMEOUT_ENV, LockTimeout, exclusive, lock_timeout
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline_tests.support import DATA_CONFIG, materialize


def test_a_second_writer_waits_for_the_first_and_is_told_whom_it_waits_for(tmp_path: Path):
    path = tmp_path / ".locks" / "sae" / "sasrec.layer2.lock"
    order: list[str] = []
    waiting = threading.Event()
    messages: list[str] = []

    def second() -> None:
        def on_wait(message: str) -> None:
            messages.append(message)
            waiting.set()

        with exclusive(path, "run-b", on_wait=on_wait, timeout=60):
            order.append("b")

    with exclusive(path, "run-a"):
        thread = threading.Thread(target=second)
        thread.start()
        assert waiting.wait(30), "the second writer never reported that it waits"
        order.append("a")
    thread.join(30)
    assert order == ["a", "b"]
    assert "waiting for run run-a (pid" in messages[0] and str(path) in messages[0]


def test_a_writer_gives_up_after_the_timeout_naming_the_holder(tmp_path: Path):
    path = tmp_path / "x.lock"
    with exclusive(path, "run-a"), pytest.raises(LockTimeout) as err:  # noqa: SIM117
        with exclusive(path, "run-b", timeout=0.3):
            pytest.fail("acquired a held lock")
    assert "still held by run run-a" in str(err.value) and LOCK_TIMEOUT_ENV in str(err.value)


def test_a_killed_holder_releases_its_lock(tmp_path: Path):
    path = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path;"
         "from recsae_pipeline.storage.locks import exclusive;"
         f"cm = exclusive(Path({str(path)!r}), 'run-killed'); cm.__enter__();"
         "print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout, match="run-killed"), exclusive(path, "b", timeout=0.2):
            pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
        with exclusive(path, "run-after", timeout=10):
            pass
    finally:
        holder.kill()


def test_an_asset_whose_partition_is_locked_fails_clearly_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    paths = ArtifactPaths(tmp_path)
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "0.3")
    with exclusive(paths.write_lock("raw_interactions", None), "the-other-run"):
        result = materialize(tmp_path, ["raw_interactions"], DATA_CONFIG)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "still held by run the-other-run" in failure.event_specific_data.error.message
    assert not paths.raw_interactions.exists()


def test_the_lock_timeout_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "12.5")
    assert lock_timeout() == 12.5
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="give the seconds"):
        lock_timeout()
