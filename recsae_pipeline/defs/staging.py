"""Write-audit-publish: an asset writes into a staging tree, its blocking checks read the
staged files, and only then is it published into the storage root.

`<root>/.staging/<asset>/<partition or _>/` is laid out like the root: the asset's outputs
(and the plots it saves under `reports/`) are redirected there through `StagedStorage`,
while everything it reads stays where it is. Publishing replaces each output whole
(`storage.atomic.publish_tree`); a blocking check that fails moves the tree to
`<root>/rejected/<asset>/<partition or _>/<stamp>/` with `checks.json` beside it (only the
latest refusal is kept; the next successful publish clears it) and publishes nothing.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from recsae_pipeline.storage.atomic import publish_tree, write_json
from recsae_pipeline.storage.registry import CHECKS_FILE, ArtifactPaths


class StagedStorage:
    """The `storage` resource as an asset sees it while staged: its outputs resolve under the
    staging tree; DuckDB views are refreshed once the artifacts are published."""

    def __init__(self, storage: Any, paths: ArtifactPaths) -> None:
        self._storage, self._paths = storage, paths
        self.refresh_requested = False

    @property
    def paths(self) -> ArtifactPaths:
        return self._paths

    def refresh_duckdb(self) -> None:
        self.refresh_requested = True  # views over staged files would dangle after publish

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


class Stage:
    """One materialization of `asset` (`partition`) being written into its staging tree."""

    def __init__(self, storage: Any, asset: str, partition: str | None, outputs: list[Path]):
        self.real = storage
        self.paths: ArtifactPaths = storage.paths
        self.asset, self.partition, self.outputs = asset, partition, outputs
        self.tree = discard_leftovers(self.paths, asset, partition)
        self.storage = StagedStorage(storage, self.paths.staged(outputs, self.tree))

    @property
    def staged_outputs(self) -> list[Path]:
        """The outputs inside the staging tree (hash them relative to `tree`)."""
        return [self.tree / p.relative_to(self.paths.root) for p in self.outputs]

    def unstaged(self, value: Any) -> Any:
        """`value` (metadata, check results) with staged paths replaced by published ones."""
        text = dg.serialize_value(value)
        staged, root = json.dumps(str(self.tree))[1:-1], json.dumps(str(self.paths.root))[1:-1]
        return dg.deserialize_value(text.replace(staged, root))

    def publish(self) -> None:
        """Replace every output by its staged version; clear a previous refusal."""
        publish_tree(self.tree, self.paths.root, self.outputs)
        discard_leftovers(self.paths, self.asset, self.partition)
        shutil.rmtree(self.paths.rejected(self.asset, self.partition), ignore_errors=True)
        if self.storage.refresh_requested:
            self.real.refresh_duckdb()

    def reject(self, run_id: str, checks: list[dict[str, Any]]) -> Path:
        """Keep the staged tree under `rejected/` with the check results; nothing is published."""
        folder = self.paths.rejected(self.asset, self.partition)
        shutil.rmtree(folder, ignore_errors=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        kept = folder / f"{stamp}-{run_id[:8]}"
        kept.parent.mkdir(parents=True, exist_ok=True)
        self.tree.mkdir(parents=True, exist_ok=True)
        self.tree.rename(kept)
        record = {"asset": self.asset, "partition": self.partition, "run_id": run_id}
        write_json({**record, "checks": checks}, kept / CHECKS_FILE)
        return kept


def discard_leftovers(paths: ArtifactPaths, asset: str, partition: str | None) -> Path:
    """Remove what a crashed materialization of `asset` left staged; return the staging tree."""
    tree = paths.staging(asset, partition)
    shutil.rmtree(tree, ignore_errors=True)
    for empty in (tree.parent, tree.parent.parent):  # `.staging/<asset>/`, `.staging/`
        try:
            empty.rmdir()
        except OSError:
            break  # not empty (another asset is staging), or already gone
    return tree


def latest_rejection(paths: ArtifactPaths, asset: str, partition: str | None) -> dict | None:
    """The check results of `asset`'s latest refused materialization since its last publish."""
    for checks in sorted(paths.rejected(asset, partition).glob(f"*/{CHECKS_FILE}"), reverse=True):
        try:
            return {**json.loads(checks.read_text()), "kept": str(checks.parent)}
        except (OSError, json.JSONDecodeError):
            continue
    return None


def refusal(stage: Stage, failed: list[dg.AssetCheckResult], kept: Path) -> str:
    """The run's failure message: which check refused what, what stayed, what to do."""
    where = f"{stage.asset}[{stage.partition}]" if stage.partition else stage.asset
    published = ", ".join(str(p) for p in stage.outputs)
    reasons = "; ".join(f"`{c.check_name}`: {c.description}" for c in failed)
    return (
        f"{where}: blocking check {reasons}. Nothing was published: {published} and its "
        f"version record are unchanged. The refused files and the check results are in "
        f"{kept} ({CHECKS_FILE}); fix the input or configuration the check names and "
        f"rematerialize {stage.asset}."
    )
