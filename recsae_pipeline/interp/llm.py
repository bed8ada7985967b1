"""Transport to an OpenAI-compatible chat endpoint: retries, timeouts, JSON replies, accounting.

Domain code without Dagster: the `LLM` resource builds an `OpenAIChat` from `LLMSettings`
and forwards this module's log lines. The API key is read from the environment variable
named in the settings and never appears in logs, errors, reprs, records or usage.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import openai
import pydantic
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)


class LLMSettings(BaseModel, frozen=True):
    """Where the endpoint is and how to talk to it; holds the key's variable name, not the key.

    Local servers (vLLM, Ollama, llama.cpp) accept any non-empty key: `export OPENAI_API_KEY=EMPTY`.
    """

    base_url: str = Field(description="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")
    model: str = Field(description="Model name as the server knows it.")
    api_key_env: str = Field(
        default="OPENAI_API_KEY", description="Name of the environment variable holding the key."
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Timeout of one HTTP request.")
    max_retries: int = Field(
        default=4, ge=0, description="Retries on 429, 5xx, timeouts and connection errors."
    )
    backoff_s: float = Field(
        default=1.0, ge=0, description="First retry delay; doubles each retry, with jitter."
    )
    max_backoff_s: float = Field(
        default=30.0, ge=0, description="Cap on one retry delay, `Retry-After` included."
    )
    max_concurrency: int = Field(default=4, ge=1, description="Requests in flight at once.")
    temperature: float | None = Field(default=0.0, description="None leaves the server default.")
    seed: int | None = None
    max_output_tokens: int = Field(default=800, ge=1)
    token_limit_param: Literal["max_tokens", "max_completion_tokens"] = Field(
        default="max_tokens",
        description="OpenAI reasoning models take only `max_completion_tokens`; most local "
        "servers take `max_tokens`.",
    )
    json_mode: bool = Field(
        default=True,
        description="Send response_format=json_object; turn off for servers that reject it.",
    )
    grammar: bool = Field(
        default=False,
        description="llama.cpp's server: constrain each reply by a GBNF grammar of its schema "
        "(strings bounded, no control characters; `local_server.json_grammar`), sent as "
        "`grammar` in the request body instead of response_format.",
    )
    retry_output_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Token limit of the corrective turn after a reply cut off at "
        "max_output_tokens; unset: twice max_output_tokens.",
    )
    price_per_1k_input: float = Field(default=0.0, ge=0, description="USD per 1000 prompt tokens.")
    price_per_1k_output: float = Field(
        default=0.0, ge=0, description="USD per 1000 completion tokens."
    )

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.price_per_1k_input + completion_tokens * self.price_per_1k_output
        ) / 1000.0


@dataclass
class CallRecord:
    """One `complete_json` call as it happened, for per-feature JSONL transcripts."""

    purpose: str
    model: str
    messages: list[dict[str, str]] = field(default_factory=list)
    """Every message of the last request sent, the corrective turn included."""
    replies: list[str] = field(default_factory=list)
    """Raw reply texts, one per billed request (two when a correction was needed)."""
    parsed: dict[str, Any] | None = None
    """The reply validated against the purpose's schema; None when no reply validated."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens as the server billed them, over every request of the call."""
    cost_usd: float = 0.0
    """From the tokens and the settings' prices per 1k tokens (0 for a local server)."""
    seconds: float = 0.0
    retries: int = 0
    """Requests repeated after a connection error, a timeout, a rate limit or a server error."""
    corrected: bool = False
    """True when a corrective turn (the schema error quoted back) was needed."""
    cut_off: int = 0
    """Replies that stopped at the token limit (finish_reason `length`)."""
    error: str | None = None
    """Why the call failed after its retries, or None."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_INT_TOTALS = ("calls", "retries", "corrections", "failures", "prompt_tokens", "completion_tokens")
_FLOAT_TOTALS = ("cost_usd", "seconds")


class Usage:
    """Running totals over calls; safe to update from several threads.

    `calls`, `retries`, the `corrections` (calls whose first reply failed the schema and
    needed a corrective turn), the `failures` (calls that ended in an LLMError; the explainer
    then concludes with what it knows), the billed `prompt_tokens`/`completion_tokens`,
    `cost_usd`, and `seconds` summed over calls (so more than wall time when calls overlap).
    """

    def __init__(self, **totals: float) -> None:
        unknown = sorted(set(totals) - set(_INT_TOTALS) - set(_FLOAT_TOTALS))
        if unknown:
            raise TypeError(f"Usage has no total {unknown[0]!r}")
        self._totals: dict[str, float] = {k: int(totals.get(k, 0)) for k in _INT_TOTALS}
        self._totals |= {k: float(totals.get(k, 0.0)) for k in _FLOAT_TOTALS}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> float:
        totals = self.__dict__.get("_totals", {})
        if name in totals:
            return totals[name]
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"Usage({', '.join(f'{k}={v}' for k, v in self.as_dict().items())})"

    def add(self, record: CallRecord) -> None:
        self.merge(
            Usage(
                calls=1,
                retries=record.retries,
                corrections=int(record.corrected),
                failures=int(record.error is not None),
                prompt_tokens=record.prompt_tokens,
                completion_tokens=record.completion_tokens,
                cost_usd=record.cost_usd,
                seconds=record.seconds,
            )  # fmt: skip
        )

    def as_dict(self) -> dict[str, int | float]:
        with self._lock:
            return dict(self._totals)

    def __add__(self, other: Usage) -> Usage:
        a, b = self.as_dict(), other.as_dict()
        return Usage(**{k: a[k] + b[k] for k in a})

    def merge(self, other: Usage) -> None:
        """Add `other`'s totals into this one in place."""
        b = other.as_dict()
        with self._lock:
            for k, v in b.items():
                self._totals[k] += v


class LLMError(RuntimeError):
    """Base of this module's errors; `record` holds what was sent and received, if anything."""

    def __init__(self, message: str, record: CallRecord | None = None) -> None:
        super().__init__(message)
        self.record = record


class LLMConfigError(LLMError):
    """The settings cannot work (missing key variable); nothing was sent."""


class LLMRequestError(LLMError):
    """The endpoint refused the request (4xx) or kept failing after every retry."""

    def __init__(
        self, message: str, record: CallRecord | None = None, status: int | None = None
    ) -> None:
        super().__init__(message, record)
        self.status = status


class LLMReplyError(LLMError):
    """The model's reply was not valid JSON for the schema, even after one correction."""


_STATUS_HINTS = {
    400: "the server rejected the request; if it names a parameter, adjust the settings "
    "(e.g. json_mode=False, token_limit_param, temperature=None)",
    401: "the key was refused; check the environment variable {key_env}",
    403: "the key lacks access to this model; check the variable {key_env} and `model`",
    404: "no such model or route; check `model` ({model}) and `base_url` ({base_url}; "
    "OpenAI-compatible servers usually end in /v1)",
    413: "the prompt is too large for the server; shorten it",
    422: "the server could not process the request; check `model` and the settings",
}


class OpenAIChat:
    """Chat completions with JSON replies validated by pydantic, through the `openai` package.

    Retries are done here, not in the client, so that each is counted and logged.
    """

    def __init__(self, settings: LLMSettings) -> None:
        key = os.environ.get(settings.api_key_env, "")
        if not key.strip():
            raise LLMConfigError(
                f"environment variable {settings.api_key_env} is unset or empty; export the API "
                f"key there (local servers such as vLLM or Ollama accept "
                f"`export {settings.api_key_env}=EMPTY`), or set `api_key_env` to another name."
            )
        if settings.grammar:
            _grammar(None)  # the converter is there, or a configuration error now
        self.settings = settings
        self.usage = Usage()
        self._secret = key
        self._slots = threading.BoundedSemaphore(settings.max_concurrency)
        self._client = openai.OpenAI(
            base_url=settings.base_url,
            api_key=key,
            timeout=settings.timeout_s,
            max_retries=0,
        )

    @property
    def name(self) -> str:
        return f"openai:{self.settings.model}"

    def close(self) -> None:
        """Release the HTTP connection pool."""
        self._client.close()

    def __repr__(self) -> str:
        s = self.settings
        return f"OpenAIChat(model={s.model!r}, base_url={s.base_url!r}, key_env={s.api_key_env!r})"

    def complete_json(
        self, messages: list[dict[str, str]], schema: type[T], purpose: str = ""
    ) -> tuple[T, CallRecord]:
        """Ask for one JSON object matching `schema`; one corrective turn if the reply is invalid.

        Raises `LLMRequestError` when the endpoint fails, `LLMReplyError` when both replies are
        invalid; either carries the `CallRecord` as `.record`.
        """
        record = CallRecord(purpose=purpose, model=self.settings.model)
        sent = _with_schema(messages, schema, sketch=self.settings.grammar)
        start = time.perf_counter()
        try:
            reply = self._reply(sent, record, schema)
            try:
                parsed = _parse(reply, schema)
            except ValueError as err:
                problem = self._redact(str(err))
                cut = record.cut_off > 0
                log.warning(
                    "%s%s: invalid reply (%s%s); asking once for a correction",
                    self.name,
                    _label(purpose),
                    "cut off at the token limit; " if cut else "",
                    _first_line(problem),
                )
                record.corrected = True
                sent = [
                    *sent,
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": _correction(problem, cut)},
                ]
                s = self.settings
                limit = (s.retry_output_tokens or 2 * s.max_output_tokens) if cut else None
                reply = self._reply(sent, record, schema, limit)
                try:
                    parsed = _parse(reply, schema)
                except ValueError as err2:
                    raise LLMReplyError(
                        f"{self.name}{_label(purpose)}: reply still invalid after one correction: "
                        f"{self._redact(str(err2))}",
                        record,
                    ) from None
            record.parsed = parsed.model_dump(mode="json")
            return parsed, record
        except Exception as err:
            record.error = self._redact(str(err)) or type(err).__name__
            raise
        finally:
            record.messages = [dict(m) for m in sent]
            record.seconds = time.perf_counter() - start
            self.usage.add(record)

    def _reply(
        self,
        messages: list[dict[str, str]],
        record: CallRecord,
        schema: type[BaseModel],
        max_tokens: int | None = None,
    ) -> str:
        """One billed reply (at most `max_tokens`, default the settings'), retrying transient
        failures; tokens and cost go into `record`."""
        s = self.settings
        kwargs: dict[str, Any] = {"model": s.model, "messages": messages}
        kwargs[s.token_limit_param] = max_tokens or s.max_output_tokens
        if s.temperature is not None:
            kwargs["temperature"] = s.temperature
        if s.seed is not None:
            kwargs["seed"] = s.seed
        if s.grammar:
            kwargs["extra_body"] = {"grammar": _grammar(schema)}
        elif s.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        label = _label(record.purpose)
        attempt = 0
        while True:
            try:
                with self._slots:
                    completion = self._client.chat.completions.create(**kwargs)
                return self._account(completion, record, kwargs[s.token_limit_param])
            except (openai.APIConnectionError, openai.APIStatusError) as err:
                status = getattr(err, "status_code", None)
                if isinstance(err, openai.APIStatusError) and not _retryable(err):
                    raise LLMRequestError(self._explain(err, label), record, status) from None
                reason = self._reason(err)
                if attempt == s.max_retries:
                    raise LLMRequestError(
                        f"{self.name}{label}: gave up after {attempt + 1} attempts; last: {reason}",
                        record,
                        status,
                    ) from None
                delay = self._backoff(attempt, err)
                attempt += 1
                record.retries += 1
                log.warning(
                    "%s%s: %s; retry %d of %d in %.2f s",
                    self.name,
                    label,
                    reason,
                    attempt,
                    s.max_retries,
                    delay,
                )
                time.sleep(delay)

    def _account(self, completion: Any, record: CallRecord, limit: int) -> str:
        usage = completion.usage
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        done = int(getattr(usage, "completion_tokens", 0) or 0)
        record.prompt_tokens += prompt
        record.completion_tokens += done
        record.cost_usd += self.settings.cost_usd(prompt, done)
        choice = completion.choices[0] if completion.choices else None
        text = self._redact((choice.message.content or "") if choice else "")
        record.replies.append(text)
        if choice is not None and choice.finish_reason == "length":
            record.cut_off += 1
            log.warning(
                "%s%s: reply cut off at %d tokens", self.name, _label(record.purpose), limit
            )
        return text

    def _backoff(self, attempt: int, err: Exception) -> float:
        """Exponential with jitter; a server's `Retry-After` wins; both capped."""
        s = self.settings
        response = getattr(err, "response", None)
        wait = _retry_after(response.headers) if response is not None else None
        if wait is None:
            wait = s.backoff_s * 2**attempt * random.uniform(0.5, 1.0)
        return max(0.0, min(wait, s.max_backoff_s))

    def _reason(self, err: Exception) -> str:
        if isinstance(err, openai.APITimeoutError):
            return f"no reply within timeout_s={self.settings.timeout_s:g}"
        if isinstance(err, openai.APIConnectionError):
            return f"connection to {self.settings.base_url} failed; is the server up?"
        assert isinstance(err, openai.APIStatusError)
        return f"HTTP {err.status_code}: {self._server_message(err)}"

    def _explain(self, err: openai.APIStatusError, label: str) -> str:
        s = self.settings
        hint = _STATUS_HINTS.get(err.status_code, "check the request settings")
        hint = hint.format(key_env=s.api_key_env, model=s.model, base_url=s.base_url)
        return f"{self.name}{label}: HTTP {err.status_code} ({self._server_message(err)}); {hint}"

    def _server_message(self, err: openai.APIStatusError) -> str:
        body = err.body
        message = body.get("message") if isinstance(body, dict) else body
        return self._redact(str(message or "no message")[:500])

    def _redact(self, text: str) -> str:
        # Servers may echo the key back (OpenAI's 401 does, masked); dummy keys are not secret.
        if len(self._secret) < 8:
            return text
        return text.replace(self._secret, "***")


def _retryable(err: openai.APIStatusError) -> bool:
    # 408 and 409 too, as the openai package itself retries them.
    return err.status_code in (408, 409, 429) or err.status_code >= 500


def _retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date), if present."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - datetime.now(UTC)).total_seconds()


def _with_schema(
    messages: list[dict[str, str]], schema: type[BaseModel], sketch: bool = False
) -> list[dict[str, str]]:
    """The messages with the JSON schema stated in the system prompt (added if missing); with
    `sketch`, only the reply's shape (`json_sketch`): a grammar enforces the rest, and a
    small model spends its prompt on the schema's text and copies its descriptions."""
    if sketch:
        shape = json_sketch(schema.model_json_schema())
        rule = f"Reply with exactly one JSON object and nothing else, shaped like this:\n{shape}"
    else:
        compact = json.dumps(schema.model_json_schema(), separators=(",", ":"))
        rule = (
            "Reply with exactly one JSON object and nothing else (no prose, no code fences). "
            f"It must validate against this JSON schema:\n{compact}"
        )
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{rule}"
    else:
        out.insert(0, {"role": "system", "content": rule})
    return out


def json_sketch(schema: dict[str, Any], node: dict[str, Any] | None = None) -> str:
    """A one-line shape of `schema`'s JSON: keys, nesting, enums, and a type word per value,
    e.g. `{"label": text, "tags": [text, ...], "kind": "a"|"b", "spec": {...}|null}`."""
    node = schema if node is None else node
    if "$ref" in node:
        return json_sketch(schema, schema["$defs"][node["$ref"].rsplit("/", 1)[-1]])
    if "enum" in node:
        return "|".join(json.dumps(v) for v in node["enum"])
    if "const" in node:
        return json.dumps(node["const"])
    for key in ("anyOf", "oneOf"):
        if key in node:
            return "|".join(json_sketch(schema, n) for n in node[key])
    kind = node.get("type")
    if kind == "object" or "properties" in node:
        fields = (
            f"{json.dumps(k)}: {json_sketch(schema, v)}"
            for k, v in node.get("properties", {}).items()
        )
        return "{" + ", ".join(fields) + "}"
    if kind == "array":
        return f"[{json_sketch(schema, node.get('items', {}))}, ...]"
    return {
        "string": "text",
        "integer": "integer",
        "number": "number",
        "boolean": "true|false",
        "null": "null",
    }.get(str(kind), "value")


def extract_json_object(text: str) -> dict[str, Any]:
    """The first JSON object in `text`, tolerating code fences and prose around it."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    raise ValueError(f"no JSON object found in the reply: {text[:200]!r}")


def _parse(text: str, schema: type[T]) -> T:
    """Validate the reply against `schema`; ValueError with a compact, quotable message."""
    obj = extract_json_object(text)
    try:
        return schema.model_validate(obj)
    except pydantic.ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}"
            for e in err.errors(include_url=False)
        )
        raise ValueError(f"JSON does not match the schema: {problems}") from None


def _correction(problem: str, cut: bool = False) -> str:
    if cut:
        return (
            "Your previous reply was cut off at the token limit before the JSON object was "
            f"complete ({problem}).\nReply again with only the complete JSON object, valid "
            "against the schema in the system message; keep every text field short."
        )
    return (
        f"Your previous reply was invalid: {problem}\n"
        "Reply again with only the corrected JSON object, valid against the schema in the "
        "system message."
    )


def _grammar(schema: type[BaseModel] | None) -> str:
    """The reply grammar of `schema` (None: only check that the converter loads)."""
    from recsae_pipeline.interp.local_server import (
        LocalServerError,
        grammar_converter,
        json_grammar,
    )

    try:
        return json_grammar(schema) if schema is not None else str(grammar_converter())
    except LocalServerError as err:
        raise LLMConfigError(f"grammar=True: {err}") from None


def _label(purpose: str) -> str:
    return f" [{purpose}]" if purpose else ""


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text
