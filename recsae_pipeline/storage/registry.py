"""Where each artifact lives under the storage root: every path and file name once.

`ArtifactPaths` holds the root-level artifacts, `PartitionPaths` those of one (model, layer)
partition in the hive layout `<root>/<artifact>/model=<m>/layer=<l>/`, `DropFolderPaths` the
`incoming/` tree. `ArtifactPaths.tables()` lists every Parquet table under its DuckDB view
name; `storage.warehouse` builds the views from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

DEFAULT_DATA_DIR = "data"
DATA_DIR_ENV = "RECSAE_DATA_DIR"

DUCKDB_FILE = "recsae.duckdb"
VERSIONS_DIR = ".versions"
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

PARTITIONED_TABLES: dict[str, tuple[str, str]] = {
    # DuckDB view -> (artifact folder, file or glob inside each model=<m>/layer=<l>/)
    "activations": ("activations", SHARD_GLOB),
    "feature_activations": ("feature_activations", "part-00000.parquet"),
    "feature_stats": ("feature_stats", "features.parquet"),
    "neuron_stats": ("feature_stats", "neurons.parquet"),
    "feature_enrichment": ("feature_stats", "enrichment.parquet"),
    "planted_concepts": ("feature_stats", "concepts.parquet"),
    "steering_points": ("steering", "points.parquet"),
    "steering_summary": ("steering", "summary.parquet"),
    "explanations": ("explanations", "explanations.parquet"),
    "explanation_scores": ("explanation_scores", "scores.parquet"),
    "explanation_summary": ("explanation_scores", "summary.parquet"),
}


def default_data_dir() -> str:
    """The storage root: `$RECSAE_DATA_DIR`, else `data/` under the working directory."""
    return os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR)


def shard_name(index: int) -> str:
    """The file name of a partition's `index`-th activation shard (matches `SHARD_GLOB`)."""
    return f"part-{index:05d}.parquet"


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

    @property
    def raw_dir(self) -> Path:
        return self.root / "raw"

    @property
    def raw_interactions(self) -> Path:
        return self.raw_dir / "interactions.parquet"

    @property
    def raw_items(self) -> Path:
        """The catalog as the source delivered it; `item_catalog` normalises it."""
        return self.raw_dir / "items.parquet"

    @property
    def ground_truth(self) -> Path:
        """Planted mechanism per interaction (synthetic source only)."""
        return self.raw_dir / "ground_truth.parquet"

    @property
    def items(self) -> Path:
        return self.root / "catalog" / "items.parquet"

    @property
    def sequences_dir(self) -> Path:
        return self.root / "sequences"

    @property
    def sequences(self) -> Path:
        return self.sequences_dir / "sequences.parquet"

    @property
    def item_map(self) -> Path:
        return self.sequences_dir / "item_map.parquet"

    @property
    def user_map(self) -> Path:
        return self.sequences_dir / "user_map.parquet"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def report(self, name: str, suffix: str = ".png") -> Path:
        """`reports/<name><suffix>`: a plot or result table for people."""
        return self.reports_dir / f"{name}{suffix}"

    @property
    def duckdb(self) -> Path:
        return self.root / DUCKDB_FILE

    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS_DIR

    def version_record(self, asset: str, partition: str | None) -> Path:
        """`.versions/<asset>/<partition or _>.json`: an asset's data version and provenance."""
        return self.versions_dir / asset / f"{partition or NO_PARTITION}.json"

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def model_weights(self, name: str) -> Path:
        return self.model_dir(name) / MODEL_WEIGHTS_FILE

    def model_config(self, name: str) -> Path:
        return self.model_dir(name) / MODEL_CONFIG_FILE

    def model_metrics(self, name: str) -> Path:
        return self.model_dir(name) / METRICS_FILE

    @property
    def recommender_eval(self) -> Path:
        return self.root / "models" / "recommender_eval.parquet"

    @property
    def layer_probe(self) -> Path:
        return self.root / "models" / "layer_probe.parquet"

    @property
    def drop_folder(self) -> DropFolderPaths:
        return DropFolderPaths(self.root)

    def partition(self, model: str, layer: int) -> PartitionPaths:
        """The artifacts of one (model, layer) partition."""
        return PartitionPaths(self.root, model, layer)

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
        return self.root / artifact / f"model={self.model}" / f"layer={self.layer}"

    def _table(self, view: str) -> Path:
        artifact, file = PARTITIONED_TABLES[view]
        return self.dir(artifact) / file

    @property
    def activations(self) -> Path:
        """The folder of activation shards (`SHARD_GLOB`, named by `shard_name`)."""
        return self.dir("activations")

    @property
    def activation_shards(self) -> Path:
        """The glob over this partition's activation shards."""
        return self._table("activations")

    @property
    def sae(self) -> Path:
        return self.dir("sae")

    @property
    def sae_weights(self) -> Path:
        return self.sae / SAE_WEIGHTS_FILE

    @property
    def sae_config(self) -> Path:
        return self.sae / SAE_CONFIG_FILE

    @property
    def sae_metrics(self) -> Path:
        return self.sae / METRICS_FILE

    @property
    def feature_activations(self) -> Path:
        """The sparse feature-activation table (one file, sorted by feature)."""
        return self._table("feature_activations")

    @property
    def feature_stats_dir(self) -> Path:
        return self.dir("feature_stats")

    @property
    def feature_stats(self) -> Path:
        return self._table("feature_stats")

    @property
    def neuron_stats(self) -> Path:
        return self._table("neuron_stats")

    @property
    def feature_enrichment(self) -> Path:
        return self._table("feature_enrichment")

    @property
    def planted_concepts(self) -> Path:
        return self._table("planted_concepts")

    @property
    def steering_dir(self) -> Path:
        return self.dir("steering")

    @property
    def steering_points(self) -> Path:
        return self._table("steering_points")

    @property
    def steering_summary(self) -> Path:
        return self._table("steering_summary")

    @property
    def explanations_dir(self) -> Path:
        return self.dir("explanations")

    @property
    def explanations(self) -> Path:
        return self._table("explanations")

    @property
    def transcripts(self) -> Path:
        """The explainers' JSONL transcripts, one per feature and method."""
        return self.explanations_dir / TRANSCRIPTS_DIR

    @property
    def cli_transcripts(self) -> Path:
        """Transcripts of `recsae explain` runs, outside the asset's folder."""
        return self.dir("explanations_cli")

    @property
    def explanation_scores_dir(self) -> Path:
        return self.dir("explanation_scores")

    @property
    def explanation_scores(self) -> Path:
        return self._table("explanation_scores")

    @property
    def explanation_summary(self) -> Path:
        return self._table("explanation_summary")

    @property
    def browser(self) -> Path:
        """The static feature-browser site."""
        return self.dir("browser")

    @property
    def browser_index(self) -> Path:
        return self.browser / BROWSER_INDEX_FILE

    def report(self, kind: str) -> Path:
        """`reports/<kind>_<model>_layer<l>.png`."""
        return ArtifactPaths(self.root).report(f"{kind}_{self.model}_layer{self.layer}")


@dataclass(frozen=True)
class DropFolderPaths:
    """The `incoming/` tree of the drop folder (see `data.dropfolder`)."""

    root: Path

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def appended(self) -> Path:
        return self.incoming / "appended"

    @property
    def accepted(self) -> Path:
        return self.incoming / "accepted"

    @property
    def quarantine(self) -> Path:
        return self.incoming / "quarantine"

    @property
    def merged_interactions(self) -> Path:
        return self.incoming / "merged" / "interactions.parquet"

    @property
    def merged_items(self) -> Path:
        return self.incoming / "merged" / "items.parquet"

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
