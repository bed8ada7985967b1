"""The LLM policy and scorer drive the real SAGE loop through the `openai` client against a
loopback stub that answers each state's prompt with scripted JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from recsae_pipeline.data.catalog import Catalog, Item
from recsae_pipeline.interp.exemplars import Exemplars
from recsae_pipeline.interp.experiments import FeatureContext
from recsae_pipeline.interp.llm import CallRecord, LLMSettings, OpenAIChat
from recsae_pipeline.interp.llm_policy import (
    LLMPolicy,
    LLMScorer,
    exemplar_evidence,
    vocabulary_items,
)
from recsae_pipeline.interp.probe import FeatureProbe
from recsae_pipeline.interp.replies import State
from recsae_pipeline.interp.sage import Limits, Transcript, run_baseline, run_sage
from recsae_pipeline.interp.scoring import ScoringSet, score_explanation
from recsae_pipeline.interp.windows import Window
from recsae_pipeline.models.recommender import Recommender, RecommenderConfig
from recsae_pipeline.sae.model import SaeConfig, TopKSae
from recsae_pipeline_tests.openai_stub import OpenAIStub

KEY_ENV = "RECSAE_TEST_LLM_POLICY_KEY"
FINAL_LABEL = "Horror films, strongest on a sequel after its predecessor"
BASELINE_LABEL = "horror movies"
BOGUS_TITLE = "Nonexistent Movie (2099)"

MOVIES = [  # idx, title, year, genres, band, franchise, installment
    (1, "Halloween", 1978, ("Horror",), "head", "Halloween", 1),
    (2, "Halloween II", 1981, ("Horror",), "torso", "Halloween", 2),
    (3, "Scream", 1996, ("Horror", "Thriller"), "head", "Scream", 1),
    (4, "Scream 2", 1997, ("Horror", "Thriller"), "torso", "Scream", 2),
    (5, "The Shining", 1980, ("Horror",), "head", None, None),
    (6, "Airplane!", 1980, ("Comedy",), "head", None, None),
    (7, "Groundhog Day", 1993, ("Comedy", "Romance"), "head", None, None),
    (8, "Clue", 1985, ("Comedy", "Mystery"), "tail", None, None),
    (9, "Casablanca", 1942, ("Drama", "Romance"), "torso", None, None),
    (10, "Heat", 1995, ("Action", "Crime"), "torso", None, None),
    (11, "Brazil", 1985, ("Comedy", "Sci-Fi"), "tail", None, None),
    (12, "Ran", 1985, ("Drama", "War"), "tail", None, None),
]
# Distinctive activations, so a prompt that leaks them is caught.
EXEMPLARS = [
    Window(2, 3, 0, (6, 1, 5, 2, 7), (0.0, 0.4127, 0.6543, 0.8731, 0.0)),
    Window(4, 2, 0, (9, 3, 4, 8), (0.0, 0.3317, 0.7919, 0.0)),
    Window(6, 1, 0, (5, 1, 12), (0.1234, 0.6612, 0.0)),
]
HELD_OUT_ACTIVE = [
    Window(1, 2, 0, (3, 4, 9, 10), (0.2871, 0.9172, 0.0, 0.0)),
    Window(3, 1, 0, (1, 2, 6), (0.0, 0.5813, 0.0)),
    Window(5, 0, 0, (5, 7, 8, 11, 12), (0.7461, 0.0, 0.0, 0.0, 0.0)),
]
HELD_OUT_SILENT = [
    Window(7 + 2 * k, 1, 0, (6 + k % 5, 7 + k % 5, 8), (0.0, 0.0, 0.0)) for k in range(9)
]


def catalog() -> Catalog:
    rank = {1: 1, 3: 2, 5: 3, 6: 4, 7: 5, 2: 6, 4: 7, 9: 8, 10: 9, 8: 10, 11: 11, 12: 12}
    return Catalog(
        items={
            idx: Item(idx, f"m{idx}", title, year, genres, band, rank[idx], franchise, part)
            for idx, title, year, genres, band, franchise, part in MOVIES
        }
    )


def feature_context() -> FeatureContext:
    torch.manual_seed(0)
    config = RecommenderConfig(
        kind="sasrec", num_items=12, hidden_size=8, d_item=8, num_layers=2, num_heads=1, max_len=8
    )
    model = Recommender(config).eval()
    sae = TopKSae(SaeConfig(d_in=8, expansion=2, k=2), "cpu", seed=0).eval()
    cat = catalog()
    peaks = [cat[w.items[w.peak_offset]] for w in EXEMPLARS]
    attributes = [a for item in peaks for a in item.attributes()]
    shares = {a: attributes.count(a) / len(peaks) for a in set(attributes)}
    exemplars = Exemplars(
        windows=EXEMPLARS,
        scale=float(np.mean([w.peak for w in EXEMPLARS])),
        attribute_shares=shares,
        base_rates=cat.base_rates,
        context={"share_after_2plus_same_genre": 0.67, "share_sequel_after_predecessor": 0.67},
    )
    probe = FeatureProbe(model, sae, layer=1)
    prefixes = [[9, 10, 12], [6, 8], [7, 11, 9, 10]]
    # `data` stays None: neither the loop nor the scorer reads stored activations.
    return FeatureContext(3, cat, probe, None, exemplars, seed=0, prefixes=prefixes)  # type: ignore[arg-type]


def scoring_set(ctx: FeatureContext) -> ScoringSet:
    scale = ctx.exemplars.scale
    return ScoringSet(
        ctx.catalog, scale, 0.5 * scale, HELD_OUT_ACTIVE, HELD_OUT_SILENT, [[9, 10], [6, 12, 8]]
    )


# ----------------------------------------------------------------------------- the scripted LLM


def _schema_title(request: dict[str, Any]) -> str:
    system = request["messages"][0]["content"]
    return re.findall(r'"title":"(\w+)","type":"object"\}$', system)[0]


def _section(prompt: str, heading: str) -> str:
    return next((s for s in prompt.split("\n\n") if s.startswith(heading)), "")


def _listed_titles(section: str) -> list[tuple[str, str]]:
    """(exact `Title (Year)`, genres) of the `[id N] Title (Year) [Genres]` lines."""
    return re.findall(r"\[id \d+\] (.+?\(\d{4}\)) \[([^\]]*)\]", section)


def _design(prompt: str) -> dict[str, Any]:
    matching = _listed_titles(
        _section(prompt, "Items matching") or _section(prompt, "The hypothesis names")
    )
    controls = _listed_titles(_section(prompt, "Popularity-matched")) or matching
    history = _section(prompt, "Real user histories").splitlines()[1]
    prefix = history.split(": ", 1)[1].split(" | ")  # titles, resolved by the harness
    sequences = []
    for (high, _), (low, _) in zip(matching[:3], controls[:3], strict=False):
        sequences += [
            {"items": [*prefix, high], "target_position": -1, "expect": "high"},
            {"items": [*prefix, low], "target_position": len(prefix), "expect": "low"},
        ]
    return {"description": "matching target vs popularity-matched control", "sequences": sequences}


def _verdict(prompt: str) -> dict[str, Any]:
    header = prompt.splitlines()[0]
    if header.startswith("Hypothesis H2") and "status pending" in header:
        return {
            "analysis": "popular non-horror controls stay at 1/10; only horror fires",
            "verdict": "refined",
            "refined_text": "fires on popular Horror films",
            "refined_spec": {"genre": "Horror", "popularity": "head"},
        }
    if header.startswith("Hypothesis H2"):
        return {"analysis": "no separation from the controls", "verdict": "refuted"}
    return {"analysis": "matching targets high, controls silent", "verdict": "confirmed"}


def _generate(request: dict[str, Any], prompt: str) -> dict[str, Any]:
    n = int(re.search(r"write (\d+) different", request["messages"][0]["content"]).group(1))
    horror = [t for t, genres in _listed_titles(prompt) if "Horror" in genres]
    history = _section(prompt, "Real user histories").splitlines()[1].split(": ", 1)[1]
    sequences = [
        {"items": [*history.split(" | "), horror[k % len(horror)]], "target_position": -1}
        for k in range(n - 1)
    ]
    return {"sequences": [*sequences, {"items": [BOGUS_TITLE], "target_position": 0}]}


def _predict(prompt: str) -> dict[str, Any]:
    windows = []
    for block in prompt.split("\n\n")[1:]:
        number = int(re.match(r"Window (\d+) ", block).group(1))
        values = [8 if "Horror" in line else 0 for line in block.splitlines()[1:]]
        if number == 1:
            values = values[:-1]  # one value short: the scorer pads it
        windows.append({"window": number, "activations": values})
    return {"windows": windows}


def responder(request: dict[str, Any]) -> str:
    """Valid JSON for whichever state's schema the system prompt states."""
    prompt = request["messages"][1]["content"]
    reply: dict[str, Any]
    match _schema_title(request):
        case "HypothesesReply":
            reply = {
                "observation": "peaks sit on horror films, twice on a sequel",
                "hypotheses": [
                    {"text": "fires on Horror films", "kind": "positive",
                     "spec": {"genre": "Horror"}},
                    {"text": "fires on popular films", "kind": "positive", "spec": None},
                    {"text": "stays low on Comedy films", "kind": "negative_control",
                     "spec": {"genre": "Comedy"}},
                ],
            }  # fmt: skip
        case "ExperimentPlan":
            reply = _design(prompt)
        case "VerdictReply":
            reply = _verdict(prompt)
        case "ReviewReply":
            reply = {"summary": "H1 and H3 hold; H2 fell", "need_more_testing": False}
        case "FinalReply" if "without running experiments" in request["messages"][0]["content"]:
            reply = {"label": BASELINE_LABEL, "description": "Horror titles."}
        case "FinalReply":
            reply = {
                "label": FINAL_LABEL,
                "description": "Fires on Horror films; silent on Comedy.",
            }
        case "GeneratedSequences":
            reply = _generate(request, prompt)
        case "WindowPredictions":
            reply = _predict(prompt)
    return json.dumps(reply)


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIStub]:
    monkeypatch.setenv(KEY_ENV, "EMPTY")
    with OpenAIStub(responder) as server:
        yield server


def chat_for(stub: OpenAIStub) -> OpenAIChat:
    return OpenAIChat(
        LLMSettings(
            base_url=stub.base_url, model="stub-model", api_key_env=KEY_ENV, timeout_s=1.0,
            backoff_s=0.001, max_backoff_s=0.01,
        )
    )  # fmt: skip


def requests_for(stub: OpenAIStub, schema: str) -> list[list[dict[str, str]]]:
    return [r.body["messages"] for r in stub.requests if _schema_title(r.body) == schema]


# ----------------------------------------------------------------------------- tests


def test_sage_loop_through_the_openai_client_survives_429_malformed_reply_and_timeout(
    stub: OpenAIStub, tmp_path: Path
) -> None:
    ctx = feature_context()
    transcript = Transcript(tmp_path / "t.jsonl")
    records: list[CallRecord] = []

    def on_call(record: CallRecord) -> None:
        records.append(record)
        transcript.write("llm", purpose=record.purpose, replies=record.replies)

    def on_state(state: State, message: str) -> None:  # inject faults at known states
        if state == State.DESIGN and message.startswith("sweep 1: designing a test of H2"):
            stub.script(stub.reply('{"description": "forgot the sequences"}'))
        if state == State.REVIEW:
            stub.script(stub.hang(3.0))  # longer than timeout_s=1: retried

    stub.script(stub.fail(429, retry_after="0"))  # the first call, forming hypotheses
    policy = LLMPolicy(chat_for(stub), on_call=on_call)
    explanation = run_sage(ctx, policy, transcript=transcript, on_state=on_state)
    transcript.close()

    assert explanation.label == FINAL_LABEL and explanation.stopped_by == "done"
    assert explanation.backend == "llm:openai:stub-model"
    events = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert {str(s) for s in State} <= {e["state"] for e in events}
    assert [e["purpose"] for e in events if e["state"] == "llm"] == [
        "sage hypotheses f3",
        *("sage design f3 H1", "sage analyse f3 H1", "sage design f3 H2", "sage analyse f3 H2"),
        *("sage design f3 H3", "sage analyse f3 H3", "sage design f3 H2", "sage analyse f3 H2"),
        *("sage review f3", "sage final f3"),
    ]
    runs = [e["result"] for e in events if e["state"] == "run"]
    assert len(runs) == 4 and all(r["unresolved"] == [] and r["sequences"] for r in runs)

    h1, h2, h3 = explanation.hypotheses
    assert [h["status"] for h in explanation.hypotheses] == ["confirmed", "refuted", "confirmed"]
    assert h2["text"] == "fires on popular Horror films"
    assert h2["initial_text"] == "fires on popular films"
    assert h2["spec"] == {"genre": "Horror", "popularity": "head"}
    assert h2["analyses"][0].startswith("popular non-horror") and h2["tests"] == 2
    assert h3["kind"] == "negative_control" and h1["tests"] == 1

    usage = explanation.usage
    assert (usage["calls"], usage["retries"], usage["corrections"], usage["failures"]) == (
        11,
        2,
        1,
        0,
    )
    assert usage["prompt_tokens"] > 1000 and usage["completion_tokens"] > 0
    assert usage["prompt_tokens"] == sum(r.prompt_tokens for r in records)
    assert stub.pending == 0

    (corrected,) = [r for r in records if r.corrected]
    assert corrected.purpose == "sage design f3 H2"
    assert "sequences: Field required" in corrected.messages[-1]["content"]
    assert corrected.messages[-2] == {
        "role": "assistant",
        "content": '{"description": "forgot the sequences"}',
    }

    # Each state is its own short conversation: no growing log, no other hypothesis.
    scale = ctx.exemplars.scale
    for messages in requests_for(stub, "ExperimentPlan") + requests_for(stub, "VerdictReply"):
        prompt = messages[1]["content"]
        assert messages[0]["role"] == "system" and len(messages) in (2, 4)
        assert len(re.findall(r"^Hypothesis H\d", prompt, re.MULTILINE)) == 1
        assert f">= {0.5 * scale:.4g} (5/10)" in prompt  # thresholds relative to the scale
    design_h3 = requests_for(stub, "ExperimentPlan")[-2][1]["content"]
    assert design_h3.startswith("Hypothesis H3 (negative_control")
    assert "Items matching Comedy films" in design_h3
    assert "Casablanca (1942) | Heat (1995) | Ran (1985)" in design_h3  # a real history
    final_prompt = requests_for(stub, "FinalReply")[0][1]["content"]
    assert all(f"Hypothesis H{k}" in final_prompt for k in (1, 2, 3))


def test_budget_cap_jumps_to_the_final_reply(stub: OpenAIStub) -> None:
    policy = LLMPolicy(chat_for(stub))
    explanation = run_sage(feature_context(), policy, Limits(max_llm_calls=5))
    assert explanation.stopped_by.startswith("budget: 5 LLM calls")
    assert explanation.label == FINAL_LABEL
    assert policy.usage()["calls"] == 6  # five, then the final reply
    assert [h["tests"] for h in explanation.hypotheses] == [1, 1, 0]


def test_baseline_reads_what_sage_reads_first(stub: OpenAIStub) -> None:
    """Same exemplars (all of them), base rates, popularity bands, vocabulary and system
    context: the one-shot prompt differs from SAGE's hypotheses prompt only in its task."""
    ctx = feature_context()
    baseline = run_baseline(ctx, LLMPolicy(chat_for(stub)))
    assert baseline.label == BASELINE_LABEL and baseline.usage["calls"] == 1
    LLMPolicy(chat_for(stub)).hypotheses(ctx)
    (one_shot,) = requests_for(stub, "FinalReply")
    (hypotheses,) = requests_for(stub, "HypothesesReply")
    assert one_shot[1]["content"] == hypotheses[1]["content"] == exemplar_evidence(ctx)
    evidence = one_shot[1]["content"]
    assert f"Exemplar {len(EXEMPLARS)} " in evidence  # every window, not a top-10 cut
    assert "  0.873  Halloween II (1981) [Horror] · torso <= peak" in evidence
    base = ctx.catalog.base_rates["genre:Horror"]
    assert f"genre:Horror: 1.00 / {base:.2f}" in evidence  # share among the peaks / base rate
    assert "popularity:torso" in evidence
    shared = hypotheses[0]["content"].split("Task:")[0]
    assert one_shot[0]["content"].startswith(shared) and "Popularity bands: head" in shared


def test_llm_scorer_sees_only_what_it_should(stub: OpenAIStub) -> None:
    ctx = feature_context()
    baseline = run_baseline(ctx, LLMPolicy(chat_for(stub)))
    scorer = LLMScorer(chat_for(stub))
    scoring = scoring_set(ctx)
    scores = score_explanation(baseline, ctx, scoring, scorer)
    assert scores["scorer"] == "llm:openai:stub-model"
    assert scores["generated"] == 10 and scores["generated_unresolved"] == 1
    assert scores["generated_unresolved_description"] == 1
    assert 0.0 <= scores["generative_accuracy"] <= 0.9
    assert scores["detection_auc"] > 0.5 and np.isfinite(scores["predictive_r"])
    assert scorer.usage()["calls"] == 4  # label, label + description, two batches of windows

    label_only, described = requests_for(stub, "GeneratedSequences")
    assert f"Explanation: {baseline.label}\n" in label_only[1]["content"]
    assert baseline.description not in label_only[1]["content"]  # the label alone
    assert f"Explanation: {baseline.text}\n" in described[1]["content"]
    vocabulary = vocabulary_items(ctx.catalog, 60, scoring.seed)
    assert all(f"[id {i.idx}] {i.render()}" in label_only[1]["content"] for i in vocabulary)
    assert "Casablanca (1942) | Heat (1995)" in label_only[1]["content"]

    predicts = requests_for(stub, "WindowPredictions")
    assert len(predicts) == 2
    sent = "".join(m["content"] for messages in predicts for m in messages)
    assert baseline.text in sent
    for w in scoring.windows + EXEMPLARS:
        for a in w.activations:
            if a:
                assert all(f not in sent for f in (f"{a:.4f}", f"{a:.3f}", f"{a:.2f}", repr(a)))
    assert "Exemplar" not in sent and "Window 11" not in sent  # 10 windows per call

    predictions = scorer.predict(baseline.text, scoring.windows, scoring)
    assert [len(p) for p in predictions] == [len(w.items) for w in scoring.windows]
    assert predictions[0] == [8.0, 8.0, 0.0, 0.0]  # the short reply was padded with 0
