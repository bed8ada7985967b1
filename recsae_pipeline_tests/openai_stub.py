"""A real OpenAI-compatible chat server on loopback, scripted per request, for tests.

    with OpenAIStub() as stub:
        stub.script(stub.fail(429, retry_after="0.1"), stub.reply('{"a": 1}'))
        ... OpenAIChat(LLMSettings(base_url=stub.base_url, model="stub", ...)) ...

Scripted behaviours are served in order; when the queue is empty, `responder(request_json)`
writes the reply (by default it echoes the last user message).
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

Responder = Callable[[dict[str, Any]], str]


@dataclass(frozen=True)
class Reply:
    """A 200 chat completion with `content`; tokens default to about 4 characters per token."""

    content: str
    delay_s: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str = "stop"


@dataclass(frozen=True)
class Fail:
    """An error status with an OpenAI-style error body and an optional `Retry-After`."""

    status: int
    message: str = "scripted failure"
    retry_after: str | None = None


@dataclass(frozen=True)
class Hang:
    """Sleep `seconds` before replying (longer than the client timeout, to provoke one)."""

    seconds: float
    then: Reply | None = None


Behaviour = Reply | Fail | Hang


@dataclass(frozen=True)
class SeenRequest:
    """One request as the server received it; the key's value is deliberately not kept."""

    path: str
    body: dict[str, Any]
    authorized: bool
    """Whether an `Authorization: Bearer <non-empty>` header came with it."""


def echo_last_user(request: dict[str, Any]) -> str:
    """Default responder: the content of the last user message."""
    users = [m for m in request.get("messages", []) if m.get("role") == "user"]
    return str(users[-1].get("content", "")) if users else ""


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


class OpenAIStub:
    """`POST /v1/chat/completions` on 127.0.0.1 at a free port, in a background thread."""

    def __init__(self, responder: Responder = echo_last_user, model: str = "stub-model") -> None:
        self.responder = responder
        self.model = model
        self.requests: list[SeenRequest] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._queue: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Constructors, so tests read `stub.fail(429)` without importing the dataclasses.
    reply = staticmethod(Reply)
    fail = staticmethod(Fail)
    hang = staticmethod(Hang)

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, in order."""
        with self._lock:
            self._queue.extend(behaviours)

    @property
    def pending(self) -> int:
        """Scripted behaviours not yet served."""
        with self._lock:
            return len(self._queue)

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("OpenAIStub is not running; use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> OpenAIStub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes handlers sleeping in a Hang
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next(self) -> Behaviour | None:
        with self._lock:
            return self._queue.popleft() if self._queue else None

    def _enter(self, seen: SeenRequest) -> None:
        with self._lock:
            self.requests.append(seen)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def completion(self, request: dict[str, Any], reply: Reply) -> dict[str, Any]:
        """The JSON body of a chat completion, with a `usage` block."""
        prompt_text = "".join(str(m.get("content", "")) for m in request.get("messages", []))
        prompt = reply.prompt_tokens if reply.prompt_tokens is not None else _tokens(prompt_text)
        done = (
            reply.completion_tokens
            if reply.completion_tokens is not None
            else _tokens(reply.content)
        )
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", self.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.content},
                    "finish_reason": reply.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": done,
                "total_tokens": prompt + done,
            },
        }


def _handler_for(stub: OpenAIStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet, and never echo headers

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, _error(f"no route {self.path}", "not_found"))
                return
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                self._send(400, _error("request body is not JSON", "invalid_request_error"))
                return
            auth = self.headers.get("Authorization", "")
            seen = SeenRequest(self.path, body, auth.startswith("Bearer ") and len(auth) > 7)
            stub._enter(seen)
            try:
                self._serve(body, stub._next())
            finally:
                stub._leave()

        def _serve(self, body: dict[str, Any], behaviour: Behaviour | None) -> None:
            if isinstance(behaviour, Fail):
                headers = {"Retry-After": behaviour.retry_after} if behaviour.retry_after else {}
                kind = "rate_limit_exceeded" if behaviour.status == 429 else "server_error"
                self._send(behaviour.status, _error(behaviour.message, kind), headers)
                return
            if isinstance(behaviour, Hang):
                if stub._stop.wait(behaviour.seconds):
                    return
                behaviour = behaviour.then
            if behaviour is None:
                behaviour = Reply(stub.responder(body))
            if behaviour.delay_s and stub._stop.wait(behaviour.delay_s):
                return
            self._send(200, stub.completion(body, behaviour))

        def _send(
            self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout); nothing to tell it

    return Handler


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


@pytest.fixture(name="openai_stub")
def openai_stub_fixture() -> Iterator[OpenAIStub]:
    """A running stub as fixture `openai_stub`: `from ...openai_stub import openai_stub_fixture`."""
    with OpenAIStub() as stub:
        yield stub
