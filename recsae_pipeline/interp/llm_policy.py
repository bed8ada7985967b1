"""SAGE's decisions and the scorer's readings by a language model, through `OpenAIChat`.

Each state sends its own short conversation (a system prompt with the task, one user message
with only what that state needs), never one growing chat log: SAGE's shared log let every
"isolated" prompt see every other hypothesis and result. Replies are sage.py's schemas,
validated by `OpenAIChat.complete_json`. Thresholds are stated relative to the feature's
scale (the mean peak of its top-10 exemplars), never as absolute numbers.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, Field

from recsae_pipeline.data.catalog import Catalog, Item
from recsae_pipeline.data.sequences import POPULARITY_BANDS
from recsae_pipeline.interp.experiments import FeatureContext, TestResult, render_result
from recsae_pipeline.interp.llm import CallRecord, LLMError, OpenAIChat
from recsae_pipeline.interp.replies import (
    ExperimentPlan,
    FinalReply,
    HypothesesReply,
    ReviewReply,
    SequenceSpec,
    Title,
    VerdictReply,
)
from recsae_pipeline.interp.sage import Hypothesis
from recsae_pipeline.interp.scoring import ScoringSet
from recsae_pipeline.interp.spec import Spec, parse_spec
from recsae_pipeline.interp.windows import Window

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)
OnCall = Callable[[CallRecord], None]

DOMAIN = """\
You study one latent feature of a sparse autoencoder (SAE) trained on the hidden states of \
a next-movie recommender: a SASRec-style transformer that reads a user's watch history \
left to right, oldest first. The feature has one activation per position: a non-negative \
number, 0 where it is silent.
Movies are written `Title (Year) [Genre1|Genre2]`. Popularity bands: head (the most-watched \
items, together a third of all interactions), torso (the next third), tail (the long tail)."""

HYPOTHESIS_GUIDE = """\
What the activation at a position can depend on:
- item-level: the item there (a genre, a decade or year range, a franchise, long-tail items);
- context-level: the items before it (the Nth item of a same-genre run, a genre switch \
after 3+ items of another genre, a sequel right after its predecessor);
- positional: only the latest item, or early positions;
- popularity: head items whatever their genre.
Confounds: titles carry the year, genres are multi-label, and popularity correlates with \
almost everything, so compare with popularity-matched items that lack the attribute."""

HYPOTHESES_TASK = """\
Task: read the exemplars below and propose 3 to 5 hypotheses about when the feature fires.
- Each is one specific claim that crafted item sequences can test; prefer attributes whose \
share among the peak items is well above their catalog base rate.
- At least one must be a negative control (kind "negative_control"): where the feature \
should stay silent, e.g. the same genre from another decade, or popularity-matched items \
without the attribute.
- Fill `spec` when the claim maps onto the catalog vocabulary (genre and decade exactly as \
listed, popularity head/torso/tail, a listed franchise, genre_run = minimum run length \
before the item, sequel); otherwise leave it null.
- `observation`: what the exemplars share, in two or three sentences."""

DESIGN_TASK = """\
Task: design one experiment that tests the hypothesis below.
- An experiment is 2 to 16 item sequences. Each has a target position (0-based; -1 = the \
last item) and an expectation: "high" (the feature should fire there) or "low" (it should \
stay silent).
- Pair every high sequence with a low control that differs as little as possible: swap the \
target for a popularity-matched item without the attribute, drop the run before it, move \
the predecessor out of order, or cut the prefix. For a negative control, the low sequences \
are the claim under test.
- Put targets after one of the real user histories below so sequences look like real ones; \
keep sequences 3 to 20 items long.
- Refer to items only by their exact `Title (Year)` as listed below, or by their id number. \
Any other title is not run.
- Do not repeat a test already run; probe what the last result left open."""

ANALYSE_TASK = """\
Task: judge the hypothesis from the experiment just run (and earlier ones, if listed).
- confirmed: the high-expected targets are high and the low-expected ones clearly lower \
(separation AUC >= 0.8), consistently. For a negative control: the items it names stay \
silent while its high sequences fire.
- refuted: the high-expected targets stay silent or weak, or the low-expected ones fire as \
much (AUC near 0.5 or below).
- refined: a partial, ambiguous or context-dependent effect. Write the narrower claim that \
the results support in `refined_text` (and `refined_spec` if it maps onto the catalog \
vocabulary); it replaces the hypothesis and is tested again.
- Judge from the numbers, not from what the hypothesis hoped. Sequences listed as "not run" \
are no evidence either way.
- `analysis`: two to four sentences citing the activations (as x/10 of the scale)."""

REVIEW_TASK = """\
Task: review every hypothesis after testing. Set need_more_testing to true only if a \
refined hypothesis has not yet been tested in its refined form, or confirmed hypotheses \
contradict each other, and more tests would change the explanation; otherwise false.
`summary`: which hypotheses hold, with their evidence, in a few sentences."""

FINAL_TASK = """\
Task: write the final explanation of the feature from the tested hypotheses.
- label: at most 120 characters; name the item attribute and the context condition, e.g. \
"latest item is a pre-1970 noir after 2+ noirs; not colour-era crime films".
- description: one to three standalone sentences; someone who never saw the exemplars must \
be able to predict where the feature fires in a new sequence: what fires it, how strongly \
relative to its peaks, what leaves it silent (from confirmed negative controls).
- Build on confirmed and refined hypotheses only; acknowledge contradicting evidence; if \
the feature responds to unrelated concepts, join them with "OR". Use the catalog's genre \
names. If nothing survived testing, say what the exemplars share and that tests did not \
confirm it."""

ONE_SHOT_TASK = """\
Task: read the exemplars below and write the explanation of the feature in one reply, \
without running experiments.
- label: at most 120 characters; name the item attribute and the context condition, e.g. \
"latest item is a pre-1970 noir after 2+ noirs; not colour-era crime films".
- description: one to three standalone sentences; someone who never saw the exemplars must \
be able to predict where the feature fires in a new sequence: what fires it, how strongly \
relative to its peaks, what leaves it silent.
- Prefer attributes whose share among the peak items is well above their catalog base \
rate; if the feature responds to unrelated concepts, join them with "OR". Use the \
catalog's genre names."""

SCORER_DOMAIN = """\
You test an explanation of a latent feature of a next-movie recommender, a model that reads \
a user's watch history left to right (oldest first) and has one activation per position. \
Movies are written `Title (Year) [Genre1|Genre2]`. You see only the explanation."""

GENERATE_TASK = """\
Task: write {n} different item sequences on which, according to the explanation, the \
feature fires strongly at a target position you choose (0-based; -1 = the last item).
- Sequences are 5 to 20 items, oldest first; you may start them with one of the real \
histories below.
- Refer to items by their exact `Title (Year)` or their id. A title the catalog does not \
have makes that sequence a failure, so prefer the listed items; other titles only if you \
are sure the catalog has them exactly."""

PREDICT_TASK = """\
Task: for every window below, predict the feature's activation at each position as a \
number from 0 (silent) to 10 (as strong as its strongest activations), from the \
explanation alone. The activation at a position can depend on that item and the items \
before it. Most features are silent on most positions. Reply with one entry per window \
(its number) and exactly one value per item, in order."""


# ----------------------------------------------------------------------------- schemas


class GeneratedSequence(BaseModel):
    items: list[int | Title] = Field(
        min_length=1, max_length=50, description="Item ids or exact titles, oldest first."
    )
    target_position: int = Field(default=-1, description="0-based; -1 = the last item.")


class GeneratedSequences(BaseModel):
    sequences: list[GeneratedSequence] = Field(min_length=1)


class WindowPrediction(BaseModel):
    window: int = Field(description="The window's number as given.")
    activations: list[float] = Field(description="One value 0-10 per item, in order.")


class WindowPredictions(BaseModel):
    windows: list[WindowPrediction]


# ----------------------------------------------------------------------------- helpers


def _ref(item: Item) -> str:
    """How a prompt names an item so that `Catalog.resolve` reads it back."""
    return f"{item.title} ({item.year})" if item.year is not None else item.title


def _listing(items: list[Item]) -> str:
    return (
        "\n".join(f"  [id {i.idx}] {i.render()} · {i.popularity}" for i in items)
        or "  (none in the catalog)"
    )


def _history(catalog: Catalog, items: list[int], last: int = 8) -> str:
    return " | ".join(_ref(catalog[i]) if i in catalog.items else str(i) for i in items[-last:])


def _scale_note(scale: float) -> str:
    return (
        f"Scale: {scale:.4g} = the mean peak of the feature's top-10 exemplars; x/10 values "
        f"below are 10 x activation / scale. High means >= {0.5 * scale:.4g} (5/10), weak "
        f"{0.1 * scale:.4g} to {0.5 * scale:.4g}, silent below {0.1 * scale:.4g} (1/10)."
    )


def _vocabulary(catalog: Catalog, max_franchises: int = 40) -> str:
    franchises = catalog.franchises
    lines = [
        f"Genres: {', '.join(catalog.genres)}",
        f"Decades: {', '.join(catalog.decades)}",
        f"Popularity bands: {', '.join(POPULARITY_BANDS)}",
    ]
    if franchises:
        more = (
            f" (and {len(franchises) - max_franchises} more)"
            if len(franchises) > max_franchises
            else ""
        )
        lines.append(f"Franchises: {', '.join(franchises[:max_franchises])}{more}")
    return "\n".join(lines)


def exemplar_evidence(ctx: FeatureContext) -> str:
    """What SAGE's hypotheses prompt and the one-shot baseline both read: the scale, every
    exemplar window (activations and popularity bands), the peak-item attributes against
    their catalog base rates, the context statistics, and the catalog vocabulary."""
    return "\n\n".join(
        [
            f"Feature {ctx.feature}. " + _scale_note(ctx.exemplars.scale),
            "Exemplars (one window of +-5 items around each user's peak, with the "
            "activation at every position and each item's popularity band):\n"
            + ctx.exemplars.render(ctx.catalog),
            "Catalog vocabulary:\n" + _vocabulary(ctx.catalog),
        ]
    )


def _usable(spec: Spec, catalog: Catalog) -> Spec:
    """The spec with any value the catalog does not know dropped (LLM specs may invent)."""
    return spec.model_copy(
        update={
            "genre": spec.genre if spec.genre in catalog.genres else None,
            "decade": spec.decade if spec.decade in catalog.decades else None,
            "popularity": spec.popularity if spec.popularity in POPULARITY_BANDS else None,
            "franchise": spec.franchise if spec.franchise in catalog.franchises else None,
        }
    )


def _search(catalog: Catalog, spec: Spec, n: int, seed: int) -> list[Item]:
    """Up to `n` items matching `spec` (a seeded sample when more do)."""
    decade = int(spec.decade[:4]) if spec.decade else None
    hits = catalog.search(
        genre=spec.genre,
        year_from=decade,
        year_to=None if decade is None else decade + 9,
        popularity=spec.popularity,
        franchise=spec.franchise,
        n=4 * n,
        seed=seed,
    )
    return [i for i in hits if spec.item_matches(i)][:n]


def _test_line(ctx: FeatureContext, k: int, test: TestResult) -> str:
    scale = max(ctx.exemplars.scale, 1e-12)
    what = test.plan.get("description", "")
    return (
        f"  test {k}: {what} -> high-expected {10 * test.high_mean / scale:.1f}/10, "
        f"low-expected {10 * test.low_mean / scale:.1f}/10, separation AUC {test.separation:.2f}"
        + (f", {len(test.unresolved)} sequences not run" if test.unresolved else "")
    )


def _hypothesis_header(h: Hypothesis) -> str:
    lines = [f"Hypothesis H{h.id} ({h.kind}, status {h.status}): {h.text}"]
    if h.initial_text != h.text:
        lines.append(f"  (initially: {h.initial_text})")
    return "\n".join(lines)


def _hypothesis_record(ctx: FeatureContext, h: Hypothesis) -> str:
    lines = [_hypothesis_header(h)]
    lines += [_test_line(ctx, k, t) for k, t in enumerate(h.tests, start=1)]
    if h.analyses:
        lines.append(f"  last analysis: {h.analyses[-1]}")
    if not h.tests:
        lines.append("  untested")
    return "\n".join(lines)


class _ChatBacked:
    """A role played by a language model: its chat, its name, the chat's usage, and `on_call`,
    which receives every `CallRecord` (prompts, raw replies, tokens), e.g. for a transcript."""

    def __init__(self, chat: OpenAIChat, on_call: OnCall | None) -> None:
        self.chat = chat
        self.on_call = on_call
        self.name = f"llm:{chat.name}"

    def usage(self) -> dict[str, float]:
        return self.chat.usage.as_dict()

    def _request(self, system: str, user: str, schema: type[T], purpose: str) -> T:
        """One self-contained request: a system prompt and one user message."""
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        try:
            reply, record = self.chat.complete_json(messages, schema, purpose=purpose)
        except LLMError as err:
            if self.on_call is not None and err.record is not None:
                self.on_call(err.record)
            raise
        if self.on_call is not None:
            self.on_call(record)
        return reply


# ----------------------------------------------------------------------------- policy


class LLMPolicy(_ChatBacked):
    """SAGE's decisions by a language model; `on_call` receives every `CallRecord`
    (prompts, raw replies, tokens), e.g. to write it into the feature's transcript."""

    def __init__(
        self, chat: OpenAIChat, catalog_hint_items: int = 30, on_call: OnCall | None = None
    ) -> None:
        super().__init__(chat, on_call)
        self.catalog_hint_items = catalog_hint_items

    def _ask(self, task: str, user: str, schema: type[T], purpose: str) -> T:
        return self._request(f"{DOMAIN}\n\n{HYPOTHESIS_GUIDE}\n\n{task}", user, schema, purpose)

    # -- states

    def hypotheses(self, ctx: FeatureContext) -> HypothesesReply:
        user = exemplar_evidence(ctx)
        return self._ask(HYPOTHESES_TASK, user, HypothesesReply, f"sage hypotheses f{ctx.feature}")

    def design(self, ctx: FeatureContext, hypothesis: Hypothesis) -> ExperimentPlan:
        h = hypothesis
        seed = ctx.seed + 1000 * h.id + len(h.tests) + 7 * ctx.feature
        sections = [_hypothesis_header(h), _scale_note(ctx.exemplars.scale)]
        if h.tests:
            done = [_test_line(ctx, k, t) for k, t in enumerate(h.tests, start=1)]
            last = h.tests[-1]
            sections.append(
                "Tests already run on it:\n"
                + "\n".join(done)
                + "\nThe last one in detail:\n"
                + render_result(ctx, last, max_items=6)
                + (f"\nIts analysis: {h.analyses[-1]}" if h.analyses else "")
            )
        sections.append(
            "Top exemplars (+-5 items around each peak):\n" + ctx.exemplars.render(ctx.catalog, n=5)
        )
        sections += self._candidates(ctx, h, seed)
        return self._ask(
            DESIGN_TASK,
            "\n\n".join(sections),
            ExperimentPlan,
            f"sage design f{ctx.feature} H{h.id}",
        )

    def _candidates(self, ctx: FeatureContext, h: Hypothesis, seed: int) -> list[str]:
        """Catalog search results to pick valid titles from: items matching the hypothesis,
        popularity-matched items that do not, untested exemplar peaks, franchise runs and
        real histories."""
        catalog, half = ctx.catalog, max(2, self.catalog_hint_items // 2)
        given = h.spec if h.spec is not None and not h.spec.empty else None
        spec = _usable(given or parse_spec(h.text, catalog), catalog)
        matching = _search(catalog, spec, half, seed)
        out = []
        if spec.empty:
            out.append(
                "The hypothesis names no catalog attribute; a sample of the catalog:\n"
                + _listing(matching)
            )
        else:
            out.append(f"Items matching {spec.describe()} (catalog search):\n" + _listing(matching))
        taken = {i.idx for i in matching}
        controls: list[Item] = []
        if spec.popularity is not None:  # a popularity claim: the rest of it, other bands
            rest = spec.model_copy(update={"popularity": None})
            pool = _search(catalog, rest, 4 * half, seed + 1)
            controls = [i for i in pool if not spec.item_matches(i)][: len(matching)]
            like = "" if rest.empty else f" like {rest.describe()}"
            heading = f"Items{like} from other popularity bands"
        else:
            for band, count in sorted(Counter(i.popularity for i in matching).items()):
                pool = catalog.search(popularity=band, n=8 * count + 8, seed=seed + 1)
                picks = [
                    i
                    for i in pool
                    if i.idx not in taken and (spec.empty or not spec.item_matches(i))
                ][:count]
                controls += picks
                taken |= {i.idx for i in picks}
            heading = "Popularity-matched items outside the hypothesis"
        out.append(f"{heading} (for low controls):\n" + _listing(controls))
        franchises = sorted({i.franchise for i in matching if i.franchise})
        if spec.sequel or spec.franchise:
            franchises = franchises or catalog.franchises
            runs = []
            for name in franchises[:5]:
                parts = sorted(
                    (i for i in catalog.items.values() if i.franchise == name),
                    key=lambda i: (i.installment or 0, i.year or 0),
                )
                runs.append(f"  {name}: " + " -> ".join(_ref(i) for i in parts))
            out.append("Franchise installments in order:\n" + "\n".join(runs))
        used = {i for t in h.tests for seq in t.sequences for i in seq}
        strong = 0.5 * ctx.exemplars.scale
        peaks: dict[int, Item] = {}
        for w in ctx.exemplars.windows:
            idx = w.items[w.peak_offset]
            if w.peak >= strong and idx in catalog.items and idx not in used:
                peaks.setdefault(idx, catalog[idx])
        if peaks:
            out.append(
                "Exemplar peak items (>= 5/10) no test of this hypothesis has used yet:\n"
                + _listing(list(peaks.values())[:5])
            )
        if ctx.prefixes:
            k = len(h.tests)
            chosen = [ctx.prefixes[(k + j) % len(ctx.prefixes)] for j in range(3)]
            unique = [p for n, p in enumerate(chosen) if p and p not in chosen[:n]]
            out.append(
                "Real user histories (oldest first) to put targets after:\n"
                + "\n".join(
                    f"  history {n}: {_history(catalog, p)}" for n, p in enumerate(unique, start=1)
                )
            )
        return out

    def analyse(
        self, ctx: FeatureContext, hypothesis: Hypothesis, result: TestResult
    ) -> VerdictReply:
        h = hypothesis
        sections = [_hypothesis_header(h), _scale_note(ctx.exemplars.scale)]
        earlier = h.tests[:-1] if h.tests and h.tests[-1] is result else h.tests
        if earlier:
            sections.append(
                "Earlier tests of it:\n"
                + "\n".join(_test_line(ctx, k, t) for k, t in enumerate(earlier, start=1))
                + "".join(f"\n  analysis: {a}" for a in h.analyses[-2:])
            )
        sections.append(
            f"The experiment just run: {result.plan.get('description', '')}\n"
            + render_result(ctx, result)
        )
        peaks = [
            f"  {ctx.catalog.render(w.items[w.peak_offset])}: {10 * w.peak / max(ctx.exemplars.scale, 1e-12):.1f}/10"
            for w in ctx.exemplars.windows[:5]
        ]
        sections.append("For reference, the top exemplar peaks:\n" + "\n".join(peaks))
        return self._ask(
            ANALYSE_TASK,
            "\n\n".join(sections),
            VerdictReply,
            f"sage analyse f{ctx.feature} H{h.id}",
        )

    def review(self, ctx: FeatureContext, hypotheses: list[Hypothesis]) -> ReviewReply:
        user = "\n\n".join(
            [_scale_note(ctx.exemplars.scale)] + [_hypothesis_record(ctx, h) for h in hypotheses]
        )
        return self._ask(REVIEW_TASK, user, ReviewReply, f"sage review f{ctx.feature}")

    def final(self, ctx: FeatureContext, hypotheses: list[Hypothesis]) -> FinalReply:
        user = "\n\n".join(
            [
                _scale_note(ctx.exemplars.scale),
                "Hypotheses and their tests:\n"
                + "\n".join(_hypothesis_record(ctx, h) for h in hypotheses),
                "Top exemplars (+-5 items around each peak):\n"
                + ctx.exemplars.render(ctx.catalog, n=5),
            ]
        )
        return self._ask(FINAL_TASK, user, FinalReply, f"sage final f{ctx.feature}")

    def one_shot(self, ctx: FeatureContext) -> FinalReply:
        """The one-shot baseline: the same system context and the same evidence as SAGE's
        first prompt (`exemplar_evidence`), one reply, no experiments."""
        return self._ask(
            ONE_SHOT_TASK, exemplar_evidence(ctx), FinalReply, f"baseline f{ctx.feature}"
        )


# ----------------------------------------------------------------------------- scorer


def vocabulary_items(catalog: Catalog, n: int = 60, seed: int = 0) -> list[Item]:
    """About `n` real items spread over genres and popularity bands: round-robin over
    (band, genre) cells in a seeded order, a seeded pick from each."""
    cells: dict[tuple[str, str], list[Item]] = {}
    for item in catalog.items.values():
        for genre in item.genres:
            cells.setdefault((item.popularity, genre), []).append(item)
    rng = np.random.default_rng(seed)
    keys = sorted(cells)
    order = [keys[k] for k in rng.permutation(len(keys))]  # a cut at `n` hits no band or genre
    chosen: dict[int, Item] = {}
    while len(chosen) < min(n, len(catalog.items)):
        added = False
        for key in order:
            pool = [i for i in cells[key] if i.idx not in chosen]
            if pool and len(chosen) < n:
                pick = pool[int(rng.integers(len(pool)))]
                chosen[pick.idx] = pick
                added = True
        if not added:
            break
    return sorted(chosen.values(), key=lambda i: (i.genres[:1], i.popularity_rank))


class LLMScorer(_ChatBacked):
    """Generative and predictive readings of an explanation by a language model, which sees
    the explanation and items only (never exemplars, activations or the explainer's notes)."""

    def __init__(
        self,
        chat: OpenAIChat,
        windows_per_call: int = 10,
        vocabulary_size: int = 60,
        on_call: OnCall | None = None,
    ) -> None:
        super().__init__(chat, on_call)
        self.windows_per_call = windows_per_call
        self.vocabulary_size = vocabulary_size

    def generate(self, explanation: str, n: int, scoring: ScoringSet) -> list[SequenceSpec]:
        catalog = scoring.catalog
        items = vocabulary_items(catalog, self.vocabulary_size, scoring.seed)
        histories = [p for p in scoring.prefixes if p][:3]
        sections = [
            f"Explanation: {explanation}",
            "Catalog vocabulary:\n" + _vocabulary(catalog),
            "Catalog items (a sample spread over genres and popularity):\n" + _listing(items),
        ]
        if histories:
            sections.append(
                "Real user histories (oldest first):\n"
                + "\n".join(
                    f"  history {k}: {_history(catalog, p)}" for k, p in enumerate(histories, 1)
                )
            )
        system = f"{SCORER_DOMAIN}\n\n{GENERATE_TASK.format(n=n)}"
        reply = self._request(system, "\n\n".join(sections), GeneratedSequences, "score generate")
        return [
            SequenceSpec(items=s.items, target_position=s.target_position, expect="high")
            for s in reply.sequences[:n]
        ]

    def predict(
        self, explanation: str, windows: list[Window], scoring: ScoringSet
    ) -> list[list[float]]:
        out: list[list[float]] = []
        for start in range(0, len(windows), self.windows_per_call):
            out += self._predict_batch(
                explanation, windows[start : start + self.windows_per_call], scoring.catalog
            )
        return out

    def _predict_batch(
        self, explanation: str, windows: list[Window], catalog: Catalog
    ) -> list[list[float]]:
        blocks = [f"Explanation: {explanation}"]
        for k, w in enumerate(windows, start=1):
            lines = [f"Window {k} ({len(w.items)} items, oldest first):"]
            lines += [f"  {p}: {catalog.render(i)}" for p, i in enumerate(w.items)]
            blocks.append("\n".join(lines))
        system = f"{SCORER_DOMAIN}\n\n{PREDICT_TASK}"
        purpose = f"score predict {len(windows)} windows"
        reply = self._request(system, "\n\n".join(blocks), WindowPredictions, purpose)
        by_window = {p.window: p.activations for p in reply.windows}
        out = []
        for k, w in enumerate(windows, start=1):
            values = by_window.get(k)
            if values is None or len(values) != len(w.items):
                log.warning(
                    "%s: window %d has %s predictions for %d items; padding with 0 / truncating",
                    self.name,
                    k,
                    "no" if values is None else len(values),
                    len(w.items),
                )
            values = list(values or [])[: len(w.items)]
            values += [0.0] * (len(w.items) - len(values))
            out.append([float(min(10.0, max(0.0, v))) for v in values])
        return out
