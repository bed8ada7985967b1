"""A recommender on disk: a directory of `config.json`, `model.safetensors` and `metrics.json`.

Directories are written beside the target and renamed into place (`store.atomic_path`), so a
reader never sees a half-written model; an existing model is replaced only once the new one
is complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from recsae_pipeline.models.recommender import (
    Recommender,
    RecommenderConfig,
    backbone_from_config,
)
from recsae_pipeline.storage.atomic import atomic_path
from recsae_pipeline.storage.registry import METRICS_FILE, MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE

FORMAT_VERSION = 1
SAVED_NAMES = {"hidden_size": "hidden", "num_layers": "layers", "num_heads": "heads"}
"""RecommenderConfig field -> its key in config.json: format 1 keeps the names it was
written with, so models saved before the transformers-style rename still load."""


def save_recommender(
    model: Recommender, path: str | Path, metrics: dict[str, Any] | None = None
) -> Path:
    """Save config (with the backbone's exact `transformers` config), weights and metrics."""
    config = {
        "format_version": FORMAT_VERSION,
        "recommender": {SAVED_NAMES.get(k, k): v for k, v in asdict(model.config).items()},
        "backbone": model.backbone.config.to_dict(),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    path = Path(path)
    with atomic_path(path) as directory:
        directory.mkdir()
        (directory / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(state, directory / MODEL_WEIGHTS_FILE, metadata={"format": "pt"})
        (directory / METRICS_FILE).write_text(json.dumps(metrics or {}, indent=2, sort_keys=True))
    return path


def load_recommender(path: str | Path, device: torch.device) -> Recommender:
    """The saved model on `device`, in eval mode; never touches `pretrained_path` or the hub."""
    path = Path(path)
    if not (path / MODEL_WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{path} has no {MODEL_WEIGHTS_FILE}; save it with save_recommender"
        )
    saved = json.loads((path / MODEL_CONFIG_FILE).read_text())
    if saved.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / MODEL_CONFIG_FILE} has format_version {saved.get('format_version')}, this code "
            f"reads {FORMAT_VERSION}; retrain or re-save the model"
        )
    loaded = {v: k for k, v in SAVED_NAMES.items()}
    config = RecommenderConfig(**{loaded.get(k, k): v for k, v in saved["recommender"].items()})
    state = load_file(path / MODEL_WEIGHTS_FILE, device=str(device))
    item_table = state.get("item_table") if config.kind != "sasrec" else None
    model = Recommender(config, item_table, backbone_from_config(config, saved["backbone"]))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def read_metrics(path: str | Path) -> dict[str, Any]:
    """The metrics saved beside a model."""
    return json.loads((Path(path) / METRICS_FILE).read_text())
