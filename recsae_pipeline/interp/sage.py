"""SAGE (arXiv 2511.20820) for item sequences: an explicit state machine that reads exemplars,
forms hypotheses (one a negative control), tests each with crafted item sequences, reviews,
and writes a final explanation; plus the one-shot baseline from the top-10 exemplars.

The decisions come from a `Policy`: `LLMPolicy` (interp/llm_policy.py) asks a language model,
`OfflinePolicy` here decides from statistics over item metadata. The loop, its caps, the
experiments and the transcript are the same for both. Thresholds are relative to the
feature's own scale: the mean peak activation of its top-10 exemplars.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field

from recsae_pipeline.interp.llm import LLMError
from recsae_pipeline.interp.spec import Spec
from recsae_pipeline.interp.tools import (
    EXPLAIN_USERS,
    Catalog,
    FeatureData,
    FeatureProbe,
    UnknownItemError,
    Window,
)

Expect = Literal["high", "low"]


class Status(StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    REFUTED = "refuted"
    REFINED = "refined"


class State(StrEnum):
    EXEMPLARS = "exemplars"
    HYPOTHESES = "hypotheses"
    DESIGN = "design"
    RUN = "run"
    ANALYSE = "analyse"
    REVIEW = "review"
    FINAL = "final"
    DONE = "done"


# ----------------------------------------------------------------------------- replies
# What a policy returns at each state; the LLM policy gets these as JSON schemas.


class HypothesisDraft(BaseModel):
    text: str = Field(description="A specific, testable claim about when the feature fires.")
    kind: Literal["positive", "negative_control"] = Field(
        description="negative_control: a claim about where the feature should NOT fire."
    )
    spec: Spec | None = Field(default=None, description="Optional structured form of the claim.")


class HypothesesReply(BaseModel):
    observation: str = Field(description="What the exemplars have in common.")
    hypotheses: list[HypothesisDraft] = Field(min_length=3, max_length=5)


class SequenceSpec(BaseModel):
    items: list[int | str] = Field(
        min_length=1, max_length=50, description="Item ids or exact titles, oldest first."
    )
    target_position: int = Field(default=-1, description="0-based; -1 = the last item.")
    expect: Expect


class ExperimentPlan(BaseModel):
    description: str
    sequences: list[SequenceSpec] = Field(min_length=2, max_length=16)


class VerdictReply(BaseModel):
    analysis: str
    verdict: Literal["confirmed", "refuted", "refined"]
    refined_text: str | None = Field(default=None, description="The narrowed claim, if refined.")
    refined_spec: Spec | None = None


class ReviewReply(BaseModel):
    summary: str
    need_more_testing: bool


class FinalReply(BaseModel):
    label: str = Field(max_length=120, description="A short label.")
    description: str = Field(description="One to three sentences.")


# ----------------------------------------------------------------------------- state


@dataclass
class TestResult:
    plan: dict
    sequences: list[list[int]]
    targets: list[int]
    expects: list[str]
    activations: list[list[float]]
    target_values: list[float]
    high_mean: float
    low_mean: float
    separation: float
    """AUC of telling the 'high' targets from the 'low' ones by activation (0.5 = none)."""
    unresolved: list[str] = field(default_factory=list)


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


@dataclass
class Exemplars:
    """The top windows of one feature (explain users only) and attribute statistics."""

    windows: list[Window]
    scale: float
    """Mean peak of the top-10 windows: the feature's own activation scale."""
    attribute_shares: dict[str, float]
    """Share of peak items carrying each attribute."""
    base_rates: dict[str, float]
    """Share of catalog items carrying it."""
    context: dict[str, float]
    """Context statistics of the peaks: same-genre run before, sequel after predecessor."""

    def enriched(self) -> list[tuple[str, float, float, float]]:
        """(attribute, share, base, purity) sorted by purity = (share - base) / (1 - base)."""
        out = []
        for attribute, share in self.attribute_shares.items():
            base = self.base_rates.get(attribute, 0.0)
            purity = (share - base) / (1 - base) if base < 1 else 0.0
            out.append((attribute, share, base, purity))
        return sorted(out, key=lambda r: (-r[3], r[0]))

    def render(self, catalog: Catalog, n: int = 10) -> str:
        """The exemplars as text: each window's items with their activations, then stats."""
        lines = [f"Feature scale (mean peak of the top 10): {self.scale:.4f}"]
        for rank, w in enumerate(self.windows[:n], start=1):
            lines.append(f"Exemplar {rank} (user {w.user_idx}, peak {w.peak:.4f}):")
            for offset, (item, act) in enumerate(zip(w.items, w.activations, strict=True)):
                mark = " <= peak" if offset == w.peak_offset else ""
                value = "n/a" if np.isnan(act) else f"{act:.3f}"
                lines.append(f"  {value:>7}  {catalog.render(item)}{mark}")
        lines.append("Peak-item attributes vs the catalog base rate (share / base):")
        for attribute, share, base, _ in self.enriched()[:12]:
            lines.append(f"  {attribute}: {share:.2f} / {base:.2f}")
        for name, value in self.context.items():
            lines.append(f"  context {name}: {value:.2f}")
        return "\n".join(lines)


def pairwise_auc(high: list[float], low: list[float], empty: float = 0.5) -> float:
    """P(a `high` value beats a `low` one), ties counting half; `empty` if a side is empty."""
    if not high or not low:
        return empty
    h, lo = np.asarray(high)[:, None], np.asarray(low)[None, :]
    return float(((h > lo).sum() + 0.5 * (h == lo).sum()) / (h.size * lo.size))


def _run_length(
    catalog: Catalog, items: tuple[int, ...] | list[int], position: int, genre: str
) -> int:
    run = 0
    for i in reversed(items[:position]):
        if i in catalog.items and genre in catalog[i].genres:
            run += 1
        else:
            break
    return run


def exemplars(data: FeatureData, catalog: Catalog, k: int = 20, radius: int = 5) -> Exemplars:
    """Top-k windows of the explain users (one per user, by their peak), with the
    attribute shares of the k peak items and context statistics."""
    peaks = data.peaks(EXPLAIN_USERS, limit=k)
    if not peaks:
        raise ValueError(
            f"feature {data.feature} never fires on the explain users of {data.model}.layer{data.layer}; "
            "pick an active feature (see feature_stats.frequency)"
        )
    windows = data.windows([(u, p) for u, p, _ in peaks], radius)
    scale = float(np.mean([v for _, _, v in peaks[:10]]))
    peak_items = [
        catalog[w.items[w.peak_offset]] for w in windows if w.items[w.peak_offset] in catalog.items
    ]
    counts = Counter(a for item in peak_items for a in item.attributes())
    shares = {a: c / len(peak_items) for a, c in counts.items()}
    runs, sequels = [], []
    for w in windows:
        item = catalog.items.get(w.items[w.peak_offset])
        if item is None:
            continue
        runs.append(
            max((_run_length(catalog, w.items, w.peak_offset, g) for g in item.genres), default=0)
        )
        prev = catalog.items.get(w.items[w.peak_offset - 1]) if w.peak_offset > 0 else None
        sequels.append(
            prev is not None
            and item.franchise is not None
            and prev.franchise == item.franchise
            and prev.installment == (item.installment or 0) - 1
        )
    context = {
        "share_after_2plus_same_genre": float(np.mean([r >= 2 for r in runs])) if runs else 0.0,
        "share_sequel_after_predecessor": float(np.mean(sequels)) if sequels else 0.0,
    }
    return Exemplars(windows, scale, shares, catalog.base_rates, context)


# ----------------------------------------------------------------------------- policy


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
    max_tests_per_hypothesis: int = 3
    max_sweeps: int = 4
    max_reviews: int = 2
    max_llm_calls: int = 60
    max_tokens: int = 400_000


@dataclass
class FeatureContext:
    """Everything one feature's explanation needs: its data, the catalog and the probe."""

    feature: int
    catalog: Catalog
    probe: FeatureProbe
    data: FeatureData
    exemplars: Exemplars
    seed: int = 0
    prefixes: list[list[int]] = field(default_factory=list)
    """Real explain-user histories (most recent items) to put crafted items in context."""


def context_prefixes(data: FeatureData, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` real item runs of `length` from random explain users (seeded)."""
    windows = data.random_windows(EXPLAIN_USERS, n, radius=length, seed=seed)
    return [
        list(w.items[max(0, w.peak_offset - length) : w.peak_offset]) or list(w.items[:length])
        for w in windows
    ]


def run_experiment(ctx: FeatureContext, plan: ExperimentPlan) -> TestResult:
    """Resolve the plan's items (unknown titles are dropped from the plan and reported),
    run every sequence, and read the activation at each target position."""
    sequences, targets, expects, unresolved = [], [], [], []
    for spec in plan.sequences:
        try:
            items = ctx.catalog.resolve(spec.items)
        except UnknownItemError as err:
            unresolved.append(str(err))
            continue
        position = (
            spec.target_position if spec.target_position >= 0 else len(items) + spec.target_position
        )
        if not 0 <= position < len(items):
            unresolved.append(
                f"target_position {spec.target_position} outside a sequence of {len(items)}"
            )
            continue
        sequences.append(items)
        targets.append(position)
        expects.append(spec.expect)
    activations = ctx.probe.activations(sequences, ctx.feature) if sequences else []
    max_len = ctx.probe.model.config.max_len
    target_values = []
    for seq, position, acts in zip(sequences, targets, activations, strict=True):
        shift = max(0, len(seq) - max_len)  # the probe keeps the last max_len items
        target_values.append(float(acts[position - shift]) if position >= shift else 0.0)
    high = [v for v, e in zip(target_values, expects, strict=True) if e == "high"]
    low = [v for v, e in zip(target_values, expects, strict=True) if e == "low"]
    return TestResult(
        plan=plan.model_dump(),
        sequences=sequences,
        targets=targets,
        expects=expects,
        activations=[a.tolist() for a in activations],
        target_values=target_values,
        high_mean=float(np.mean(high)) if high else 0.0,
        low_mean=float(np.mean(low)) if low else 0.0,
        separation=pairwise_auc(high, low),
        unresolved=unresolved,
    )


def render_result(ctx: FeatureContext, result: TestResult, max_items: int = 12) -> str:
    """An experiment's outcome as text: per sequence the expectation, target activation
    (raw and x10 / scale), and the last items with their activations."""
    lines = [f"high-expected mean {result.high_mean:.4f}, low-expected mean {result.low_mean:.4f}, "
             f"separation AUC {result.separation:.2f} (feature scale {ctx.exemplars.scale:.4f})"]  # fmt: skip
    for seq, target, expect, acts, value in zip(
        result.sequences,
        result.targets,
        result.expects,
        result.activations,
        result.target_values,
        strict=True,
    ):
        scaled = 10 * value / ctx.exemplars.scale if ctx.exemplars.scale > 0 else 0.0
        lines.append(
            f"- expect {expect}: target {ctx.catalog.render(seq[target])} -> {value:.4f} ({scaled:.1f}/10)"
        )
        shift = max(0, len(seq) - len(acts))
        shown = list(range(max(shift, target - max_items + 1), target + 1))
        lines.append(
            "    " + " | ".join(f"{ctx.catalog[seq[p]].title} {acts[p - shift]:.3f}" for p in shown)
        )
    for problem in result.unresolved:
        lines.append(f"- not run: {problem}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the loop


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
        """What scorers see: the label and the description, nothing else."""
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
    return Explanation(
        feature=ctx.feature,
        method="sage",
        backend=policy.name,
        label=final.label,
        description=final.description,
        hypotheses=[h.summary() for h in hypotheses],
        experiments=experiments,
        sequences_run=ctx.probe.runs,
        seconds=time.perf_counter() - started,
        usage=policy.usage(),
        transcript=None if transcript.path is None else str(transcript.path),
        stopped_by=stopped_by,
    )


def run_baseline(
    ctx: FeatureContext, policy: Policy, transcript: Transcript | None = None
) -> Explanation:
    """The usual auto-interp recipe: one shot from the top-10 exemplars, no experiments."""
    transcript = transcript or Transcript(None)
    started = time.perf_counter()
    transcript.write(State.EXEMPLARS, policy=policy.name, feature=ctx.feature,
                     exemplars=ctx.exemplars.render(ctx.catalog, n=10))  # fmt: skip
    reply = policy.one_shot(ctx)
    transcript.write(State.FINAL, reply=reply)
    return Explanation(
        feature=ctx.feature,
        method="baseline",
        backend=policy.name,
        label=reply.label,
        description=reply.description,
        hypotheses=[],
        experiments=0,
        sequences_run=0,
        seconds=time.perf_counter() - started,
        usage=policy.usage(),
        transcript=None if transcript.path is None else str(transcript.path),
    )


# ----------------------------------------------------------------------------- offline


class OfflinePolicy:
    """A deterministic explainer from statistics over item metadata, no language model.

    Hypotheses are the exemplar peak items' most enriched attributes (share against the
    catalog base rate), a context hypothesis when the peaks sit in same-genre runs or right
    after a franchise predecessor, and a negative control (popularity-matched items without
    the best attribute stay low). Experiments put matching and popularity-matched
    non-matching items after real user histories; verdicts compare the two groups on the
    feature's own scale, and an ambiguous result narrows the claim by the next attribute."""

    name = "offline (statistical policy, no LLM)"

    def __init__(self, sequences_per_group: int = 6, seed: int = 0) -> None:
        self.n = sequences_per_group
        self.seed = seed

    def usage(self) -> dict[str, float]:
        return {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}

    # -- hypotheses

    def _ranked_specs(self, ctx: FeatureContext) -> list[tuple[Spec, float]]:
        out = []
        for attribute, share, _base, purity in ctx.exemplars.enriched():
            if share >= 0.3 and purity > 0.1:
                out.append((Spec.of(attribute), purity))
        return out

    def hypotheses(self, ctx: FeatureContext) -> HypothesesReply:
        ranked = self._ranked_specs(ctx)
        if not ranked:  # nothing enriched: fall back on the most common peak attribute
            attribute = max(
                ctx.exemplars.attribute_shares, key=lambda a: (ctx.exemplars.attribute_shares[a], a)
            )
            ranked = [(Spec.of(attribute), 0.0)]
        best = ranked[0][0]
        drafts = [HypothesisDraft(text=f"fires on {best.describe()}", kind="positive", spec=best)]
        families = {next(k for k, v in best.model_dump(exclude_defaults=True).items())}
        for spec, _ in ranked[1:]:
            family = next(k for k, v in spec.model_dump(exclude_defaults=True).items())
            if family not in families:
                drafts.append(
                    HypothesisDraft(text=f"fires on {spec.describe()}", kind="positive", spec=spec)
                )
                families.add(family)
            if len(drafts) == 2:
                break
        context = ctx.exemplars.context
        if best.genre and context["share_after_2plus_same_genre"] >= 0.5:
            spec = best.model_copy(update={"genre_run": 2})
            drafts.append(
                HypothesisDraft(text=f"fires on {spec.describe()}", kind="positive", spec=spec)
            )
        elif context["share_sequel_after_predecessor"] >= 0.3:
            spec = Spec(sequel=True)
            drafts.append(
                HypothesisDraft(text=f"fires on {spec.describe()}", kind="positive", spec=spec)
            )
        drafts.append(
            HypothesisDraft(
                text=f"stays low on popularity-matched films that are not {best.describe()}",
                kind="negative_control",
                spec=best,
            )
        )
        while len(drafts) < 3:  # always three: add the next enriched attribute of any family
            spec = (
                ranked[len(drafts) - 1][0]
                if len(ranked) >= len(drafts)
                else Spec(popularity="head")
            )
            drafts.insert(
                -1, HypothesisDraft(text=f"fires on {spec.describe()}", kind="positive", spec=spec)
            )
        top = ", ".join(
            f"{a} {s:.0%} (base {b:.0%})" for a, s, b, _ in ctx.exemplars.enriched()[:4]
        )
        return HypothesesReply(observation=f"peak items: {top}", hypotheses=drafts[:5])

    # -- experiments

    def _matching(
        self, ctx: FeatureContext, spec: Spec, positive: bool, n: int, seed: int
    ) -> list[int]:
        rng = np.random.default_rng(seed)
        pool = [i.idx for i in ctx.catalog.items.values() if spec.item_matches(i) == positive]
        if not pool:
            return []
        return [int(i) for i in rng.choice(pool, size=min(n, len(pool)), replace=False)]

    def _popularity_matched(
        self, ctx: FeatureContext, spec: Spec, like: list[int], seed: int
    ) -> list[int]:
        """For each item in `like`, an item with the same popularity band outside the spec."""
        rng = np.random.default_rng(seed)
        out = []
        for idx in like:
            band = ctx.catalog[idx].popularity
            pool = [
                i.idx
                for i in ctx.catalog.items.values()
                if i.popularity == band and not spec.item_matches(i)
            ]
            if pool:
                out.append(int(rng.choice(pool)))
        return out

    def design(self, ctx: FeatureContext, hypothesis: Hypothesis) -> ExperimentPlan:
        spec = hypothesis.spec or Spec()
        seed = self.seed + 1000 * hypothesis.id + len(hypothesis.tests) + 7 * ctx.feature
        positives = self._matching(ctx, spec, True, self.n, seed)
        controls = self._popularity_matched(ctx, spec, positives, seed + 1)
        prefixes = ctx.prefixes or [[]]
        sequences = []
        for k, (pos, ctrl) in enumerate(zip(positives, controls, strict=False)):
            prefix = [i for i in prefixes[k % len(prefixes)] if i not in (pos, ctrl)]
            if spec.genre_run and spec.genre:
                run = self._matching(
                    ctx, Spec(genre=spec.genre), True, spec.genre_run + 1, seed + 10 + k
                )
                run = [i for i in run if i != pos][: spec.genre_run]
                pos_seq, ctrl_seq = prefix + run + [pos], prefix + [pos]  # same target, no run
            elif spec.sequel:
                item = ctx.catalog[pos]
                prev = [i.idx for i in ctx.catalog.items.values()
                        if i.franchise == item.franchise and i.installment == (item.installment or 0) - 1]  # fmt: skip
                pos_seq = prefix + prev[:1] + [pos]
                ctrl_seq = prefix + [pos]
            else:
                pos_seq, ctrl_seq = prefix + [pos], prefix + [ctrl]
            sequences.append(SequenceSpec(items=pos_seq, expect="high"))
            sequences.append(SequenceSpec(items=ctrl_seq, expect="low"))
        if len(sequences) < 2:  # an unsatisfiable spec: a trivially failing plan
            any_item = next(iter(ctx.catalog.items))
            sequences = [
                SequenceSpec(items=[any_item], expect="high"),
                SequenceSpec(items=[any_item], expect="low"),
            ]
        what = (
            "matching target vs popularity-matched non-matching target after the same real history"
        )
        if hypothesis.kind == "negative_control":
            what = "negative control: " + what
        return ExperimentPlan(description=f"{what}: {spec.describe()}", sequences=sequences)

    # -- verdicts

    def analyse(
        self, ctx: FeatureContext, hypothesis: Hypothesis, result: TestResult
    ) -> VerdictReply:
        scale = max(ctx.exemplars.scale, 1e-9)
        high, low, sep = result.high_mean / scale, result.low_mean / scale, result.separation
        facts = f"matching targets {high:.2f}x scale, controls {low:.2f}x scale, separation AUC {sep:.2f}"
        if hypothesis.kind == "negative_control":
            if low < 0.25 and sep >= 0.7:
                return VerdictReply(analysis=f"{facts}: controls stay low", verdict="confirmed")
            return VerdictReply(analysis=f"{facts}: controls also fire", verdict="refuted")
        if sep >= 0.8 and high >= 0.25:
            return VerdictReply(analysis=f"{facts}: the claim holds", verdict="confirmed")
        if sep < 0.6 or high < 0.05:
            return VerdictReply(analysis=f"{facts}: no effect", verdict="refuted")
        spec = hypothesis.spec or Spec()
        for attribute, _share, _base, purity in ctx.exemplars.enriched():
            family = attribute.partition(":")[0]
            if getattr(spec, family) is None and purity > 0.1:
                narrowed = spec.refine(attribute)
                return VerdictReply(
                    analysis=f"{facts}: partial effect; narrowing by {attribute}",
                    verdict="refined",
                    refined_text=f"fires on {narrowed.describe()}",
                    refined_spec=narrowed,
                )
        return VerdictReply(
            analysis=f"{facts}: partial effect, nothing left to narrow", verdict="refuted"
        )

    def review(self, ctx: FeatureContext, hypotheses: list[Hypothesis]) -> ReviewReply:
        confirmed = [h for h in hypotheses if h.status == Status.CONFIRMED and h.kind == "positive"]
        refined = [h for h in hypotheses if h.status == Status.REFINED]
        return ReviewReply(
            summary=f"{len(confirmed)} confirmed, {len(refined)} refined and untested",
            need_more_testing=not confirmed and bool(refined),
        )

    def final(self, ctx: FeatureContext, hypotheses: list[Hypothesis]) -> FinalReply:
        def effect(h: Hypothesis) -> float:
            return max(
                (t.separation + t.high_mean / max(ctx.exemplars.scale, 1e-9) for t in h.tests),
                default=0.0,
            )

        positives = [h for h in hypotheses if h.kind == "positive" and h.spec is not None]
        confirmed = sorted(
            (h for h in positives if h.status == Status.CONFIRMED), key=effect, reverse=True
        )
        chosen = (
            confirmed
            or sorted(
                (h for h in positives if h.status != Status.REFUTED), key=effect, reverse=True
            )
            or sorted(positives, key=effect, reverse=True)
        )
        if not chosen:
            return FinalReply(label="unexplained", description="No hypothesis survived testing.")
        best = chosen[0]
        label = best.spec.describe()  # type: ignore[union-attr]
        sentences = [
            f"Fires on {label} (about {ctx.exemplars.scale:.3g} at its peaks); "
            + (
                "confirmed by experiments."
                if best.status == Status.CONFIRMED
                else "weak evidence only."
            )
        ]
        if len(chosen) > 1:
            sentences.append(f"It also responds to {chosen[1].spec.describe()}.")  # type: ignore[union-attr]
        controls = [
            h for h in hypotheses if h.kind == "negative_control" and h.status == Status.CONFIRMED
        ]
        if controls:
            sentences.append(
                "It stays silent on popularity-matched films outside that description."
            )
        return FinalReply(label=label, description=" ".join(sentences))

    def one_shot(self, ctx: FeatureContext) -> FinalReply:
        """What a one-shot reader of the top-10 exemplars writes: the attribute most of the
        peak items share (no base rates, no experiments)."""
        counts = Counter(
            a
            for w in ctx.exemplars.windows[:10]
            if w.items[w.peak_offset] in ctx.catalog.items
            for a in ctx.catalog[w.items[w.peak_offset]].attributes()
        )
        attribute, count = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        spec = Spec.of(attribute)
        return FinalReply(
            label=spec.describe(),
            description=f"Most top exemplars ({count}/10) peak on {spec.describe()}.",
        )
