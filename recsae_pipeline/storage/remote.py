"""A remote storage root (any fsspec URL) mirrored into a local cache directory.

Every reader and writer works on local paths, so a remote root is used through a local
working copy: `Mirror.pull` fetches what changed remotely before a run, `Mirror.push` uploads
what changed locally after it. A manifest in the cache records, per file, the local stat and
the remote signature seen at the last sync, so both directions move only changed files.

Directory artifacts (models, SAEs, activation partitions) are replaced locally by renaming a
new directory into place (`store.atomic_path`); a push notices the directory's new inode and
removes remote files under it that the new directory no longer has. Other local deletions
are not propagated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsae_pipeline.storage.atomic import atomic_path, write_json
from recsae_pipeline.storage.registry import DUCKDB_FILE, LOCKS_DIR, STAGING_DIR

try:
    import fcntl
except ImportError:  # not POSIX: syncs of one cache are not locked across processes
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

CACHE_DIR_ENV = "RECSAE_CACHE_DIR"
MANIFEST = ".recsae-mirror.json"
LOCK = ".recsae-mirror.lock"
# The DuckDB catalog names local paths of the cache, so it is rebuilt per cache, never shared.
LOCAL_ONLY = frozenset({DUCKDB_FILE, f"{DUCKDB_FILE}.wal", MANIFEST, LOCK})
LOCAL_PROTOCOLS = ("file", "local")
PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
}
# What `fs.info` says about a file's content, strongest first: a checksum where the store
# keeps one (S3/Azure ETag, GCS md5/crc32c), else a modification time.
CHECKSUM_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "content_md5")
TIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "created")

log = logging.getLogger(__name__)


def local_root(path: str) -> Path | None:
    """The directory a plain path or `file://` URL names; None for any other fsspec URL."""
    if "://" not in path:
        return Path(path)
    protocol, rest = path.split("://", 1)
    if protocol not in LOCAL_PROTOCOLS:
        return None
    return Path(rest.removeprefix("localhost"))


def default_cache_dir(url: str) -> Path:
    """`$RECSAE_CACHE_DIR/<hash of url>`, else `~/.cache/recsae/<hash of url>`."""
    base = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "recsae"
    return Path(base).expanduser() / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def open_filesystem(url: str, setting: str = "storage.path") -> tuple[AbstractFileSystem, str]:
    """(filesystem, root path within it) for `url`, or a ValueError that says how to fix it."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as err:
        protocol = url.split("://", 1)[0]
        package = PACKAGES.get(protocol)
        fix = (
            f"`pip install {package}`"
            if package
            else "use a local path or an fsspec URL (s3://bucket/prefix, gs://bucket/prefix, "
            "az://container/prefix, memory://name) and install its filesystem package "
            "(s3fs, gcsfs, adlfs)"
        )
        raise ValueError(f"{setting}={url!r}: fsspec cannot open it ({err}); {fix}.") from err
    return fs, root.rstrip("/")


def is_synced(rel: str) -> bool:
    """Whether a path relative to the root is mirrored: never temp files (`.*.tmp*`), scratch
    directories (`.scratch-*`), the per-artifact write locks (`.locks/`, local to this
    machine), materializations being staged (`.staging/`), the DuckDB catalog and its WAL, or
    the mirror's own files."""
    if rel in LOCAL_ONLY or rel.split("/")[0] in (LOCKS_DIR, STAGING_DIR):
        return False
    return not any(
        part.startswith(".scratch-") or (part.startswith(".") and ".tmp" in part)
        for part in rel.split("/")
    )


def remote_signature(info: dict[str, Any]) -> list[str]:
    """Size plus the strongest content marker `fs.info` offers (see CHECKSUM_KEYS)."""
    signature = [str(info.get("size"))]
    for keys in (CHECKSUM_KEYS, TIME_KEYS):
        found = next((k for k in keys if info.get(k) is not None), None)
        if found:
            return [*signature, f"{found}={info[found]}"]
    return signature


def local_signature(st: os.stat_result) -> list[int]:
    # A rename into place (every write here) gives a new inode, so this catches any rewrite.
    return [st.st_size, st.st_mtime_ns, st.st_ino]


@dataclass
class SyncReport:
    """What one pull or push moved."""

    files: int = 0
    """Files downloaded or uploaded."""
    bytes: int = 0
    removed: int = 0
    """Stale files deleted (locally on pull, remotely on push)."""
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.files or self.removed)

    def __str__(self) -> str:
        return (
            f"{self.files} file(s), {self.bytes / 1e6:.1f} MB, {self.removed} removed, "
            f"{self.seconds:.1f} s"
        )


class Mirror:
    """A remote root (`url`) and its local working copy (`cache`)."""

    def __init__(self, url: str, cache: str | Path, setting: str = "storage.path") -> None:
        self.url = url.rstrip("/")
        self.cache = Path(cache).expanduser().resolve()
        self.fs, self.root = open_filesystem(self.url, setting)

    def pull(self, prefixes: Iterable[str] | None = None) -> SyncReport:
        """Download remote files (under `prefixes`, relative to the root; default: all) that
        are missing locally or changed remotely since the last sync, and drop local copies of
        files deleted remotely. Local changes not yet pushed are kept unless the remote
        changed too (then the remote wins: it is the newer complete artifact)."""
        started, report = time.perf_counter(), SyncReport()
        scopes = [""] if prefixes is None else [p.strip("/") for p in prefixes]
        with self._locked():
            manifest = self._read_manifest()
            files: dict[str, dict[str, list]] = manifest["files"]
            try:
                remote: dict[str, dict[str, Any]] = {}
                for scope in scopes:
                    remote.update(self._list_remote(scope))
                for rel, info in sorted(remote.items()):
                    signature = remote_signature(info)
                    entry = files.get(rel)
                    if entry and entry["remote"] == signature:
                        continue  # unchanged remotely: the local copy (or its absence) stands
                    local = self.cache / rel
                    if local.exists() and (
                        entry is None or entry["local"] != local_signature(local.stat())
                    ):
                        log.warning("%s changed both locally and remotely; taking remote", rel)
                    with atomic_path(local) as tmp:
                        self.fs.get_file(self._key(rel), str(tmp))
                    files[rel] = {"local": local_signature(local.stat()), "remote": signature}
                    report.files += 1
                    report.bytes += local.stat().st_size
                for rel in [r for r in files if r not in remote and _in_scope(r, scopes)]:
                    local = self.cache / rel
                    if not local.exists():
                        del files[rel]
                    elif local_signature(local.stat()) == files[rel]["local"]:
                        local.unlink()
                        del files[rel]
                        report.removed += 1
                _, dirs = self._walk_local()
                for rel, inode in dirs.items():
                    # Keep the inode of the last sync: a directory replaced since then is
                    # still due its remote clean-up at the next push.
                    manifest["dirs"].setdefault(rel, inode)
            finally:
                self._write_manifest(manifest)
        report.seconds = time.perf_counter() - started
        return report

    def push(self) -> SyncReport:
        """Upload local files that are new or changed since the last sync (each to a temp key,
        then moved into place), then delete remote files under directories replaced locally
        that the new directory no longer holds."""
        started, report = time.perf_counter(), SyncReport()
        with self._locked():
            manifest = self._read_manifest()
            files: dict[str, dict[str, list]] = manifest["files"]
            try:
                local_files, local_dirs = self._walk_local()
                made: set[str] = set()
                for rel, signature in sorted(local_files.items()):
                    if rel in files and files[rel]["local"] == signature:
                        continue
                    key = self._key(rel)
                    parent, name = key.rsplit("/", 1)
                    if parent not in made:
                        self.fs.makedirs(parent, exist_ok=True)
                        made.add(parent)
                    tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
                    try:
                        self.fs.put_file(str(self.cache / rel), tmp)
                    except FileNotFoundError:
                        continue  # replaced or removed since the walk; the next push has it
                    self.fs.mv(tmp, key)
                    files[rel] = {"local": signature, "remote": remote_signature(self.fs.info(key))}
                    report.files += 1
                    report.bytes += signature[0]
                recorded = manifest["dirs"]
                replaced = [d for d, ino in local_dirs.items() if recorded.get(d, ino) != ino]
                for directory in replaced:
                    if any(_in_scope(directory, [d]) for d in replaced if d != directory):
                        continue  # an enclosing directory was replaced: handled there
                    stale = [r for r in self._list_remote(directory) if r not in local_files]
                    if stale:
                        self.fs.rm([self._key(r) for r in stale])
                        report.removed += len(stale)
                    for rel in [r for r in files if _in_scope(r, [directory])]:
                        if rel not in local_files:
                            del files[rel]
                recorded.update(local_dirs)
            finally:
                self._write_manifest(manifest)
        report.seconds = time.perf_counter() - started
        return report

    def _key(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _list_remote(self, scope: str) -> dict[str, dict[str, Any]]:
        """Synced remote files under `scope` (relative to the root): rel path -> fs.info."""
        try:
            found = self.fs.find(self._key(scope), detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, info in found.items():
            rel = path[len(self.root) :].lstrip("/")
            if rel and is_synced(rel) and info.get("type", "file") == "file":
                out[rel] = info or self.fs.info(path)  # find gives {} for a file scope
        return out

    def _walk_local(self) -> tuple[dict[str, list[int]], dict[str, int]]:
        """Synced local files (rel -> local signature) and directories (rel -> inode)."""
        files, dirs = {}, {}
        for dirpath, dirnames, filenames in os.walk(self.cache):
            base = Path(dirpath).relative_to(self.cache).as_posix()
            prefix = "" if base == "." else base + "/"
            dirnames[:] = [d for d in dirnames if is_synced(prefix + d)]
            for d in dirnames:
                with contextlib.suppress(FileNotFoundError):
                    dirs[prefix + d] = os.stat(os.path.join(dirpath, d)).st_ino
            for name in filenames:
                if is_synced(prefix + name):
                    with contextlib.suppress(FileNotFoundError):
                        files[prefix + name] = local_signature(os.stat(os.path.join(dirpath, name)))
        return files, dirs

    def _read_manifest(self) -> dict[str, Any]:
        path = self.cache / MANIFEST
        if not path.exists():
            return {"url": self.url, "files": {}, "dirs": {}}
        manifest = json.loads(path.read_text())
        if manifest.get("url") != self.url:
            raise ValueError(
                f"cache {self.cache} mirrors {manifest.get('url')!r}, not {self.url!r}; set "
                "storage.cache_dir to another folder (or unset it for one per URL)."
            )
        return manifest

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json(manifest, self.cache / MANIFEST)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One sync at a time per cache (several step processes may share it)."""
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.cache / LOCK, "w") as handle:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes
            yield


def _in_scope(rel: str, scopes: Iterable[str]) -> bool:
    return any(not s or rel == s or rel.startswith(s + "/") for s in scopes)
