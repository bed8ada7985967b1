"""SAGE (arXiv 2511.20820) for item sequences: an explicit state machine that reads exemplars,
forms hypotheses (one a negative control), tests each with crafted item sequences, reviews,
and writes a final explanation; plus the one-shot baseline, which reads the same exemplars and
catalog context (attribute base rates, popularity bands) and answers at once: the only
difference between the two is SAGE's experiments and refinement loop.

The decisions come from a `Policy`: `LLMPolicy` (interp/llm_policy.py) asks a language model,
`OfflinePolicy` here decides from statistics over item metadata. The loop, its caps, the
experiments and the transcript are the same for both. Thresholds are relative to the
feature's own scale: the mean peak activation of its top-10 exemplars.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel

from recsae_pipeline.interp.experiments import FeatureContext, TestResult, run_experiment
from recsae_pipeline.interp.llm import LLMError
from recsae_pipeline.interp.replies import (
    ExperimentPlan,
    FinalReply,
    HypothesesReply,
    ReviewReply,
    State,
    Status,
    VerdictReply,
)
from recsae_pipeline.interp.spec import Spec


@dataclass
class Hypothesis:
    id: int
    text: str
    kind: str
    spec: Spec | None
    initial_text: str
    status: Status = Status.PENDING
    tests: list[TestResult] = field(default_factory=list)
    analyses: list[str] = field(default_factory=list)

    @property
    def open(self) -> bool:
        return self.status in (Status.PENDING, Status.REFINED)

    def summary(self) -> dict:
        last = self.tests[-1] if self.tests else None
        return {
            "id": self.id,
            "text": self.text,
            "initial_text": self.initial_text,
            "kind": self.kind,
            "status": str(self.status),
            "spec": self.spec.model_dump(exclude_defaults=True) if self.spec else None,
            "tests": len(self.tests),
            "last_high_mean": None if last is None else last.high_mean,
            "last_low_mean": None if last is None else last.low_mean,
            "last_separation": None if last is None else last.separation,
            "analyses": self.analyses,
        }


class Policy(Protocol):
    """The decisions of the SAGE loop; `name` appears in every output."""

    name: str

    def hypotheses(self, ctx: FeatureContext) -> HypothesesReply: ...

    def design(self, ctx: FeatureContext, hypothesis: Hypothesis) -> ExperimentPlan: ...

    def analyse(
        self, ctx: FeatureContext, hypothesis: Hypothesis, result: TestResult
    ) -> VerdictReply: ...

    def review(self, ctx: FeatureContext, hypotheses: list[Hypothesis]) -> ReviewReply: ...

    def final(self, ctx: FeatureContext, hypotheses: list[Hypothesis]) -> FinalReply: ...

    def one_shot(self, ctx: FeatureContext) -> FinalReply: ...

    def usage(self) -> dict[str, float]: ...


@dataclass
class Limits:
    """What one explanation (one feature, one method) may spend; the loop concludes with
    what it knows when a limit is reached."""

    max_tests_per_hypothesis: int = 3
    """Experiments run on one hypothesis before it gets a verdict."""
    max_sweeps: int = 4
    """Activation sweeps (one item varied over a context) in all."""
    max_reviews: int = 2
    """Rounds of reviewing the verdicts and proposing new hypotheses."""
    max_llm_calls: int = 60
    """Requests to the LLM (an offline policy makes none)."""
    max_tokens: int = 400_000
    """Prompt plus completion tokens over those requests."""


@dataclass
class Explanation:
    feature: int
    method: Literal["sage", "baseline"]
    backend: str
    label: str
    description: str
    hypotheses: list[dict]
    experiments: int
    sequences_run: int
    seconds: float
    usage: dict[str, float]
    transcript: str | None = None
    stopped_by: str = "done"

    @property
    def text(self) -> str:
        """What the predictive scorer reads: the label and the description, nothing else
        (the headline generative accuracy reads the label alone)."""
        return f"{self.label}. {self.description}"

    def as_row(self) -> dict[str, Any]:
        """A flat row for Parquet: hypotheses and usage as JSON text, plus the text scored."""
        row = asdict(self)
        row["hypotheses"] = json.dumps(self.hypotheses, default=_json_default)
        row["usage"] = json.dumps(self.usage)
        row["text"] = self.text
        for key in ("calls", "prompt_tokens", "completion_tokens", "cost_usd"):
            row[f"llm_{key}"] = self.usage.get(key, 0)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Explanation:
        fields = {k: row[k] for k in cls.__dataclass_fields__ if k in row}
        fields["hypotheses"] = json.loads(row["hypotheses"])
        fields["usage"] = json.loads(row["usage"])
        return cls(**fields)


class Transcript:
    """JSONL: one event per line (state, policy, prompt/reply or decision, experiments)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._handle = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = path.open("w", encoding="utf-8")

    def write(self, state: State | str, **event: Any) -> None:
        if self._handle is not None:
            record = {"state": str(state), "time": round(time.time(), 3), **event}
            self._handle.write(json.dumps(record, default=_json_default) + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)


class BudgetExceeded(RuntimeError):
    pass


def run_sage(
    ctx: FeatureContext,
    policy: Policy,
    limits: Limits | None = None,
    transcript: Transcript | None = None,
    on_state: Callable[[State, str], None] | None = None,
) -> Explanation:
    """The SAGE loop as a state machine: EXEMPLARS -> HYPOTHESES -> sweeps of DESIGN -> RUN
    -> ANALYSE over open hypotheses -> REVIEW (maybe more sweeps) -> FINAL. Every reply and
    experiment goes to the transcript. Caps: tests per hypothesis, sweeps, reviews, LLM calls
    and tokens; hitting a budget jumps to FINAL with what is known."""
    limits = limits or Limits()
    transcript = transcript or Transcript(None)
    started = time.perf_counter()
    hypotheses: list[Hypothesis] = []
    experiments = 0
    stopped_by = "done"
    notify = on_state or (lambda state, message: None)

    def check_budget() -> None:
        used = policy.usage()
        if used.get("calls", 0) >= limits.max_llm_calls:
            raise BudgetExceeded(f"{used['calls']} LLM calls (max {limits.max_llm_calls})")
        tokens = used.get("prompt_tokens", 0) + used.get("completion_tokens", 0)
        if tokens >= limits.max_tokens:
            raise BudgetExceeded(f"{tokens} tokens (max {limits.max_tokens})")

    transcript.write(State.EXEMPLARS, policy=policy.name, feature=ctx.feature,
                     exemplars=ctx.exemplars.render(ctx.catalog), scale=ctx.exemplars.scale)  # fmt: skip
    try:
        notify(State.HYPOTHESES, "forming hypotheses")
        reply = policy.hypotheses(ctx)
        transcript.write(State.HYPOTHESES, reply=reply)
        for i, draft in enumerate(reply.hypotheses, start=1):
            hypotheses.append(Hypothesis(i, draft.text, draft.kind, draft.spec, draft.text))
        if not any(h.kind == "negative_control" for h in hypotheses):
            transcript.write(State.HYPOTHESES, warning="no negative control among the hypotheses")
        reviews = 0
        sweep = 0
        while True:
            while sweep < limits.max_sweeps and any(
                h.open and len(h.tests) < limits.max_tests_per_hypothesis for h in hypotheses
            ):
                sweep += 1
                for h in hypotheses:
                    if not h.open or len(h.tests) >= limits.max_tests_per_hypothesis:
                        continue
                    check_budget()
                    notify(State.DESIGN, f"sweep {sweep}: designing a test of H{h.id}")
                    plan = policy.design(ctx, h)
                    transcript.write(State.DESIGN, hypothesis=h.id, plan=plan)
                    result = run_experiment(ctx, plan)
                    experiments += 1
                    h.tests.append(result)
                    transcript.write(State.RUN, hypothesis=h.id, result=result)
                    check_budget()
                    verdict = policy.analyse(ctx, h, result)
                    transcript.write(State.ANALYSE, hypothesis=h.id, verdict=verdict)
                    h.analyses.append(verdict.analysis)
                    h.status = Status(verdict.verdict)
                    if verdict.verdict == "refined":
                        h.text = verdict.refined_text or h.text
                        h.spec = verdict.refined_spec or h.spec
            for h in hypotheses:  # out of tests: the last verdict stands, open ones stay open
                if h.open and len(h.tests) >= limits.max_tests_per_hypothesis:
                    transcript.write(State.REVIEW, hypothesis=h.id, note="test cap reached")
            if reviews >= limits.max_reviews or sweep >= limits.max_sweeps:
                break
            check_budget()
            notify(State.REVIEW, "reviewing")
            review = policy.review(ctx, hypotheses)
            reviews += 1
            transcript.write(State.REVIEW, reply=review)
            if not review.need_more_testing:
                break
            reopened = [
                h
                for h in hypotheses
                if h.status == Status.REFINED and len(h.tests) < limits.max_tests_per_hypothesis
            ]
            if not reopened:
                break
    except BudgetExceeded as err:
        stopped_by = f"budget: {err}"
        transcript.write(State.FINAL, stopped_by=stopped_by)
    except LLMError as err:  # retries or the corrective retry used up: conclude with what is known
        stopped_by = f"llm error: {err}"
        transcript.write(State.FINAL, stopped_by=stopped_by)
    notify(State.FINAL, "writing the explanation")
    try:
        final = policy.final(ctx, hypotheses)
    except LLMError as err:
        stopped_by = f"{stopped_by}; final failed: {err}"
        final = FinalReply(label="unexplained", description=f"The explainer failed: {err}")
    transcript.write(State.FINAL, reply=final)
    transcript.write(State.DONE, usage=policy.usage())
    return _explanation(
        ctx,
        "sage",
        policy,
        final,
        transcript,
        started,
        hypotheses=[h.summary() for h in hypotheses],
        experiments=experiments,
        sequences_run=ctx.probe.runs,
        stopped_by=stopped_by,
    )


def run_baseline(
    ctx: FeatureContext, policy: Policy, transcript: Transcript | None = None
) -> Explanation:
    """The usual auto-interp recipe: one reply from the exemplars SAGE reads (all of them,
    with the same base rates and popularity bands), no experiments."""
    transcript = transcript or Transcript(None)
    started = time.perf_counter()
    transcript.write(State.EXEMPLARS, policy=policy.name, feature=ctx.feature,
                     exemplars=ctx.exemplars.render(ctx.catalog), scale=ctx.exemplars.scale)  # fmt: skip
    reply = policy.one_shot(ctx)
    transcript.write(State.FINAL, reply=reply)
    return _explanation(ctx, "baseline", policy, reply, transcript, started)


def _explanation(
    ctx: FeatureContext,
    method: Literal["sage", "baseline"],
    policy: Policy,
    reply: FinalReply,
    transcript: Transcript,
    started: float,
    hypotheses: list[dict] | None = None,
    experiments: int = 0,
    sequences_run: int = 0,
    stopped_by: str = "done",
) -> Explanation:
    """`reply` as `method`'s `Explanation`: the policy's usage, the seconds since `started`."""
    return Explanation(
        feature=ctx.feature,
        method=method,
        backend=policy.name,
        label=reply.label,
        description=reply.description,
        hypotheses=hypotheses or [],
        experiments=experiments,
        sequences_run=sequences_run,
        seconds=time.perf_counter() - started,
        usage=policy.usage(),
        transcript=None if transcript.path is None else str(transcript.path),
        stopped_by=stopped_by,
    )
