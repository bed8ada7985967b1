"""One writer at a time per artifact: an advisory lock file per (asset, partition).

`flock` locks belong to an open file, so a second run on the same storage root (another
process, or another run in this one) waits, and a crashed or killed holder releases its lock
with its last file descriptor: a stale lock cannot outlive its run. The holder writes who it
is into the lock file, so the waiting side can say what it waits for.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

LOCK_TIMEOUT_ENV = "RECSAE_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 6 * 3600.0
"""Seconds a run waits for another run's lock: longer than any default materialization."""
POLL_SECONDS = 0.2


class LockTimeout(TimeoutError):
    """Another run held the lock for longer than the timeout."""


def lock_timeout() -> float:
    """`$RECSAE_LOCK_TIMEOUT` seconds, else the default."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_LOCK_TIMEOUT
    try:
        return float(raw)
    except ValueError:
        raise ValueError(
            f"{LOCK_TIMEOUT_ENV}={raw!r}: give the seconds a run waits for another run's lock"
        ) from None


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return "another run"
    if not info:
        return "another run"
    return f"run {info.get('run_id', '?')} (pid {info.get('pid', '?')}, since {info.get('since', '?')})"


@contextlib.contextmanager
def exclusive(
    path: Path,
    owner: str,
    on_wait: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> Iterator[None]:
    """Hold the lock file at `path` for the block; if another run holds it, call `on_wait`
    once with what it waits for, then wait up to `timeout` seconds (`lock_timeout()`)."""
    timeout = lock_timeout() if timeout is None else timeout
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if on_wait is not None:
                on_wait(f"waiting for {holder} to release {path} (up to {timeout:.0f} s)")
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(
                            f"{path}: still held by {_holder(path)} after {timeout:.0f} s; "
                            "wait for that run to finish (or stop it), or raise "
                            f"{LOCK_TIMEOUT_ENV}"
                        ) from None
                    time.sleep(POLL_SECONDS)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"run_id": owner, "pid": os.getpid(), "since": stamp}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
