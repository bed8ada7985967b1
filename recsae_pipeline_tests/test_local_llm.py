"""SAGE and the transport against a REAL language model: llama.cpp's server over the SmolLM2
GGUF (`local_server.py`, the `local-llm` extra). The faults a real server cannot be made to
produce on cue (429, timeouts, 401) stay with the loopback stub (test_llm.py).

Skips, naming what is missing, only when the extra is not installed; fails instead under
RECSAE_REQUIRE_LOCAL_LLM=1 (CI sets it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import dagster as dg
import pytest
from pydantic import BaseModel, Field

from recsae_pipeline.defs.resources import LLM
from recsae_pipeline.interp.llm import CallRecord, LLMReplyError, OpenAIChat
from recsae_pipeline.interp.llm_policy import GeneratedSequences, WindowPredictions
from recsae_pipeline.interp.local_server import (
    LocalServer,
    LocalServerError,
    ServerConfig,
    bounded_schema,
    json_grammar,
    missing_extra,
)
from recsae_pipeline.interp.replies import (
    ExperimentPlan,
    FinalReply,
    HypothesesReply,
    ReviewReply,
    VerdictReply,
)
from recsae_pipeline.interp.sage import Limits, Transcript, run_sage
from recsae_pipeline_tests.test_llm_policy import feature_context


def _require_extra() -> None:
    problem = missing_extra()
    if problem is None:
        return
    if os.environ.get("RECSAE_REQUIRE_LOCAL_LLM") == "1":
        pytest.fail(f"RECSAE_REQUIRE_LOCAL_LLM=1 but {problem}", pytrace=False)
    pytest.skip(f"the local LLM tests need the `local-llm` extra: {problem}")


@pytest.fixture(autouse=True)
def local_llm_extra() -> None:
    _require_extra()


THREADS = len(os.sched_getaffinity(0))
"""Every core for the server: the test process only waits on it (the pipeline's default is
half, beside training), and with OMP_WAIT_POLICY=PASSIVE a busy neighbour slows it without
the collapse of spinning workers."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    _require_extra()
    config = ServerConfig(n_threads=THREADS, log_dir=str(tmp_path_factory.mktemp("llm-logs")))
    with LocalServer(config) as running:
        yield running
    assert not running.running


ASK = [
    {"role": "system", "content": "You label latent features of a movie recommender."},
    {"role": "user", "content": "The feature fires on horror films of the 1980s. Label it."},
]


class Poem(BaseModel):
    title: str = Field(max_length=30)
    lines: list[Annotated[str, Field(max_length=40)]] = Field(min_length=2, max_length=2)


class Label(BaseModel):
    label: str = Field(max_length=40)


def _chat_ml(messages: list[dict[str, str]]) -> str:
    """The prompt as SmolLM2's chat template (ChatML, from the GGUF's metadata) renders it."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return f"{turns}<|im_start|>assistant\n"


def _count_tokens(server: LocalServer, text: str) -> int:
    url = server.base_url.removesuffix("/v1") + "/extras/tokenize/count"
    body = json.dumps({"input": text}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(json.loads(response.read())["count"])


def test_sage_runs_end_to_end_on_the_local_backend(tmp_path: Path) -> None:
    """The `llm` resource with backend local starts the server on first use, SAGE forms
    hypotheses, designs and runs an experiment on the real probe and concludes within its
    budget; tokens add up per call; teardown stops the server."""
    transcript = Transcript(tmp_path / "sage.jsonl")
    records: list[CallRecord] = []
    resource = LLM(backend="local", n_threads=THREADS, log_dir=str(tmp_path))
    with dg.build_resources({"llm": resource}) as built:
        llm: LLM = built.llm
        assert llm.server is None  # nothing started before an explainer asks
        policy = llm.policy_factory()()
        server = llm.server
        assert server is not None and server.running

        def on_call(record: CallRecord) -> None:
            records.append(record)
            transcript.write("llm_call", call=record.as_dict())

        policy.on_call = on_call
        explanation = run_sage(feature_context(), policy, Limits(max_llm_calls=2), transcript)
        transcript.close()
    assert not server.running and server.process is None

    assert explanation.backend == f"llm:openai:{server.model}"
    assert explanation.stopped_by == "budget: 2 LLM calls (max 2)"
    assert explanation.experiments == 1  # a designed experiment ran on the model and SAE
    assert [r.purpose for r in records] == [
        "sage hypotheses f3",
        "sage design f3 H1",
        "sage final f3",
    ]
    assert all(r.error is None and r.parsed is not None for r in records)
    assert 3 <= len(explanation.hypotheses) <= 5 and explanation.label
    usage = explanation.usage
    assert usage["calls"] == 3 and usage["failures"] == 0
    assert usage["prompt_tokens"] == sum(r.prompt_tokens for r in records) > 1000
    assert usage["completion_tokens"] == sum(r.completion_tokens for r in records) > 0
    events = [json.loads(line) for line in (tmp_path / "sage.jsonl").read_text().splitlines()]
    assert {"hypotheses", "design", "run", "final", "llm_call"} <= {e["state"] for e in events}
    assert server.log_path is not None and server.log_path.parent == tmp_path


def test_token_accounting_is_the_servers(server: LocalServer) -> None:
    """prompt_tokens is the templated prompt's token count (tokenized by the same server);
    a reply cut at the limit bills exactly the limit."""
    chat = OpenAIChat(server.settings(max_output_tokens=6, retry_output_tokens=6))
    with pytest.raises(LLMReplyError, match="still invalid after one correction") as info:
        chat.complete_json(ASK, FinalReply, purpose="accounting")
    record = info.value.record
    assert record is not None and record.cut_off == 2 and record.corrected
    first_prompt = record.messages[:2]  # the system prompt with the reply's shape, the ask
    corrective_prompt = record.messages
    expected = _count_tokens(server, _chat_ml(first_prompt)) + _count_tokens(
        server, _chat_ml(corrective_prompt)
    )
    assert record.prompt_tokens == expected
    assert record.completion_tokens == 6 + 6
    assert chat.usage.as_dict()["completion_tokens"] == 12 and chat.usage.failures == 1


def test_a_cut_reply_is_recovered_with_a_larger_limit(server: LocalServer) -> None:
    """A tiny max_output_tokens cuts the JSON; the corrective turn says so and gets
    retry_output_tokens, and its reply validates."""
    chat = OpenAIChat(server.settings(max_output_tokens=8, retry_output_tokens=300))
    reply, record = chat.complete_json(ASK, FinalReply, purpose="cut")
    assert record.cut_off == 1 and record.corrected and len(record.replies) == 2
    with pytest.raises(json.JSONDecodeError):
        json.loads(record.replies[0])
    assert "cut off at the token limit" in record.messages[-1]["content"]
    assert FinalReply.model_validate_json(record.replies[1]) == reply
    assert record.completion_tokens > 8 and chat.usage.corrections == 1


def test_grammar_keeps_strings_bounded_and_free_of_control_characters(
    server: LocalServer,
) -> None:
    """A prompt that invites line breaks and a long title: strict `json.loads` accepts every
    reply, and no string outruns its maxLength."""
    grammar = json_grammar(Poem)
    assert r'char ::= [^"\\\x7F\x00-\x1F]' in grammar and "char*" not in grammar
    ask = [
        {"role": "user", "content": "Write a long poem about horror films, with line breaks "
         "and tabs inside each line, and a very long title of at least 80 characters."},
    ]  # fmt: skip
    for seed in (1, 2, 3):
        chat = OpenAIChat(server.settings(max_output_tokens=100, seed=seed, temperature=0.8))
        poem, record = chat.complete_json(ask, Poem, purpose=f"poem {seed}")
        assert record.cut_off == 0 and not record.corrected  # the bounds end the reply
        json.loads(record.replies[0], strict=True)  # no raw control characters
        assert len(poem.title) <= 30 and all(len(line) <= 40 for line in poem.lines)


def test_two_concurrent_requests_are_both_served(server: LocalServer) -> None:
    """The server runs one request at a time: the second waits (not cut off, not refused).
    Two genres, so that neither request finds the other's prompt in the cache."""
    results: dict[int, tuple[int, CallRecord, float, float]] = {}

    def messages(k: int) -> list[dict[str, str]]:
        genre = ("horror", "western")[k]
        return [ASK[0], {"role": "user", "content": f"It fires on {genre} films. Label it."}]

    def ask(k: int) -> None:
        chat = OpenAIChat(server.settings(max_output_tokens=60))
        started = time.perf_counter()
        _, record = chat.complete_json(messages(k), Label, purpose=f"concurrent {k}")
        results[k] = (k, record, started, time.perf_counter())

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1]
    (_, first, s0, e0), (later, second, s1, e1) = sorted(results.values(), key=lambda r: r[3])
    assert first.retries == second.retries == 0 and not (first.corrected or second.corrected)
    assert first.cut_off == second.cut_off == 0 and first.error is second.error is None
    assert abs(s0 - s1) < 1.0  # both were in flight at once...
    # ...and the later one was served after the first, not beside it: it ended at least half
    # its own solo time after the first ended (served side by side, both would end together;
    # the solo rerun finds its prompt cached, so it is if anything quicker than its turn was)
    chat = OpenAIChat(server.settings(max_output_tokens=60))
    started = time.perf_counter()
    chat.complete_json(messages(later), Label, purpose="solo")
    assert e1 - e0 >= 0.5 * (time.perf_counter() - started)


def test_startup_failure_names_the_log_and_leaves_no_process(tmp_path: Path) -> None:
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    server = LocalServer(ServerConfig(gguf=str(bogus), log_dir=str(tmp_path)))
    with pytest.raises(LocalServerError, match="exited with code") as info:
        server.start()
    assert str(server.log_path) in str(info.value) and "broken.gguf" in str(info.value)
    assert server.process is None and not server.running

    slow = LocalServer(ServerConfig(startup_timeout_s=0.05, log_dir=str(tmp_path)))
    with pytest.raises(LocalServerError, match="raise it, or check the log"):
        slow.start()
    assert slow.process is None


def test_the_server_dies_with_its_parent(tmp_path: Path) -> None:
    """A parent killed with SIGKILL runs no cleanup; the server's watchdog ends it anyway."""
    script = textwrap.dedent(
        f"""
        import time
        from recsae_pipeline.interp.local_server import LocalServer, ServerConfig
        server = LocalServer(ServerConfig(log_dir={str(tmp_path)!r})).start()
        print(server.process.pid, flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # running
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), f"the server (pid {child}) outlived its parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_llm_serve_prints_the_base_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    serve = subprocess.Popen(
        [sys.executable, "-m", "recsae_pipeline.cli", "llm", "serve", "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert serve.stdout is not None
        base_url = serve.stdout.readline().strip()
        with urllib.request.urlopen(f"{base_url}/models", timeout=10) as response:
            assert "SmolLM2" in response.read().decode()
    finally:
        serve.terminate()
        serve.wait(30)
    assert serve.returncode == 0
    log = next(tmp_path.glob("llama-server-*.log"))
    port = int(log.stem.rsplit("-", 1)[1])
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)


def test_reply_grammars_bound_every_string_and_array() -> None:
    """No unbounded repetition (`*`, `+`) in any reply's grammar, so no reply runs on to the
    token limit by the grammar's leave; enums stay enums; what it admits validates."""
    for schema in (HypothesesReply, ExperimentPlan, VerdictReply, ReviewReply, FinalReply,
                   GeneratedSequences, WindowPredictions):  # fmt: skip
        grammar = json_grammar(schema)
        rules = [line.split(" ::= ", 1)[1] for line in grammar.splitlines()]
        assert not any(re.search(r"[)\]a-z]\s*[*+]", rule) for rule in rules), schema.__name__
    assert '"\\"positive\\"" | "\\"negative_control\\""' in json_grammar(HypothesesReply)
    plan = bounded_schema(ExperimentPlan.model_json_schema())
    assert (
        plan["properties"]["sequences"] | {"maxItems": 12, "minItems": 2}
        == plan["properties"]["sequences"]
    )
