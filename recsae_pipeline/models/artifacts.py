"""A recommender on disk: a directory of `config.json`, `model.safetensors` and `metrics.json`.

A model over a frozen pretrained base with a LoRA adapter (the pretrained teacher) keeps only
what it trained: `model.safetensors` holds the item projection, the head and the item table,
`adapter/` is `peft`'s own format (`adapter_config.json`, `adapter_model.safetensors`, loadable
with `PeftModel.from_pretrained` over the base), and `config.json` names the base by path and
by the sha256 of its weights. Loading finds the base (at that path, else at `base_llm/` in a
folder above the model, as in the storage root), checks the sha256 and merges the adapter.
A teacher also keeps `init.safetensors`: its weights before training (without a pretrained
base's own weights), from which both students start.
A trained model keeps `test_ranks.safetensors`: each test user's rank, which its test metrics
came from and which `recommender_eval` reads instead of scoring the model again.

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
from torch import Tensor

from recsae_pipeline.models.pretrained import MANIFEST, WEIGHTS, read_manifest, sha256_file
from recsae_pipeline.models.recommender import (
    Recommender,
    RecommenderConfig,
    backbone_from_config,
    build_backbone,
    has_adapter,
)
from recsae_pipeline.storage.atomic import atomic_path
from recsae_pipeline.storage.registry import METRICS_FILE, MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE

FORMAT_VERSION = 1
ADAPTER_DIR = "adapter"
INIT_FILE = "init.safetensors"
TEST_RANKS_FILE = "test_ranks.safetensors"
"""Each test user's full-ranking rank (`ranks`, int64, in sequences order), as `metrics.json`'s
test metrics were computed from them."""
BACKBONE_PREFIX = "backbone."
BASE_DIR_NAME = "base_llm"
SAVED_NAMES = {"hidden_size": "hidden", "num_layers": "layers", "num_heads": "heads"}
"""RecommenderConfig field -> its key in config.json: format 1 keeps the names it was
written with, so models saved before the transformers-style rename still load."""


def base_reference(pretrained_path: str | Path) -> dict[str, str]:
    """How a saved model names its pretrained base: the path and the sha256 of its weights
    (read from `base_llm`'s manifest, or hashed)."""
    path = Path(pretrained_path).resolve()
    if (path / MANIFEST).is_file() and read_manifest(path).weights_sha256:
        sha = read_manifest(path).weights_sha256
    else:
        sha = sha256_file(path / WEIGHTS)
    return {"path": str(path), "weights_sha256": sha}


def find_base(model_dir: Path, reference: dict[str, str]) -> Path:
    """The base directory `reference` names: at its recorded path, else `base_llm/` in a folder
    above `model_dir` (the storage root, wherever it moved); its weights must hash the same."""
    candidates = [Path(reference["path"])]
    candidates += [parent / BASE_DIR_NAME for parent in Path(model_dir).resolve().parents]
    for candidate in candidates:
        if not (candidate / WEIGHTS).is_file():
            continue
        if (candidate / MANIFEST).is_file():
            sha = read_manifest(candidate).weights_sha256
        else:
            sha = sha256_file(candidate / WEIGHTS)
        if sha == reference["weights_sha256"]:
            return candidate
    raise FileNotFoundError(
        f"{model_dir} was trained over the base at {reference['path']} (weights sha256 "
        f"{reference['weights_sha256'][:12]}...), found neither there nor as {BASE_DIR_NAME}/ in "
        f"a folder above it; materialize `base_llm` with the same source, or retrain the model"
    )


def _cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_recommender(
    model: Recommender,
    path: str | Path,
    metrics: dict[str, Any] | None = None,
    extra_tensors: dict[str, dict[str, Tensor]] | None = None,
) -> Path:
    """Save config (with the backbone's exact `transformers` config), weights and metrics;
    an adapter-wrapped backbone is saved as the base reference + `adapter/`. `extra_tensors`
    (file name -> state) are saved beside, as safetensors."""
    adapter = has_adapter(model)
    base_model = model.backbone.get_base_model() if adapter else model.backbone
    config = {
        "format_version": FORMAT_VERSION,
        "recommender": {SAVED_NAMES.get(k, k): v for k, v in asdict(model.config).items()},
        "backbone": base_model.config.to_dict(),
    }
    if model.config.pretrained_path is not None:
        config["base"] = base_reference(model.config.pretrained_path)
    state = model.state_dict()
    if adapter:
        state = {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}

    path = Path(path)
    with atomic_path(path) as directory:
        directory.mkdir()
        (directory / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(_cpu(state), directory / MODEL_WEIGHTS_FILE, metadata={"format": "pt"})
        if adapter:
            # The one-row token table replaces the base's; the adapter never touches it.
            model.backbone.save_pretrained(
                directory / ADAPTER_DIR, safe_serialization=True, save_embedding_layers=False
            )
        for name, tensors in (extra_tensors or {}).items():
            save_file(_cpu(tensors), directory / name, metadata={"format": "pt"})
        (directory / METRICS_FILE).write_text(json.dumps(metrics or {}, indent=2, sort_keys=True))
    return path


def _saved(path: Path, with_base: bool) -> tuple[dict[str, Any], RecommenderConfig]:
    """config.json and the config; `with_base`: pretrained_path set to the base found on disk."""
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
    fields = {loaded.get(k, k): v for k, v in saved["recommender"].items()}
    if with_base:
        fields["pretrained_path"] = str(find_base(path, saved["base"]))
    return saved, RecommenderConfig(**fields)


def _saved_with(path: Path) -> dict[str, Any]:
    return json.loads((path / MODEL_CONFIG_FILE).read_text()) if path.is_dir() else {}


def _load_strict(model: Recommender, state: dict[str, Tensor], backbone_from_base: bool) -> None:
    """Load `state`; where the backbone came from the base, only its keys may be missing."""
    missing, unexpected = model.load_state_dict(state, strict=not backbone_from_base)
    missing = [k for k in missing if not k.startswith(BACKBONE_PREFIX)]
    if missing or unexpected:
        raise ValueError(f"saved weights do not fit: missing {missing}, unexpected {unexpected}")


def load_recommender(path: str | Path, device: torch.device) -> Recommender:
    """The saved model on `device`, in eval mode; never touches the hub. A model over a
    pretrained base comes back with its adapter merged (the same function, a plain backbone)."""
    path = Path(path)
    adapter = (path / ADAPTER_DIR).is_dir()
    saved, config = _saved(path, with_base=adapter)
    state = load_file(path / MODEL_WEIGHTS_FILE, device=str(device))
    item_table = state.get("item_table") if config.kind != "sasrec" else None
    if adapter:
        from peft import PeftModel

        backbone = build_backbone(config)
        backbone = PeftModel.from_pretrained(backbone, path / ADAPTER_DIR).merge_and_unload()
    else:
        backbone = backbone_from_config(config, saved["backbone"])
    model = Recommender(config, item_table, backbone)
    _load_strict(model, state, backbone_from_base=adapter)
    return model.to(device).eval()


def load_initialisation(path: str | Path, device: torch.device) -> Recommender:
    """The saved teacher as it was before training (`init.safetensors`): its pretrained base
    without the adapter, or its random initialisation, with the initial projection and head."""
    path = Path(path)
    from_base = "base" in _saved_with(path)
    saved, config = _saved(path, with_base=from_base)
    if not (path / INIT_FILE).is_file():
        raise FileNotFoundError(
            f"{path} has no {INIT_FILE} (saved before students started from the teacher's "
            f"initialisation); rematerialize the teacher"
        )
    state = load_file(path / INIT_FILE, device=str(device))
    if from_base:
        config = RecommenderConfig(**{**asdict(config), "lora_r": 0})
        backbone = build_backbone(config)
    else:
        backbone = backbone_from_config(config, saved["backbone"])
    model = Recommender(config, state["item_table"], backbone)
    _load_strict(model, state, backbone_from_base=from_base)
    return model.to(device).eval()


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over every weight's name, dtype, shape and bytes: equal states hash equal."""
    import hashlib

    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def initial_state(model: Recommender) -> dict[str, Tensor]:
    """What `init.safetensors` keeps of a model about to train: every weight, less a
    pretrained base's own (those stay in `base_llm`)."""
    state = model.state_dict()
    if model.config.pretrained_path is not None:
        state = {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}
    return {k: v.detach().clone() for k, v in state.items()}


def read_test_ranks(path: str | Path) -> Tensor | None:
    """The saved model's `TEST_RANKS_FILE` ranks; None for a model saved without them."""
    file = Path(path) / TEST_RANKS_FILE
    return load_file(file)["ranks"] if file.is_file() else None


def read_metrics(path: str | Path) -> dict[str, Any]:
    """The metrics saved beside a model."""
    return json.loads((Path(path) / METRICS_FILE).read_text())
