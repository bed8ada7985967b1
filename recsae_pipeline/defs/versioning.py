"""Data versions from content hashes, and no recomputation when nothing it depends on changed.

Every asset wrapped in `content_versioned` records a version file beside the artifacts,
`<root>/.versions/<asset>/<partition or _>.json`, holding:
- the content hash of its artifacts, reported to Dagster as the materialization's data
  version (so the UI's staleness follows content, not run times);
- its provenance: code version, config, resource settings (never the storage root or a
  secret) and the data versions of every ancestor asset;
- the metadata and check results of that materialization.

Each materialization is written into a staging tree and published only when its blocking
checks pass (`defs.staging`); the record is written after the swap. A record whose hash
does not match what is on disk (a publish cut short) is never trusted: the asset recomputes,
and its descendants see no recorded version for it.

A later materialization with the same provenance, whose artifacts still hash the same,
returns the recorded metadata and check results at once (tagged `recsae/skipped`) instead of
recomputing. Because versions are content hashes, a retrain that reproduces the same bytes
leaves every descendant skipped too. The run tag `recsae/force=true` (`recsae materialize
--force`) recomputes anyway.
"""

import functools
import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.definitions.metadata import normalize_metadata

from recsae_pipeline.defs.staging import Stage, discard_leftovers, latest_rejection, refusal
from recsae_pipeline.storage.atomic import write_json
from recsae_pipeline.storage.locks import LockTimeout, exclusive
from recsae_pipeline.storage.registry import ArtifactPaths

FORCE_TAG = "recsae/force"
SKIPPED_TAG = "recsae/skipped"

Outputs = Callable[[ArtifactPaths, str | None], Iterable[Path]]
"""(paths, partition key) -> the files or directories an asset writes."""


def version_file(root: Path, asset: str, partition: str | None) -> Path:
    return ArtifactPaths(root).version_record(asset, partition)


def read_version(root: Path, asset: str, partition: str | None) -> dict[str, Any] | None:
    """The recorded version of `asset` (of its `partition`), or None."""
    path = version_file(root, asset, partition)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # a missing or damaged record only costs a recomputation


def _files(outputs: Iterable[Path]) -> Iterator[Path]:
    """Every artifact file under `outputs`, in a stable order; temp and hidden files skipped."""
    for out in sorted(outputs):
        if out.is_file():
            yield out
        elif out.is_dir():
            for dirpath, dirnames, filenames in os.walk(out):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if not name.startswith("."):
                        yield Path(dirpath) / name


def file_stats(root: Path, outputs: Iterable[Path]) -> dict[str, list[int]]:
    """relative path -> [size, mtime_ns]: a cheap fingerprint checked before rehashing."""
    stats = {}
    for path in _files(outputs):
        st = path.stat()
        stats[path.relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns]
    return stats


def content_hash(root: Path, outputs: Iterable[Path], chunk: int = 1 << 20) -> str:
    """sha256 over every file's relative path, size and bytes (streamed, any size)."""
    digest = hashlib.sha256()
    for path in _files(outputs):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(str(path.stat().st_size).encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def _settings(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return {"type": type(value).__name__, **value.model_dump(mode="json")}
    return type(value).__name__


def _ancestors(context: dg.AssetExecutionContext) -> dict[str, str | None]:
    """asset -> partition to read, for every ancestor of this partition: parents through
    their partition mappings, so a partition whose mapping reaches no partition of a parent
    (another model's activations) does not depend on that parent or its ancestors."""
    key = context.asset_key
    partition = context.partition_key if context.has_partition_key else None
    try:
        graph = context.repository_def.asset_graph
    except Exception:
        try:  # `dg.materialize` has no repository; its job's graph holds every asset passed
            graph = context.job_def.asset_layer.asset_graph
        except Exception:  # no job (direct invocation): the declared deps only
            keys = context.assets_def.asset_deps[key]
            return {k.to_user_string(): partition for k in keys}
    found: dict[str, str | None] = {}
    frontier = [(key, partition)]
    while frontier:
        child, child_partition = frontier.pop()
        parents = graph.get_parents_partitions(child, child_partition).parent_partitions
        for parent in parents:
            name = parent.asset_key.to_user_string()
            if parent.asset_key != key and name not in found:
                found[name] = parent.partition_key
                frontier.append((parent.asset_key, parent.partition_key))
    return found


def provenance(
    context: dg.AssetExecutionContext, root: Path, kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """What the asset's content depends on, or None when an ancestor has no recorded version
    (then nothing can be skipped)."""
    upstream = {}
    for asset, partition in sorted(_ancestors(context).items()):
        record = read_version(root, asset, partition)
        if record is None and partition is not None:
            record = read_version(root, asset, None)
        if record is None or not matches_disk(root, record):
            return None  # unknown, or not what is on disk (an interrupted publish): recompute
        upstream[asset] = record["data_version"]
    return {
        "code_version": context.assets_def.code_versions_by_key.get(context.asset_key),
        "partition": context.partition_key if context.has_partition_key else None,
        "settings": {k: _settings(v) for k, v in sorted(kwargs.items()) if k != "storage"},
        "upstream": upstream,
    }


def _refuse_blocked_upstream(context: dg.AssetExecutionContext, root: Path) -> None:
    """Dagster stops a blocking check's downstream steps only within one run; across runs (the
    per-model activations run before `features`) the ancestors' version records say whether
    their latest materialization failed a blocking check, and then this one must not run."""
    paths = ArtifactPaths(root)
    for asset, partition in sorted(_ancestors(context).items()):
        record = read_version(root, asset, partition) or read_version(root, asset, None) or {}
        refused = latest_rejection(paths, asset, partition) or latest_rejection(paths, asset, None)
        latest = refused or record
        for check in latest.get("checks", []):
            if check.get("blocking") and not check["passed"]:
                where = f"{asset}[{partition}]" if partition else asset
                kept = f" (refused files kept in {refused['kept']})" if refused else ""
                raise dg.Failure(
                    f"{context.asset_key.to_user_string()}: upstream {where} failed its blocking "
                    f"check `{check['check_name']}` in run {latest.get('run_id')}: "
                    f"{check['description']}{kept}. Fix the cause and rematerialize {asset} first."
                )


def _provenance_hash(record: dict[str, Any] | None) -> str | None:
    if record is None:
        return None
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def matches_disk(root: Path, record: dict[str, Any], outputs: list[Path] | None = None) -> bool:
    """Do the artifacts on disk hold what `record` describes (its `outputs`, or the given
    ones)? Stats first, bytes if they moved; a record that names no hash never matches."""
    if outputs is None:
        named = record.get("outputs")
        if not isinstance(named, list):
            return False  # a record from before `outputs` was recorded: recompute
        outputs = [root / p for p in named]
    if not record.get("data_version") or not isinstance(record.get("files"), dict):
        return False
    if not all(p.exists() for p in outputs):
        return False
    if file_stats(root, outputs) == record["files"]:
        return True
    return content_hash(root, outputs) == record["data_version"]


def _serialize_metadata(metadata: Any) -> str:
    # Dagster's own JSON serde (never pickle) for its metadata value types.
    return dg.serialize_value(normalize_metadata(dict(metadata or {})))


def _serialize_check(result: dg.AssetCheckResult, blocking: set[str]) -> dict[str, Any]:
    return {
        "check_name": result.check_name,
        "passed": result.passed,
        "blocking": result.check_name in blocking,
        "severity": result.severity.value,
        "description": result.description,
        "metadata": _serialize_metadata(result.metadata),
    }


def _replayed(record: dict[str, Any], key: dg.AssetKey) -> dg.MaterializeResult:
    run = record.get("run_id", "?")
    note = f"unchanged inputs, config and code: artifacts of run {run} reused"
    checks = [
        dg.AssetCheckResult(
            asset_key=key,
            check_name=c["check_name"],
            passed=c["passed"],
            severity=dg.AssetCheckSeverity(c["severity"]),
            description=c["description"],
            metadata={**dg.deserialize_value(c["metadata"], dict), "reused_from_run": run},
        )
        for c in record.get("checks", [])
    ]
    metadata = dg.deserialize_value(record["metadata"], dict)
    return dg.MaterializeResult(
        metadata={**metadata, "skipped": note},
        check_results=checks,
        data_version=dg.DataVersion(record["data_version"]),
        tags={SKIPPED_TAG: "true"},
    )


def _unstaged_check(stage: Stage, check: dg.AssetCheckResult) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=check.asset_key,
        check_name=check.check_name,
        passed=check.passed,
        severity=check.severity,
        description=check.description and stage.unstaged(check.description),
        metadata=stage.unstaged(normalize_metadata(dict(check.metadata or {}))),
    )


def content_versioned(
    outputs: Outputs, skip: bool = True, stage: bool = True
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate an asset's compute function (under `@dg.asset`) so that it is written into a
    staging tree, published only when its blocking checks pass (`defs.staging`), and its data
    version is the content hash of `outputs`; a materialization whose provenance and
    artifacts are unchanged is skipped (`skip=False` for a root asset, whose real input is
    outside the graph). `stage=False` writes in place (an asset whose files name their own
    final paths). The function must take a `storage: StorageRoot` resource and return a
    `dg.MaterializeResult` whose `check_results` hold its blocking checks."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if "storage" not in inspect.signature(fn).parameters:
            raise TypeError(f"{fn.__name__}: content_versioned needs a `storage` resource")

        @functools.wraps(fn)
        def wrapper(context: dg.AssetExecutionContext, **kwargs: Any) -> Iterator[Any]:
            asset = context.asset_key.to_user_string()
            partition = context.partition_key if context.has_partition_key else None
            lock = kwargs["storage"].paths.write_lock(asset, partition)
            try:
                with exclusive(lock, context.run_id, on_wait=context.log.info):
                    yield from versioned(context, asset, partition, **kwargs)
            except LockTimeout as err:
                raise dg.Failure(str(err)) from None

        def versioned(
            context: dg.AssetExecutionContext, asset: str, partition: str | None, **kwargs: Any
        ) -> Iterator[Any]:
            storage = kwargs["storage"]
            root = storage.paths.root
            discard_leftovers(storage.paths, asset, partition)  # under the lock: none is live
            out = list(outputs(storage.paths, partition))
            current = _provenance_hash(provenance(context, root, kwargs))
            previous = read_version(root, asset, partition)
            force = context.run_tags.get(FORCE_TAG, "").lower() in ("1", "true", "yes")
            if (
                skip
                and not force
                and current is not None
                and previous is not None
                and previous.get("provenance") == current
                and matches_disk(root, previous, out)
            ):
                context.log.info(
                    f"{asset}: inputs, config and code unchanged since run "
                    f"{previous.get('run_id')}; reusing its artifacts (tag {FORCE_TAG}=true "
                    "recomputes)"
                )
                yield _replayed(previous, context.asset_key)
                return

            _refuse_blocked_upstream(context, root)
            staged = Stage(storage, asset, partition, out) if stage else None
            result = fn(context, **{**kwargs, "storage": staged.storage if staged else storage})
            if not isinstance(result, dg.MaterializeResult):
                raise TypeError(f"{asset}: content_versioned needs a MaterializeResult")
            blocking = {s.name for s in context.assets_def.check_specs if s.blocking}
            checks = list(result.check_results or [])
            metadata = normalize_metadata(dict(result.metadata or {}))
            if staged:
                checks = [_unstaged_check(staged, c) for c in checks]
                metadata = staged.unstaged(metadata)
            failed = [c for c in checks if c.check_name in blocking and not c.passed]
            if failed and staged:
                serialized = [_serialize_check(c, blocking) for c in checks]
                kept = staged.reject(context.run_id, serialized)
                yield from checks  # reported on the asset, then the run fails
                raise dg.Failure(description=refusal(staged, failed, kept))
            started = time.perf_counter()
            hashed = (staged.tree, staged.staged_outputs) if staged else (root, out)
            version = content_hash(*hashed)
            files = file_stats(*hashed)
            if staged:
                staged.publish()
            record = {
                "asset": asset,
                "partition": partition,
                "data_version": version,
                "provenance": current,
                "outputs": [p.relative_to(root).as_posix() for p in out],
                "files": files,
                "run_id": context.run_id,
                "metadata": _serialize_metadata(metadata),
                "checks": [_serialize_check(c, blocking) for c in checks],
            }
            write_json(record, version_file(root, asset, partition))  # after the swap
            context.log.debug(
                f"{asset}: content hash {version[:12]} in {time.perf_counter() - started:.1f}s"
            )
            yield dg.MaterializeResult(
                asset_key=result.asset_key,
                metadata=metadata,
                check_results=checks,
                data_version=dg.DataVersion(version),
                tags=result.tags,
            )

        return wrapper

    return decorate
