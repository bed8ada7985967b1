"""Dagster resources: where artifacts live, data-quality bounds, and the DuckDB catalog."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import torch
from pydantic import Field, PrivateAttr

from recsae_pipeline.data.validation import QualityBounds
from recsae_pipeline.defs.config import knob, to_domain
from recsae_pipeline.distributed.ddp import resolve_device
from recsae_pipeline.interp.llm import LLMSettings
from recsae_pipeline.interp.local_server import ServerConfig
from recsae_pipeline.storage.registry import ArtifactPaths, default_data_dir
from recsae_pipeline.storage.remote import Mirror, SyncReport, default_cache_dir, local_root
from recsae_pipeline.storage.warehouse import refresh_views

if TYPE_CHECKING:
    from recsae_pipeline.interp.local_server import LocalServer


class StorageRoot(dg.ConfigurableResource):
    """Root of every artifact: a local directory (default `$RECSAE_DATA_DIR`, else `data/`)
    or any fsspec URL (`s3://bucket/prefix`, `gs://...`, `az://...`, `memory://...`).

    A remote root is worked on through a local cache (`cache_dir`): each run (each step
    process, with a multiprocess executor) pulls what changed remotely at resource setup and
    pushes what changed locally at teardown. Teardown runs whether or not the step
    succeeded and cannot tell which; pushing is still safe because every write is atomic, so
    the cache only ever holds complete artifacts (the same ones a local root would keep).
    """

    path: str | None = Field(
        default=None,
        description="Storage root: a local path or an fsspec URL such as s3://bucket/prefix "
        "(install s3fs, gcsfs or adlfs for its protocol); unset means $RECSAE_DATA_DIR or data/.",
    )
    cache_dir: str | None = Field(
        default=None,
        description="Local working copy of a remote root; unset: $RECSAE_CACHE_DIR/<hash of "
        "url>, else ~/.cache/recsae/<hash of url>. Unused for a local root.",
    )
    mirror: bool = Field(
        default=False,
        description="Work on a local or file:// root through the cache as if it were remote "
        "(to test the remote path on one machine); other URLs are always mirrored.",
    )
    _mirror: Mirror | None = PrivateAttr(default=None)

    @property
    def url(self) -> str:
        return self.path or default_data_dir()

    @property
    def local_dir(self) -> Path | None:
        """The root directory when it is used in place (no cache, no copying), else None."""
        return None if self.mirror else local_root(self.url)

    @property
    def paths(self) -> ArtifactPaths:
        local = self.local_dir
        if local is not None:
            return ArtifactPaths(local.resolve())
        cache = Path(self.cache_dir) if self.cache_dir else default_cache_dir(self.url)
        return ArtifactPaths(cache.expanduser().resolve())

    def refresh_duckdb(self) -> Path:
        """Rebuild the DuckDB views over every artifact that exists now."""
        return refresh_views(self.paths)

    def pull(self) -> SyncReport | None:
        """Bring the cache of a remote root up to date (and its DuckDB catalog, which names
        cache paths); None for a local root."""
        if self.local_dir is not None:
            return None
        report = self._mirrored().pull()
        if report.changed or not self.paths.duckdb.exists():
            self.refresh_duckdb()
        return report

    def push(self) -> SyncReport | None:
        """Upload what changed in the cache of a remote root; None for a local root."""
        if self.local_dir is not None:
            return None
        return self._mirrored().push()

    def _mirrored(self) -> Mirror:
        if self._mirror is None:
            self._mirror = Mirror(self.url, self.paths.root)
        return self._mirror

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        report = self.pull()
        if report is not None and context.log:
            context.log.info(f"storage: pulled {report} from {self.url} into {self.paths.root}")

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        report = self.push()
        if report is not None and context.log:
            context.log.info(f"storage: pushed {report} from {self.paths.root} to {self.url}")


class DataQuality(dg.ConfigurableResource):
    """Bounds used by the Great Expectations suites behind the blocking asset checks."""

    min_timestamp: int = knob(QualityBounds, "min_timestamp", "Earliest plausible timestamp (s).")
    max_timestamp: int | None = knob(
        QualityBounds, "max_timestamp", "Latest plausible timestamp; unset: now + 1 day."
    )
    min_rating: float = knob(QualityBounds, "min_rating")
    max_rating: float = knob(QualityBounds, "max_rating")
    min_sequence_length: int = knob(
        QualityBounds, "min_sequence_length", "Shortest sequence allowed after filtering."
    )
    batch_rows: int = knob(QualityBounds, "batch_rows", "Rows per GX batch (bounds memory).")

    @property
    def bounds(self) -> QualityBounds:
        return to_domain(self, QualityBounds)


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
        try:
            return resolve_device(self.device)
        except ValueError as err:  # no such device here: a configuration problem
            raise dg.Failure(str(err)) from err


class LLM(dg.ConfigurableResource):
    """The explainers' and scorers' backend: `openai` (any OpenAI-compatible endpoint),
    `local` (llama.cpp's server over a GGUF file, started on a free loopback port on first
    use and stopped at teardown; the `local-llm` extra) or `offline` (a deterministic
    statistical policy, named as such in every output). `auto` picks `openai` when
    `base_url` is set, else `offline`. The key is read from the environment variable named
    by `api_key_env` and is never logged or stored.

    Outside a Dagster run, use it as a context manager (`with LLM(backend="local") as llm:`)
    so that the local server stops; it stops at interpreter exit or when this process dies
    in any case."""

    backend: str = Field(default="auto", description="auto | offline | openai | local")
    base_url: str | None = Field(
        default=None, description="e.g. https://api.openai.com/v1, http://localhost:8000/v1 (vLLM)."
    )
    model: str | None = Field(default=None, description="Model name as the endpoint knows it.")
    api_key_env: str = knob(LLMSettings, "api_key_env")
    timeout_s: float = knob(LLMSettings, "timeout_s")
    max_retries: int = knob(LLMSettings, "max_retries")
    max_concurrency: int = knob(LLMSettings, "max_concurrency")
    temperature: float | None = knob(LLMSettings, "temperature")
    max_output_tokens: int = knob(LLMSettings, "max_output_tokens")
    token_limit_param: str = knob(LLMSettings, "token_limit_param")
    json_mode: bool = knob(LLMSettings, "json_mode")
    price_per_1k_input: float = knob(LLMSettings, "price_per_1k_input")
    price_per_1k_output: float = knob(LLMSettings, "price_per_1k_output")
    gguf: str = knob(ServerConfig, "gguf", "backend local: a .gguf path, a .whl carrying "
                     "one, or wheel:<distribution> (default: SmolLM2-135M-Instruct).")  # fmt: skip
    n_threads: int | None = knob(
        ServerConfig, "n_threads", "backend local: generation threads; unset: half the usable "
        "cores, so that training on the rest and serving do not fight over them."
    )  # fmt: skip
    n_ctx: int = knob(ServerConfig, "n_ctx", "backend local: context length in tokens.")
    startup_timeout_s: float = knob(ServerConfig, "startup_timeout_s")
    log_dir: str | None = knob(
        ServerConfig, "log_dir", "backend local: folder of the server log; unset: <tempdir>/recsae-llm."
    )  # fmt: skip
    _server: Any = PrivateAttr(default=None)

    @property
    def kind(self) -> str:
        if self.backend not in ("auto", "offline", "openai", "local"):
            raise dg.Failure(f"LLM backend {self.backend!r}; use auto, offline, openai or local.")
        if self.backend == "auto":
            return "openai" if self.base_url else "offline"
        return self.backend

    @property
    def server(self) -> LocalServer | None:
        """The local server this resource started (backend `local`), or None."""
        return self._server

    def settings(self) -> LLMSettings:
        if self.kind == "local":
            return self._local_settings()
        if not self.base_url or not self.model:
            raise dg.Failure(
                "LLM backend `openai` needs `base_url` and `model` in the `llm` resource config "
                "(e.g. base_url: https://api.openai.com/v1, model: gpt-4o-mini), with the key "
                f"in ${self.api_key_env}."
            )
        return to_domain(self, LLMSettings)

    def _local_settings(self) -> LLMSettings:
        """The started server's settings, with this resource's generation knobs; the
        transport knobs left unset take the local server's defaults (`LocalServer.settings`)."""
        from recsae_pipeline.interp.local_server import LocalServer, LocalServerError

        if self._server is None or not self._server.running:
            server = LocalServer(to_domain(self, ServerConfig))
            try:
                server.start()
            except LocalServerError as err:
                raise dg.Failure(f"LLM backend `local`: {err}") from err
            self._server = server
        transport = {"timeout_s", "max_retries", "max_concurrency"} & self.model_fields_set
        kept = ("temperature", "max_output_tokens", "price_per_1k_input", "price_per_1k_output")
        return self._server.settings(
            **{name: getattr(self, name) for name in (*kept, *sorted(transport))}
        )

    def close(self) -> None:
        """Stop the local server, if this resource started one."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        server = self._server
        self.close()
        if server is not None and context.log:
            context.log.info(
                f"llm: stopped the local server ({server.model}); log {server.log_path}"
            )

    def policy_factory(self) -> Callable[[], Any]:
        """A maker of fresh explainer policies (one per feature and method, so that usage
        and budgets count per explanation): `OfflinePolicy` or an `LLMPolicy` on its own chat."""
        if self.kind == "offline":
            from recsae_pipeline.interp.offline_policy import OfflinePolicy

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
