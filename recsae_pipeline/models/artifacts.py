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

FORMAT_VERSION = 1


def save_recommender(
    model: Recommender, path: str | Path, metrics: dict[str, Any] | None = None
) -> Path:
    """Save config (with the backbone's exact `transformers` config), weights and metrics."""
    config = {
        "format_version": FORMAT_VERSION,
        "recommender": asdict(model.config),
        "backbone": model.backbone.config.to_dict(),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    path = Path(path)
    with atomic_path(path) as directory:
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        (directory / "metrics.json").write_text(json.dumps(metrics or {}, indent=2, sort_keys=True))
    return path


def load_recommender(path: str | Path, device: torch.device) -> Recommender:
    """The saved model on `device`, in eval mode; never touches `pretrained_path` or the hub."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; save it with save_recommender")
    saved = json.loads((path / "config.json").read_text())
    if saved.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}/config.json has format_version {saved.get('format_version')}, this code "
            f"reads {FORMAT_VERSION}; retrain or re-save the model"
        )
    config = RecommenderConfig(**saved["recommender"])
    state = load_file(path / "model.safetensors", device=str(device))
    item_table = state.get("item_table") if config.kind != "sasrec" else None
    model = Recommender(config, item_table, backbone_from_config(config, saved["backbone"]))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def read_metrics(path: str | Path) -> dict[str, Any]:
    """The metrics saved beside a model."""
    return json.loads((Path(path) / "metrics.json").read_text())
