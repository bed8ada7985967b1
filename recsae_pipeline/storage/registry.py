"""Where each artifact lives under the storage root: every path once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = "data"


DATA_DIR_ENV = "RECSAE_DATA_DIR"


def default_data_dir() -> str:
    """The storage root: `$RECSAE_DATA_DIR`, else `data/` under the working directory."""
    return os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR)


@dataclass(frozen=True)
class ArtifactPaths:
    """Where each artifact lives under the storage root (see DESIGN.md, data contracts)."""

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

    @property
    def duckdb(self) -> Path:
        return self.root / "recsae.duckdb"

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    @property
    def recommender_eval(self) -> Path:
        return self.root / "models" / "recommender_eval.parquet"

    @property
    def layer_probe(self) -> Path:
        return self.root / "models" / "layer_probe.parquet"

    def partition_dir(self, artifact: str, model: str, layer: int) -> Path:
        """`<root>/<artifact>/model=<m>/layer=<l>`: the hive layout of every per-(model,
        layer) artifact (activations, sae, feature_activations, feature_stats, steering)."""
        if not model or any(c in model for c in "/\\="):
            raise ValueError(f"model={model!r}; use a plain name such as 'sasrec' or 'student'")
        return self.root / artifact / f"model={model}" / f"layer={layer}"


def partition_key(model: str, layer: int) -> str:
    """(model, l) -> `<model>.layer<l>`, the key of every per-(model, layer) partition."""
    return f"{model}.layer{layer}"


def parse_partition_key(key: str) -> tuple[str, int]:
    """`<model>.layer<l>` (the per-(model, layer) partition keys) -> (model, l)."""
    model, _, layer = key.partition(".layer")
    if not model or not layer.isdigit():
        raise ValueError(f"partition {key!r}: use `<model>.layer<l>`, e.g. sasrec.layer2")
    return model, int(layer)
