"""The `openai` transport through the real `openai` client against a loopback stub server."""

from __future__ import annotations

import json
import logging
import socket
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import BaseModel, Field

from recsae_pipeline.interp.llm import (
    LLMConfigError,
    LLMReplyError,
    LLMRequestError,
    LLMSettings,
    OpenAIChat,
    Usage,
    extract_json_object,
)
from recsae_pipeline_tests.openai_stub import OpenAIStub, openai_stub_fixture  # noqa: F401

KEY_ENV = "RECSAE_TEST_LLM_KEY"
KEY = "sk-test-DO-NOT-LEAK-7f3a9c21e5b84d06"
GOOD = '{"label": "jazz", "confidence": 0.9}'
ASK = [{"role": "user", "content": "Name the genre."}]


class Verdict(BaseModel):
    label: str
    confidence: float = Field(ge=0, le=1)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def chat_for(stub: OpenAIStub, **overrides: object) -> OpenAIChat:
    knobs: dict[str, object] = {
        "base_url": stub.base_url,
        "model": "stub-model",
        "api_key_env": KEY_ENV,
        "timeout_s": 5.0,
        "backoff_s": 0.001,
        "max_backoff_s": 0.05,
    }
    return OpenAIChat(LLMSettings(**(knobs | overrides)))


def test_reply_is_parsed_and_tokens_and_cost_are_counted(openai_stub: OpenAIStub) -> None:
    openai_stub.script(
        openai_stub.reply(
            f"Sure, here it is:\n```json\n{GOOD}\n```", prompt_tokens=1000, completion_tokens=500
        )
    )
    chat = chat_for(openai_stub, price_per_1k_input=0.5, price_per_1k_output=1.5, seed=7)
    messages = [{"role": "system", "content": "You explain features."}, *ASK]
    verdict, record = chat.complete_json(messages, Verdict, purpose="feature 3")

    assert verdict == Verdict(label="jazz", confidence=0.9)
    assert chat.name == "openai:stub-model"
    assert (record.prompt_tokens, record.completion_tokens) == (1000, 500)
    assert record.cost_usd == pytest.approx(1.25)
    assert record.parsed == {"label": "jazz", "confidence": 0.9}
    assert record.retries == 0 and record.error is None and not record.corrected
    assert chat.usage.as_dict() | {"seconds": 0} == {
        "calls": 1,
        "retries": 0,
        "corrections": 0,
        "failures": 0,
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        "cost_usd": pytest.approx(1.25),
        "seconds": 0,
    }
    json.dumps(record.as_dict())  # transcripts are JSONL

    (seen,) = openai_stub.requests
    assert seen.authorized
    body = seen.body
    assert body["model"] == "stub-model"
    assert body["response_format"] == {"type": "json_object"}
    assert (body["temperature"], body["seed"], body["max_tokens"]) == (0.0, 7, 800)
    system = body["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("You explain features.")
    assert '"confidence":{' in system["content"]  # the compact JSON schema
    assert body["messages"][1:] == ASK
    assert record.messages == body["messages"]


def test_json_mode_off_omits_response_format_and_adds_system_prompt(
    openai_stub: OpenAIStub,
) -> None:
    openai_stub.script(openai_stub.reply(GOOD))
    chat_for(openai_stub, json_mode=False, temperature=None).complete_json(ASK, Verdict)
    body = openai_stub.requests[0].body
    assert "response_format" not in body and "temperature" not in body
    assert (
        body["messages"][0]["role"] == "system" and "JSON schema" in body["messages"][0]["content"]
    )


def test_429_is_retried_after_retry_after(
    openai_stub: OpenAIStub, caplog: pytest.LogCaptureFixture
) -> None:
    openai_stub.script(openai_stub.fail(429, retry_after="0.3"), openai_stub.reply(GOOD))
    chat = chat_for(openai_stub, max_backoff_s=5.0)
    with caplog.at_level(logging.WARNING, logger="recsae_pipeline.interp.llm"):
        _, record = chat.complete_json(ASK, Verdict, purpose="p")
    assert record.retries == 1 and chat.usage.retries == 1
    assert len(openai_stub.requests) == 2
    assert any(
        "HTTP 429" in r.getMessage() and "retry 1 of 4 in 0.30 s" in r.getMessage()
        for r in caplog.records
    )


def test_retry_after_is_capped(openai_stub: OpenAIStub, caplog: pytest.LogCaptureFixture) -> None:
    openai_stub.script(openai_stub.fail(429, retry_after="120"), openai_stub.reply(GOOD))
    with caplog.at_level(logging.WARNING, logger="recsae_pipeline.interp.llm"):
        chat_for(openai_stub, max_backoff_s=0.05).complete_json(ASK, Verdict)
    assert any("retry 1 of 4 in 0.05 s" in r.getMessage() for r in caplog.records)


def test_500_then_success(openai_stub: OpenAIStub) -> None:
    openai_stub.script(openai_stub.fail(500), openai_stub.reply(GOOD))
    verdict, record = chat_for(openai_stub).complete_json(ASK, Verdict)
    assert verdict.label == "jazz" and record.retries == 1


def test_timeout_then_success(openai_stub: OpenAIStub, caplog: pytest.LogCaptureFixture) -> None:
    openai_stub.script(openai_stub.hang(2.0), openai_stub.reply(GOOD))
    chat = chat_for(openai_stub, timeout_s=0.5)
    with caplog.at_level(logging.WARNING, logger="recsae_pipeline.interp.llm"):
        verdict, record = chat.complete_json(ASK, Verdict)
    assert verdict.label == "jazz" and record.retries == 1
    assert any("timeout_s=0.5" in r.getMessage() for r in caplog.records)


def test_retries_run_out(openai_stub: OpenAIStub) -> None:
    openai_stub.script(*[openai_stub.fail(503)] * 3, openai_stub.reply(GOOD))
    chat = chat_for(openai_stub, max_retries=2)
    with pytest.raises(LLMRequestError, match="gave up after 3 attempts; last: HTTP 503") as info:
        chat.complete_json(ASK, Verdict)
    assert info.value.record is not None and info.value.record.retries == 2
    assert chat.usage.failures == 1 and openai_stub.pending == 1


def test_unreachable_server_is_reported() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = LLMSettings(
        base_url=f"http://127.0.0.1:{port}/v1",
        model="m",
        api_key_env=KEY_ENV,
        max_retries=1,
        backoff_s=0.001,
    )
    with pytest.raises(LLMRequestError, match=f"connection to http://127.0.0.1:{port}/v1 failed"):
        OpenAIChat(settings).complete_json(ASK, Verdict)


@pytest.mark.parametrize(
    ("bad", "quoted"),
    [
        ("I think it is jazz.", "no JSON object found"),
        ('{"label": "jazz", "confidence": "very"}', "confidence: Input should be a valid number"),
    ],
)
def test_malformed_reply_gets_one_correction(
    openai_stub: OpenAIStub, bad: str, quoted: str
) -> None:
    openai_stub.script(
        openai_stub.reply(bad, prompt_tokens=10, completion_tokens=5),
        openai_stub.reply(GOOD, prompt_tokens=20, completion_tokens=6),
    )
    chat = chat_for(openai_stub)
    verdict, record = chat.complete_json(ASK, Verdict)

    assert verdict.confidence == 0.9
    assert record.corrected and record.replies == [bad, GOOD]
    assert (record.prompt_tokens, record.completion_tokens) == (30, 11)
    first, second = (r.body["messages"] for r in openai_stub.requests)
    assert second[: len(first)] == first
    assert second[-2] == {"role": "assistant", "content": bad}
    assert second[-1]["role"] == "user" and quoted in second[-1]["content"]
    assert record.messages == second and chat.usage.corrections == 1


def test_two_malformed_replies_raise(openai_stub: OpenAIStub) -> None:
    openai_stub.script(openai_stub.reply("nope"), openai_stub.reply('{"label": "jazz"}'))
    chat = chat_for(openai_stub)
    with pytest.raises(LLMReplyError, match="confidence: Field required") as info:
        chat.complete_json(ASK, Verdict, purpose="feature 9")
    record = info.value.record
    assert record is not None and record.replies == ["nope", '{"label": "jazz"}']
    assert record.parsed is None and "feature 9" in (record.error or "")
    assert chat.usage.failures == 1 and len(openai_stub.requests) == 2


def test_401_fails_at_once_naming_the_key_variable(openai_stub: OpenAIStub) -> None:
    openai_stub.script(openai_stub.fail(401, "Incorrect API key provided"), openai_stub.reply(GOOD))
    with pytest.raises(LLMRequestError, match=f"HTTP 401.*{KEY_ENV}") as info:
        chat_for(openai_stub).complete_json(ASK, Verdict)
    assert info.value.status == 401 and info.value.record.retries == 0
    assert len(openai_stub.requests) == 1 and openai_stub.pending == 1


def test_404_names_model_and_base_url(openai_stub: OpenAIStub) -> None:
    openai_stub.script(openai_stub.fail(404, "model not found"))
    with pytest.raises(LLMRequestError, match="check `model` \\(stub-model\\) and `base_url`"):
        chat_for(openai_stub).complete_json(ASK, Verdict)
    assert len(openai_stub.requests) == 1


def test_missing_key_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    settings = LLMSettings(base_url="http://127.0.0.1:1/v1", model="m", api_key_env=KEY_ENV)
    with pytest.raises(LLMConfigError, match=f"{KEY_ENV} is unset.*=EMPTY"):
        OpenAIChat(settings)


def test_concurrency_limit_holds_across_threads(openai_stub: OpenAIStub) -> None:
    openai_stub.script(*[openai_stub.reply(GOOD, delay_s=0.15)] * 8)
    chat = chat_for(openai_stub, max_concurrency=2)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: chat.complete_json(ASK, Verdict, f"t{i}"), range(8)))
    assert len(results) == 8 and chat.usage.calls == 8
    assert openai_stub.max_in_flight == 2


def test_key_never_leaks(openai_stub: OpenAIStub, caplog: pytest.LogCaptureFixture) -> None:
    leaky = f"Incorrect API key provided: {KEY}"  # servers may echo the key back
    openai_stub.script(
        openai_stub.fail(429, leaky),
        openai_stub.fail(500, leaky),
        openai_stub.reply(f"not json {KEY}"),
        openai_stub.reply(f'{{"label": "{KEY}"}}'),
        openai_stub.fail(401, leaky),
    )
    chat = chat_for(openai_stub)
    errors: list[BaseException] = []
    with caplog.at_level(logging.DEBUG):
        for _ in range(2):
            try:
                chat.complete_json(ASK, Verdict, purpose="leak check")
            except (LLMReplyError, LLMRequestError) as err:
                errors.append(err)
    assert [type(e) for e in errors] == [LLMReplyError, LLMRequestError]
    assert all(r.authorized for r in openai_stub.requests)  # the key was really sent

    texts = [r.getMessage() for r in caplog.records] + [caplog.text]
    texts += [repr(chat), repr(chat.settings), repr(chat.usage), json.dumps(chat.usage.as_dict())]
    for err in errors:
        texts += [str(err), repr(err), "".join(traceback.format_exception(err))]
        texts.append(json.dumps(err.record.as_dict()))
    assert caplog.records
    assert [t for t in texts if KEY in t] == []


def test_usage_adds_and_merges_thread_safely() -> None:
    a, b = Usage(calls=1, prompt_tokens=10, cost_usd=0.5), Usage(calls=2, retries=1)
    both = a + b
    assert (both.calls, both.retries, both.prompt_tokens, both.cost_usd) == (3, 1, 10, 0.5)
    total = Usage()
    threads = [
        threading.Thread(target=lambda: [total.merge(b) for _ in range(500)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (total.calls, total.retries) == (4000, 2000)


def test_extract_json_object_tolerates_fences_and_prose() -> None:
    text = 'Use {braces} wisely. ```json\n{"a": {"b": "}"}, "c": [1]}\n``` done {"d": 2}'
    assert extract_json_object(text) == {"a": {"b": "}"}, "c": [1]}
    with pytest.raises(ValueError, match="no JSON object"):
        extract_json_object("[1, 2]")
