"""Dagster resources: where artifacts live, data-quality bounds, and the DuckDB catalog."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import torch
from pydantic import Field

from recsae_pipeline.data.validation import DEFAULT_MIN_TIMESTAMP, QualityBounds
from recsae_pipeline.store import ArtifactPaths, default_data_dir
from recsae_pipeline.warehouse import refresh_views


class StorageRoot(dg.ConfigurableResource):
    """Root directory of every artifact; defaults to `$RECSAE_DATA_DIR`, else `data/`."""

    path: str | None = Field(
        default=None, description="Storage root; unset means $RECSAE_DATA_DIR or data/."
    )

    @property
    def paths(self) -> ArtifactPaths:
        return ArtifactPaths(Path(self.path or default_data_dir()).resolve())

    def refresh_duckdb(self) -> Path:
        """Rebuild the DuckDB views over every artifact that exists now."""
        return refresh_views(self.paths)


class DataQuality(dg.ConfigurableResource):
    """Bounds used by the Great Expectations suites behind the blocking asset checks."""

    min_timestamp: int = Field(
        default=DEFAULT_MIN_TIMESTAMP, description="Earliest plausible timestamp (s)."
    )
    max_timestamp: int | None = Field(
        default=None, description="Latest plausible timestamp; unset: now + 1 day."
    )
    min_rating: float = 0.0
    max_rating: float = 10.0
    min_sequence_length: int = Field(
        default=3, description="Shortest sequence allowed after filtering."
    )
    batch_rows: int = Field(default=2_000_000, description="Rows per GX batch (bounds memory).")

    @property
    def bounds(self) -> QualityBounds:
        return QualityBounds(**self.model_dump())


def resolve_device(spec: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cpu`, `cuda` and `cuda:N` are taken as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise dg.Failure(
            f"device {spec!r} was requested but CUDA is not available here; use `auto` or `cpu`."
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise dg.Failure(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) exist.")
    return device


class TorchDevice(dg.ConfigurableResource):
    """Where every training and inference path runs: `auto` (CUDA when present), `cpu`, `cuda[:n]`."""

    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    threads: int | None = Field(
        default=None, description="CPU threads for torch; unset: torch's default."
    )

    @property
    def torch_device(self) -> torch.device:
        if self.threads:
            torch.set_num_threads(self.threads)
        return resolve_device(self.device)


class LLM(dg.ConfigurableResource):
    """The explainers' and scorers' backend: `openai` (any OpenAI-compatible endpoint) or
    `offline` (a deterministic statistical policy, named as such in every output). `auto`
    picks `openai` when `base_url` is set, else `offline`. The key is read from the
    environment variable named by `api_key_env` and is never logged or stored."""

    backend: str = Field(default="auto", description="auto | offline | openai")
    base_url: str | None = Field(
        default=None, description="e.g. https://api.openai.com/v1, http://localhost:8000/v1 (vLLM)."
    )
    model: str | None = Field(default=None, description="Model name as the endpoint knows it.")
    api_key_env: str = Field(default="OPENAI_API_KEY", description="Env var holding the key.")
    timeout_s: float = 60.0
    max_retries: int = 4
    max_concurrency: int = 4
    temperature: float | None = 0.0
    max_output_tokens: int = 800
    token_limit_param: str = Field(
        default="max_tokens",
        description="max_tokens | max_completion_tokens (OpenAI reasoning models).",
    )
    json_mode: bool = Field(default=True, description="Send response_format json_object.")
    price_per_1k_input: float = 0.0
    price_per_1k_output: float = 0.0

    @property
    def kind(self) -> str:
        if self.backend not in ("auto", "offline", "openai"):
            raise dg.Failure(f"LLM backend {self.backend!r}; use auto, offline or openai.")
        if self.backend == "auto":
            return "openai" if self.base_url else "offline"
        return self.backend

    def settings(self):  # -> LLMSettings (imported lazily: openai is only needed for that path)
        from recsae_pipeline.interp.llm import LLMSettings

        if not self.base_url or not self.model:
            raise dg.Failure(
                "LLM backend `openai` needs `base_url` and `model` in the `llm` resource config "
                "(e.g. base_url: https://api.openai.com/v1, model: gpt-4o-mini), with the key "
                f"in ${self.api_key_env}."
            )
        return LLMSettings(
            base_url=self.base_url,
            model=self.model,
            api_key_env=self.api_key_env,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            max_concurrency=self.max_concurrency,
            temperature=self.temperature,
            max_output_tokens=self.max_output_tokens,
            token_limit_param=self.token_limit_param,  # type: ignore[arg-type]
            json_mode=self.json_mode,
            price_per_1k_input=self.price_per_1k_input,
            price_per_1k_output=self.price_per_1k_output,
        )

    def policy_factory(self) -> Callable[[], Any]:
        """A maker of fresh explainer policies (one per feature and method, so that usage
        and budgets count per explanation): `OfflinePolicy` or an `LLMPolicy` on its own chat."""
        if self.kind == "offline":
            from recsae_pipeline.interp.sage import OfflinePolicy

            return OfflinePolicy
        from recsae_pipeline.interp.llm import OpenAIChat
        from recsae_pipeline.interp.llm_policy import LLMPolicy

        settings = self.settings()
        return lambda: LLMPolicy(OpenAIChat(settings))

    def scorer_factory(self) -> Callable[[], Any]:
        """A maker of fresh scorers: `OfflineScorer` or an `LLMScorer` on its own chat."""
        if self.kind == "offline":
            from recsae_pipeline.interp.scoring import OfflineScorer

            return OfflineScorer
        from recsae_pipeline.interp.llm import OpenAIChat
        from recsae_pipeline.interp.llm_policy import LLMScorer

        settings = self.settings()
        return lambda: LLMScorer(OpenAIChat(settings))
