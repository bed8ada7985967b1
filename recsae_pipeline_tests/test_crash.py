"""kill -9 a materialization at chosen points and check what it leaves: every artifact is the
previous version or the new complete one, a version record either matches the disk or is
seen not to (and then means "recompute"), and a plain rerun completes and reports what a run
that never crashed reports.

The materialization runs in a subprocess forked from a `forkserver` that imported this module
once (each case costs the work, not an interpreter start, and no thread of the test process
is forked mid-lock). At the chosen point the child writes a
marker file and blocks; the test waits for the marker, then sends SIGKILL: no sleeps decide
anything."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import recsae_pipeline.defs.assets.activations as activations_module
import recsae_pipeline.defs.assets.sae as sae_module
import recsae_pipeline.defs.staging as staging_module
import recsae_pipeline.storage.atomic as atomic_module
from recsae_pipeline.defs.versioning import FORCE_TAG, content_hash, matches_disk, read_version
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline_tests.support import (
    KEY,
    LOOSE_SAE_BOUNDS,
    SAE,
    TinyStore,
    activations_asset,
    materialize,
)
from recsae_pipeline_tests.torch_support import one_thread

pytestmark = pytest.mark.usefixtures("one_thread")

SAE_CONFIG = {"ops": {"sae": {"config": {**SAE, **LOOSE_SAE_BOUNDS, "rows_seen": 4096}}}}
"""Fewer rows than the tiny store's SAE: new weights, different from the published ones."""
MARKER_TIMEOUT_S = 120
_PROCESSES = multiprocessing.get_context("forkserver")
_PROCESSES.set_forkserver_preload([__name__])


def _block(marker: Path) -> None:
    marker.write_text(str(os.getpid()))
    while True:  # until the test's SIGKILL
        time.sleep(3600)


def _crash_points(point: str, marker: Path) -> None:
    """Patch the child so that it blocks at `point`."""
    if point == "training":
        train = sae_module.train_sae

        def train_until_first_report(*args: Any, **kwargs: Any) -> Any:
            return train(*args, **{**kwargs, "on_progress": lambda *_: _block(marker)})

        sae_module.train_sae = train_until_first_report
    elif point == "evaluation":  # weights saved (staged), metrics.json not yet written
        sae_module.splice_quality = lambda *_a, **_k: _block(marker)
    elif point == "forward":
        write = activations_module.write_activations

        def write_until_first_batch(*args: Any, **kwargs: Any) -> Any:
            return write(*args, **{**kwargs, "on_progress": lambda *_: _block(marker)})

        activations_module.write_activations = write_until_first_batch
    elif point in ("publishing", "published"):
        publish, replace = staging_module.publish_tree, atomic_module.replace_path
        moved = []

        def replace_then_block(new: Path, path: Path) -> None:
            replace(new, path)
            moved.append(path)
            if point == "publishing" and len(moved) == 1:
                _block(marker)  # the directory swapped in, its plot not yet

        def publish_then_block(*args: Any) -> None:
            atomic_module.replace_path = replace_then_block
            publish(*args)
            _block(marker)  # everything swapped in, the version record not yet written

        staging_module.publish_tree = publish_then_block
    else:
        raise ValueError(point)


def _child(point: str, marker: Path, root: Path, asset: str, config: dict) -> None:
    _crash_points(point, marker)
    with one_thread():
        materialize(root, [asset], config, partition_key=KEY, tags={FORCE_TAG: "true"})
    os._exit(0)  # reached only when the point was never hit


def _kill_at(point: str, root: Path, asset: str, config: dict, tmp_path: Path) -> None:
    marker = tmp_path / f"at-{point}"
    child = _PROCESSES.Process(target=_child, args=(point, marker, root, asset, config))
    child.start()
    deadline = time.monotonic() + MARKER_TIMEOUT_S
    while not marker.exists() and child.is_alive() and time.monotonic() < deadline:
        child.join(0.05)
    if not marker.exists():
        child.kill()
        pytest.fail(f"the child never reached {point} (exit code {child.exitcode})")
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _data_version(result: Any) -> str:
    (event,) = result.get_asset_materialization_events()
    return event.materialization.tags["dagster/data_version"]


def _rerun_matches_disk(root: Path, asset: str, folder: Path, config: dict) -> str:
    """A plain rerun completes; its data version is the record's and the disk's."""
    rerun = materialize(root, [asset], config, partition_key=KEY)
    assert rerun.success
    record = read_version(root, asset, KEY)
    assert record is not None and matches_disk(root, record)
    assert _data_version(rerun) == record["data_version"] == content_hash(root, [folder])
    assert not ArtifactPaths(root).staging(asset, KEY).exists()
    return _data_version(rerun)


@pytest.fixture(scope="module")
def sae_reference(tiny_store: TinyStore, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The SAE directory a run with `SAE_CONFIG` that never crashed writes."""
    root = tiny_store.copy_to(tmp_path_factory.mktemp("reference") / "store")
    with one_thread():
        assert materialize(root, ["sae"], SAE_CONFIG, partition_key=KEY).success
    return _files(ArtifactPaths(root).partition("sasrec", 2).sae)


@pytest.mark.parametrize("point", ["training", "evaluation", "publishing", "published"])
def test_a_killed_sae_leaves_the_previous_or_the_new_complete_directory(
    point: str, tiny_store: TinyStore, tmp_path: Path, sae_reference: dict
) -> None:
    root = tiny_store.copy_to(tmp_path / "store")
    paths = ArtifactPaths(root)
    folder = paths.partition("sasrec", 2).sae
    record_file = paths.version_record("sae", KEY)
    before, record_before = _files(folder), record_file.read_bytes()

    _kill_at(point, root, "sae", SAE_CONFIG, tmp_path)

    after = _files(folder)
    assert record_file.read_bytes() == record_before  # written only after the swap
    record = read_version(root, "sae", KEY)
    assert record is not None
    if point in ("training", "evaluation"):
        assert after == before and matches_disk(root, record)
    else:  # the new directory, complete, beside the previous record: seen as stale
        assert after.keys() == before.keys()
        assert after["sae.safetensors"] == sae_reference["sae.safetensors"]
        assert after["config.json"] == sae_reference["config.json"]
        assert not matches_disk(root, record)

    _rerun_matches_disk(root, "sae", folder, SAE_CONFIG)
    rerun = _files(folder)
    # metrics.json holds timings; the weights and config are what the clean run wrote.
    assert rerun.keys() == sae_reference.keys()
    assert rerun["sae.safetensors"] == sae_reference["sae.safetensors"]
    assert rerun["config.json"] == sae_reference["config.json"]


@pytest.mark.parametrize("point", ["forward", "published"])
def test_a_killed_activations_run_reruns_to_the_same_data_version(
    point: str, tiny_store: TinyStore, tmp_path: Path
) -> None:
    root = tiny_store.copy_to(tmp_path / "store")
    asset = activations_asset(KEY)
    folder = ArtifactPaths(root).partition("sasrec", 2).activations
    clean = read_version(root, asset, KEY)  # the tiny store's run never crashed
    assert clean is not None
    before = _files(folder)

    _kill_at(point, root, asset, {}, tmp_path)

    assert _files(folder) == before  # the previous shards, or identical new ones
    version = _rerun_matches_disk(root, asset, folder, {})
    assert version == clean["data_version"]


def test_crash_points_are_reached(tmp_path: Path) -> None:
    # A point that does not exist fails instead of passing silently.
    with pytest.raises(ValueError):
        _crash_points("nowhere", tmp_path / "marker")
