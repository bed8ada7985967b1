"""Where each artifact lives under the storage root: every path and file name once.

`ArtifactPaths` holds the root-level artifacts, `PartitionPaths` those of one (model, layer)
partition in the hive layout `<root>/<artifact>/model=<m>/layer=<l>/`, `DropFolderPaths` the
`incoming/` tree. `ArtifactPaths.tables()` lists every Parquet table under its DuckDB view
name; `storage.warehouse` builds the views from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol, overload

DEFAULT_DATA_DIR = "data"
DATA_DIR_ENV = "RECSAE_DATA_DIR"

DUCKDB_FILE = "recsae.duckdb"
VERSIONS_DIR = ".versions"
LOCKS_DIR = ".locks"
STAGING_DIR = ".staging"
"""Where a materialization writes before its blocking checks pass (then it is published)."""
REJECTED_DIR = "rejected"
"""Where a materialization refused by a blocking check is kept, with the check results."""
CHECKS_FILE = "checks.json"
NO_PARTITION = "_"
"""The version record name of an unpartitioned asset."""
SHARD_GLOB = "part-*.parquet"
"""The activation shards of one partition."""
MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
SAE_WEIGHTS_FILE = "sae.safetensors"
SAE_CONFIG_FILE = "config.json"
BROWSER_INDEX_FILE = "index.html"
TRANSCRIPTS_DIR = "transcripts"

_VIEWS_BY_ARTIFACT: dict[str, dict[str, str]] = {
    # artifact folder -> {DuckDB view: file or glob inside each model=<m>/layer=<l>/}
    "activations": {"activations": SHARD_GLOB},
    "feature_activations": {"feature_activations": "part-00000.parquet"},
    "feature_stats": {
        "feature_stats": "features.parquet", "neuron_stats": "neurons.parquet",
        "feature_enrichment": "enrichment.parquet", "planted_concepts": "concepts.parquet",
        "unit_measures": "units.parquet", "target_measures": "targets.parquet",
        "chance_levels": "chance.parquet",
    },
    "sae": {"sae_splice_users": "splice_users.parquet"},
    "steering": {
        "steering_points": "points.parquet", "steering_summary": "summary.parquet",
        "steering_users": "users.parquet",
    },
    "explanations": {"explanations": "explanations.parquet"},
    "explanation_scores": {
        "explanation_scores": "scores.parquet", "explanation_summary": "summary.parquet",
    },
}  # fmt: skip
PARTITIONED_TABLES: dict[str, tuple[str, str]] = {
    view: (artifact, file)
    for artifact, views in _VIEWS_BY_ARTIFACT.items()
    for view, file in views.items()
}
"""DuckDB view -> (artifact folder, file or glob inside each model=<m>/layer=<l>/)."""


def default_data_dir() -> str:
    """The storage root: `$RECSAE_DATA_DIR`, else `data/` under the working directory."""
    return os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR)


def shard_name(index: int) -> str:
    """The file name of a partition's `index`-th activation shard (matches `SHARD_GLOB`)."""
    return f"part-{index:05d}.parquet"


class _Joins(Protocol):
    def _join(self, *parts: str) -> Path: ...


class _At:
    """A path attribute: `parts` joined below the owner's base folder by its `_join`."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    @overload
    def __get__(self, obj: None, owner: type) -> _At: ...
    @overload
    def __get__(self, obj: _Joins, owner: type) -> Path: ...
    def __get__(self, obj: _Joins | None, owner: type) -> _At | Path:
        return self if obj is None else obj._join(*self.parts)


class _PartitionTable(_At):
    """A `PartitionPaths` attribute: the file of the `PARTITIONED_TABLES` view named like it."""

    def __init__(self, view: str | None = None) -> None:
        super().__init__()
        self.view = view

    def __set_name__(self, owner: type, name: str) -> None:
        self.parts = PARTITIONED_TABLES[self.view or name]


Overlay = tuple[tuple[Path, Path], ...]
"""(published path, staged path) pairs: what a staged materialization writes elsewhere."""


def _place(path: Path, overlay: Overlay) -> Path:
    """`path`, or where it is staged when it lies in one of `overlay`'s published paths."""
    for published, staged in overlay:
        if path == published or path.is_relative_to(published):
            return staged / path.relative_to(published)
    return path


class Table(NamedTuple):
    """Where one Parquet table lives, for its DuckDB view."""

    path: Path
    """The file, or for a partitioned table the glob over every partition's file."""
    partitioned: bool
    """Whether `model` and `layer` come from the hive path."""


@dataclass(frozen=True)
class ArtifactPaths:
    """Where each root-level artifact lives under the storage root (see docs/ARCHITECTURE.md,
    data contracts); `partition(model, layer)` gives a partition's artifacts."""

    root: Path
    overlay: Overlay = field(default=(), compare=False, repr=False)
    """Set by `staged`: the artifacts being written resolve under the staging tree."""

    raw_dir = _At("raw")
    raw_interactions = _At("raw", "interactions.parquet")
    raw_items = _At("raw", "items.parquet")
    """The catalog as the source delivered it; `item_catalog` normalises it."""
    ground_truth = _At("raw", "ground_truth.parquet")
    """Planted mechanism per interaction (synthetic source only)."""
    items = _At("catalog", "items.parquet")
    sequences_dir = _At("sequences")
    sequences = _At("sequences", "sequences.parquet")
    item_map = _At("sequences", "item_map.parquet")
    user_map = _At("sequences", "user_map.parquet")
    reports_dir = _At("reports")
    duckdb = _At(DUCKDB_FILE)
    versions_dir = _At(VERSIONS_DIR)
    recommender_eval = _At("models", "recommender_eval.parquet")
    recommender_eval_users = _At("models", "recommender_eval_users.parquet")
    """Each test user's rank and NDCG@10 under each model: what paired CIs resample."""
    layer_probe = _At("models", "layer_probe.parquet")
    base_llm = _At("base_llm")
    """The teacher's pretrained causal LM as a `transformers` checkpoint (`models.pretrained`)."""
    downloads = _At(".cache", "downloads")
    """Wheels fetched from the package index (`pip download --no-deps`) and what they carry."""

    def _join(self, *parts: str) -> Path:
        return _place(self.root.joinpath(*parts), self.overlay)

    def staged(self, outputs: list[Path], tree: Path) -> ArtifactPaths:
        """These paths with `outputs` and `reports/` redirected into `tree` (laid out like the
        root), where one materialization writes before it is published; inputs stay put."""
        published = [*outputs, self.root / "reports"]
        return ArtifactPaths(
            self.root, tuple((p, tree / p.relative_to(self.root)) for p in published)
        )

    def staging(self, asset: str, partition: str | None) -> Path:
        """`.staging/<asset>/<partition or _>/`: the materialization being written."""
        return self.root / STAGING_DIR / asset / (partition or NO_PARTITION)

    def rejected(self, asset: str, partition: str | None) -> Path:
        """`rejected/<asset>/<partition or _>/`: the latest materialization a blocking check
        refused (`<stamp>/` with the staged files and `checks.json`)."""
        return self.root / REJECTED_DIR / asset / (partition or NO_PARTITION)

    def report(self, name: str, suffix: str = ".png") -> Path:
        """`reports/<name><suffix>`: a plot or result table for people."""
        return self.reports_dir / f"{name}{suffix}"

    def version_record(self, asset: str, partition: str | None) -> Path:
        """`.versions/<asset>/<partition or _>.json`: an asset's data version and provenance."""
        return self.versions_dir / asset / f"{partition or NO_PARTITION}.json"

    def write_lock(self, asset: str, partition: str | None) -> Path:
        """`.locks/<asset>/<partition or _>.lock`: held by the one run writing that artifact."""
        return self.root / LOCKS_DIR / asset / f"{partition or NO_PARTITION}.lock"

    def model_dir(self, name: str) -> Path:
        return self._join("models", name)

    def model_config(self, name: str) -> Path:
        return self.model_dir(name) / MODEL_CONFIG_FILE

    def partition(self, model: str, layer: int) -> PartitionPaths:
        """The artifacts of one (model, layer) partition."""
        return PartitionPaths(self.root, model, layer, self.overlay)

    def partition_dir(self, artifact: str, model: str, layer: int) -> Path:
        """`<root>/<artifact>/model=<m>/layer=<l>`: one partition's folder of `artifact`."""
        return self.partition(model, layer).dir(artifact)

    def tables(self) -> dict[str, Table]:
        """Every Parquet table of the store under its DuckDB view name."""
        out = {
            "interactions": Table(self.raw_interactions, False),
            "ground_truth": Table(self.ground_truth, False),
            "items": Table(self.items, False),
            "sequences": Table(self.sequences, False),
            "item_map": Table(self.item_map, False),
            "user_map": Table(self.user_map, False),
            "recommender_eval": Table(self.recommender_eval, False),
            "recommender_eval_users": Table(self.recommender_eval_users, False),
            "layer_probe": Table(self.layer_probe, False),
        }
        for view, (artifact, file) in PARTITIONED_TABLES.items():
            out[view] = Table(self.root / artifact / "model=*" / "layer=*" / file, True)
        return out


@dataclass(frozen=True)
class PartitionPaths:
    """The artifacts of one (model, layer) partition, `<root>/<artifact>/model=<m>/layer=<l>/`."""

    root: Path
    model: str
    layer: int
    overlay: Overlay = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.model or any(c in self.model for c in "/\\="):
            raise ValueError(
                f"model={self.model!r}; use a plain name such as 'sasrec' or 'student'"
            )

    @property
    def key(self) -> str:
        """The Dagster partition key, `<model>.layer<l>`."""
        return partition_key(self.model, self.layer)

    def dir(self, artifact: str) -> Path:
        folder = self.root / artifact / f"model={self.model}" / f"layer={self.layer}"
        return _place(folder, self.overlay)

    def _join(self, artifact: str, *parts: str) -> Path:
        return self.dir(artifact).joinpath(*parts)

    activations = _At("activations")
    """The folder of activation shards (`SHARD_GLOB`, named by `shard_name`)."""
    activation_shards = _PartitionTable("activations")
    """The glob over this partition's activation shards."""
    sae = _At("sae")
    sae_weights = _At("sae", SAE_WEIGHTS_FILE)
    sae_config = _At("sae", SAE_CONFIG_FILE)
    sae_metrics = _At("sae", METRICS_FILE)
    sae_saelens = _At("sae", "saelens")
    """The SAE exported in SAELens's on-disk format (`sae.export.export_saelens`)."""
    sae_splice_users = _PartitionTable()
    """Each test user's NDCG@10 as trained, spliced and zero-ablated."""
    feature_activations = _PartitionTable()
    """The sparse feature-activation table (one file, sorted by feature)."""
    feature_stats_dir = _At("feature_stats")
    feature_stats = _PartitionTable()
    neuron_stats = _PartitionTable()
    feature_enrichment = _PartitionTable()
    planted_concepts = _PartitionTable()
    unit_measures = _PartitionTable()
    """Per (kind, unit, sign) of SAE features, neurons and a random rotation: best target AUC
    per family with its null, purity with its chance level (`sae.interpretability`)."""
    target_measures = _PartitionTable()
    """Per (target, kind): the best unit's AUC, the null's best, k-sparse probe AUCs."""
    chance_levels = _PartitionTable()
    """Per (kind, measure, family): the chance level and the share of units above it."""
    steering_dir = _At("steering")
    steering_points = _PartitionTable()
    steering_summary = _PartitionTable()
    steering_users = _PartitionTable()
    """Each steered user's genre share and NDCG@10 per (genre, direction, scale)."""
    explanations_dir = _At("explanations")
    explanations = _PartitionTable()
    transcripts = _At("explanations", TRANSCRIPTS_DIR)
    """The explainers' JSONL transcripts, one per feature and method."""
    cli_transcripts = _At("explanations_cli")
    """Transcripts of `recsae explain` runs, outside the asset's folder."""
    explanation_scores_dir = _At("explanation_scores")
    explanation_scores = _PartitionTable()
    explanation_summary = _PartitionTable()
    browser = _At("browser")
    """The static feature-browser site."""
    browser_index = _At("browser", BROWSER_INDEX_FILE)

    def report(self, kind: str) -> Path:
        """`reports/<kind>_<model>_layer<l>.png`."""
        paths = ArtifactPaths(self.root, self.overlay)
        return paths.report(f"{kind}_{self.model}_layer{self.layer}")


@dataclass(frozen=True)
class DropFolderPaths:
    """The `incoming/` tree of the drop folder (see `data.dropfolder`)."""

    root: Path

    incoming = _At()
    appended = _At("appended")
    accepted = _At("accepted")
    quarantine = _At("quarantine")
    merged_interactions = _At("merged", "interactions.parquet")
    merged_items = _At("merged", "items.parquet")

    def _join(self, *parts: str) -> Path:
        return self.root.joinpath("incoming", *parts)

    def appended_drop(self, tag: str) -> Path:
        """`appended/<tag>.parquet`: one valid drop's rows in the raw-interactions contract."""
        return self.appended / f"{tag}.parquet"

    def appended_drops(self, tag_glob: str = "*") -> list[Path]:
        """The appended drops whose tag matches `tag_glob`, in name (arrival) order."""
        return sorted(self.appended.glob(f"{tag_glob}.parquet"))


def partition_key(model: str, layer: int) -> str:
    """(model, l) -> `<model>.layer<l>`, the key of every per-(model, layer) partition."""
    return f"{model}.layer{layer}"


def parse_partition_key(key: str) -> tuple[str, int]:
    """`<model>.layer<l>` (the per-(model, layer) partition keys) -> (model, l)."""
    model, _, layer = key.partition(".layer")
    if not model or not layer.isdigit():
        raise ValueError(f"partition {key!r}: use `<model>.layer<l>`, e.g. sasrec.layer2")
    return model, int(layer)
