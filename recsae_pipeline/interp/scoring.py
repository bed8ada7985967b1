"""Scoring explanations, the same way for every method: the scorer sees only the text.

- Generative accuracy (SAGE's protocol): the scorer writes N sequences from the explanation's
  LABEL alone, each with a target position; a success is an activation there >= 0.5 x the
  mean peak of the feature's top-10 exemplars. Items it names that the catalog does not have
  make that sequence a failure. The same from the label and the description together is
  reported beside it (`generative_accuracy_description`).
- Predictive accuracy (from the label and the description): held-out windows (odd users, never shown to an explainer), stratified
  by peak activation, plus random windows where the feature is silent; the scorer predicts
  0-10 per position. Reported: Pearson r over all positions pooled (true activations x10 /
  scale), and the AUC of telling active windows from silent ones by the predicted maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from recsae_pipeline.data.catalog import Catalog, UnknownItemError
from recsae_pipeline.interp.experiments import FeatureContext
from recsae_pipeline.interp.replies import SequenceSpec
from recsae_pipeline.interp.sage import Explanation
from recsae_pipeline.interp.spec import Spec, claims_partial_score, parse_claims
from recsae_pipeline.interp.windows import FeatureData, Window
from recsae_pipeline.models.metrics import pairwise_auc

HELDOUT_USERS = 1
"""user_idx % 2 of the users whose windows are scored (explainers see the other parity)."""


class Scorer(Protocol):
    name: str

    def generate(self, explanation: str, n: int, scoring: ScoringSet) -> list[SequenceSpec]: ...

    def predict(
        self, explanation: str, windows: list[Window], scoring: ScoringSet
    ) -> list[list[float]]: ...

    def usage(self) -> dict[str, float]: ...


@dataclass
class ScoringSet:
    """One feature's held-out material, shared by every method it scores."""

    catalog: Catalog
    scale: float
    threshold: float
    """0.5 x the mean peak of the top-10 exemplars."""
    active: list[Window]
    silent: list[Window]
    prefixes: list[list[int]]
    """Real held-out histories the scorer may put generated items after."""
    seed: int = 0

    @property
    def windows(self) -> list[Window]:
        return self.active + self.silent


def scoring_set(
    data: FeatureData,
    catalog: Catalog,
    scale: float,
    strata: int = 5,
    per_stratum: int = 4,
    n_silent: int = 10,
    radius: int = 5,
    n_prefixes: int = 10,
    seed: int = 0,
) -> ScoringSet:
    """Active windows: held-out users' peaks split into `strata` quantile bins of activation,
    `per_stratum` drawn from each (seeded); silent windows: random held-out windows where
    the feature is zero at every position."""
    rng = np.random.default_rng(seed)
    peaks = data.peaks(HELDOUT_USERS)
    centres: list[tuple[int, int]] = []
    if peaks:
        for chunk in np.array_split(np.arange(len(peaks)), min(strata, len(peaks))):
            take = rng.choice(chunk, size=min(per_stratum, len(chunk)), replace=False)
            centres += [(peaks[i][0], peaks[i][1]) for i in sorted(take)]
    active = data.windows(centres, radius)
    silent: list[Window] = []
    for attempt in range(5):
        for w in data.random_windows(HELDOUT_USERS, 4 * n_silent, radius, seed + 101 + attempt):
            finite = [a for a in w.activations if not math.isnan(a)]
            if finite and max(finite) == 0.0 and len(silent) < n_silent:
                silent.append(w)
        if len(silent) >= n_silent:
            break
    prefixes = [
        list(w.items[: w.peak_offset]) or list(w.items)
        for w in data.random_windows(HELDOUT_USERS, n_prefixes, radius=8, seed=seed + 7)
    ]
    return ScoringSet(catalog, scale, 0.5 * scale, active, silent, prefixes, seed)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _generative(
    text: str, ctx: FeatureContext, scoring: ScoringSet, scorer: Scorer, n_generated: int
) -> dict:
    """Share of `n_generated` sequences written from `text` whose target reaches the
    threshold; unresolvable or missing sequences count as failures."""
    generated = scorer.generate(text, n_generated, scoring)[:n_generated]
    failures = 0
    sequences, targets = [], []
    for spec in generated:
        try:
            items = ctx.catalog.resolve(spec.items)
        except UnknownItemError:
            failures += 1
            continue
        position = (
            spec.target_position if spec.target_position >= 0 else len(items) + spec.target_position
        )
        if not 0 <= position < len(items):
            failures += 1
            continue
        sequences.append(items)
        targets.append(position)
    values = []
    if sequences:
        max_len = ctx.probe.model.config.max_len
        for seq, position, acts in zip(
            sequences, targets, ctx.probe.activations(sequences, ctx.feature), strict=True
        ):
            shift = max(0, len(seq) - max_len)
            values.append(float(acts[position - shift]) if position >= shift else 0.0)
    hits = sum(v >= scoring.threshold for v in values)
    return {
        "accuracy": hits / n_generated if n_generated else float("nan"),
        "unresolved": failures,
        "mean_activation": float(np.mean(values)) if values else 0.0,
    }


def score_explanation(
    explanation: Explanation,
    ctx: FeatureContext,
    scoring: ScoringSet,
    scorer: Scorer,
    n_generated: int = 10,
) -> dict:
    """Generative accuracy from the label (and from label + description), predictive
    Pearson r and detection AUC (from label + description) of one explanation."""
    text = explanation.text
    from_label = _generative(explanation.label, ctx, scoring, scorer, n_generated)
    from_text = _generative(text, ctx, scoring, scorer, n_generated)
    windows = scoring.windows
    predictions = scorer.predict(text, windows, scoring)
    true, predicted, window_max = [], [], []
    for w, pred in zip(windows, predictions, strict=True):
        pred = list(pred)[: len(w.items)] + [0.0] * max(0, len(w.items) - len(pred))
        for act, p in zip(w.activations, pred, strict=True):
            if not math.isnan(act):
                true.append(10 * act / scoring.scale if scoring.scale > 0 else 0.0)
                predicted.append(float(p))
        window_max.append(max(pred) if pred else 0.0)
    labels = [True] * len(scoring.active) + [False] * len(scoring.silent)
    return {
        "feature": explanation.feature,
        "method": explanation.method,
        "backend": explanation.backend,
        "scorer": scorer.name,
        "generative_accuracy": from_label["accuracy"],
        "generative_accuracy_description": from_text["accuracy"],
        "generated": n_generated,
        "generated_unresolved": from_label["unresolved"],
        "generated_unresolved_description": from_text["unresolved"],
        "generated_mean_activation": from_label["mean_activation"],
        "generated_mean_activation_description": from_text["mean_activation"],
        "predictive_r": _pearson(np.asarray(true), np.asarray(predicted)),
        "detection_auc": pairwise_auc(
            [m for m, active in zip(window_max, labels, strict=True) if active],
            [m for m, active in zip(window_max, labels, strict=True) if not active],
            empty=float("nan"),
        ),
        "windows_active": len(scoring.active),
        "windows_silent": len(scoring.silent),
        "threshold": scoring.threshold,
    }


class OfflineScorer:
    """Reads the explanation against the catalog vocabulary (`parse_claims`: genres, decades
    or years, popularity words, franchise names, sequel and genre-run phrases; "or" and
    "also" start an alternative claim) and nothing else.

    generate: sequence k takes claim k mod the number of claims: its item (seeded pick)
    after a real held-out history, with the run or predecessor it asks for; predict: 10 x
    the best share of one claim's conditions each position meets."""

    name = "offline (catalog-vocabulary reader, no LLM)"

    def usage(self) -> dict[str, float]:
        return {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}

    def generate(self, explanation: str, n: int, scoring: ScoringSet) -> list[SequenceSpec]:
        catalog = scoring.catalog
        claims = parse_claims(explanation, catalog) or [Spec()]
        rng = np.random.default_rng(scoring.seed + 17)
        popular = [
            i.idx for i in sorted(catalog.items.values(), key=lambda i: i.popularity_rank)[:50]
        ]
        pools = [
            [i.idx for i in catalog.items.values() if spec.item_matches(i)]
            if not spec.empty
            else []
            for spec in claims
        ]
        out = []
        for k in range(n):
            spec, matching = claims[k % len(claims)], pools[k % len(claims)]
            target = int(rng.choice(matching or popular))  # nothing to go on: popular items
            prefix = list(scoring.prefixes[k % len(scoring.prefixes)]) if scoring.prefixes else []
            prefix = [i for i in prefix if i != target]
            if spec.genre_run and spec.genre:
                run = [
                    i.idx
                    for i in catalog.items.values()
                    if spec.genre in i.genres and i.idx != target
                ]
                prefix += [
                    int(i)
                    for i in rng.choice(run, size=min(spec.genre_run, len(run)), replace=False)
                ]
            if spec.sequel:
                item = catalog[target]
                prefix += [i.idx for i in catalog.items.values()
                           if i.franchise == item.franchise and i.installment == (item.installment or 0) - 1][:1]  # fmt: skip
            out.append(SequenceSpec(items=[*prefix, target], target_position=-1, expect="high"))
        return out

    def predict(
        self, explanation: str, windows: list[Window], scoring: ScoringSet
    ) -> list[list[float]]:
        claims = parse_claims(explanation, scoring.catalog)
        return [
            [
                10.0 * claims_partial_score(claims, scoring.catalog, list(w.items), p)
                for p in range(len(w.items))
            ]
            for w in windows
        ]
