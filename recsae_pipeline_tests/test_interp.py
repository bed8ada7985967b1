"""The SAGE loop, the offline policy and the offline scorer on a hand-built feature: one that
fires on Horror films, harder after another Horror film."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from recsae_pipeline.data.catalog import Catalog, Item, UnknownItemError
from recsae_pipeline.interp.exemplars import Exemplars
from recsae_pipeline.interp.experiments import FeatureContext
from recsae_pipeline.interp.offline_policy import OfflinePolicy
from recsae_pipeline.interp.sage import Limits, Transcript, run_baseline, run_sage
from recsae_pipeline.interp.scoring import OfflineScorer, ScoringSet, score_explanation
from recsae_pipeline.interp.spec import Spec, parse_claims, parse_spec
from recsae_pipeline.interp.windows import Window

GENRES = ["Horror", "Comedy", "Drama", "Western"]


def make_catalog(n: int = 80) -> Catalog:
    items = {}
    for i in range(1, n + 1):
        genre = GENRES[i % 4]
        extra = ("Drama",) if genre == "Horror" and i % 3 == 0 else ()
        items[i] = Item(
            idx=i,
            item_id=f"i{i}",
            title=f"{genre} Story {i}",
            year=1950 + (i * 7) % 60,
            genres=(genre, *extra),
            popularity=("head", "torso", "tail")[min(2, i * 3 // n)],
            popularity_rank=i,
            franchise="Night" if i in (4, 8, 12) else None,
            installment={4: 1, 8: 2, 12: 3}.get(i),
        )
    return Catalog(items)


class HorrorFeature:
    """Stands in for FeatureProbe: 1.0 on a Horror item, 2.0 if the previous one was Horror too."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.model = SimpleNamespace(config=SimpleNamespace(max_len=50))
        self.runs = 0

    def value(self, items: list[int], p: int) -> float:
        if "Horror" not in self.catalog[items[p]].genres:
            return 0.0
        return 2.0 if p > 0 and "Horror" in self.catalog[items[p - 1]].genres else 1.0

    def activations(self, sequences: list[list[int]], feature: int) -> list[np.ndarray]:
        self.runs += len(sequences)
        return [
            np.array([self.value(list(s), p) for p in range(len(s))], np.float32) for s in sequences
        ]


def window(probe: HorrorFeature, user: int, items: list[int], peak: int) -> Window:
    acts = tuple(probe.value(items, p) for p in range(len(items)))
    return Window(user, peak, 0, tuple(items), acts)


@pytest.fixture
def ctx() -> FeatureContext:
    catalog = make_catalog()
    probe = HorrorFeature(catalog)
    rng = np.random.default_rng(0)
    horror = [i for i in catalog.items if "Horror" in catalog[i].genres]
    other = [i for i in catalog.items if "Horror" not in catalog[i].genres]
    windows = []
    for user in range(20):  # each exemplar: some other films, then two Horror films
        items = [
            *rng.choice(other, 4, replace=False).tolist(),
            *rng.choice(horror, 2, replace=False).tolist(),
        ]
        windows.append(window(probe, 2 * user, [int(i) for i in items], 5))
    peak_items = [catalog[w.items[w.peak_offset]] for w in windows]
    counts = Counter(a for item in peak_items for a in item.attributes())
    exemplars = Exemplars(
        windows=windows,
        scale=float(np.mean([w.peak for w in windows[:10]])),
        attribute_shares={a: c / len(peak_items) for a, c in counts.items()},
        base_rates=catalog.base_rates,
        context={"share_after_2plus_same_genre": 0.0, "share_sequel_after_predecessor": 0.0},
    )
    prefixes = [[int(i) for i in rng.choice(other, 5, replace=False)] for _ in range(6)]
    return FeatureContext(7, catalog, probe, None, exemplars, 0, prefixes)  # type: ignore[arg-type]


def test_spec_text_round_trips_through_the_catalog_vocabulary() -> None:
    catalog = make_catalog()
    for spec in (
        Spec(genre="Horror"),
        Spec(genre="Western", decade="1960s"),
        Spec(genre="Comedy", popularity="tail"),
        Spec(popularity="head"),
        Spec(franchise="Night", sequel=True),
        Spec(genre="Drama", genre_run=3),
    ):
        assert parse_spec(spec.describe(), catalog) == spec, spec.describe()
    text = "Horror films. It stays silent on Comedy films from the 1980s"
    assert parse_spec(text, catalog) == Spec(genre="Horror")
    assert parse_spec("no pattern at all", catalog).empty


def test_catalog_resolves_ids_titles_and_suggests_close_matches() -> None:
    catalog = make_catalog()
    assert catalog.resolve([5, "5", "horror story 8", "Horror Story 12 (2034)"]) == [5, 5, 8, 12]
    with pytest.raises(UnknownItemError, match="close matches: \\['Horror Story 8'"):
        catalog.resolve(["Horror Stori 8"])
    with pytest.raises(UnknownItemError, match="not in the catalog"):
        catalog.resolve([999])
    hits = catalog.search(genre="Western", year_from=1960, year_to=1979, n=50)
    assert hits and all("Western" in i.genres and 1960 <= i.year <= 1979 for i in hits)
    with pytest.raises(ValueError, match="close"):
        catalog.search(genre="Horor")


def test_offline_sage_finds_the_concept_and_keeps_a_transcript(
    ctx: FeatureContext, tmp_path: Path
) -> None:
    transcript = Transcript(tmp_path / "t.jsonl")
    explanation = run_sage(ctx, OfflinePolicy(), Limits(max_tests_per_hypothesis=2), transcript)
    transcript.close()
    assert parse_spec(explanation.text, ctx.catalog).genre == "Horror"
    kinds = [h["kind"] for h in explanation.hypotheses]
    assert len(kinds) >= 3 and "negative_control" in kinds
    first = explanation.hypotheses[0]
    assert first["status"] == "confirmed" and "Horror" in first["text"]
    control = next(h for h in explanation.hypotheses if h["kind"] == "negative_control")
    assert control["status"] == "confirmed"
    assert all(h["tests"] <= 2 for h in explanation.hypotheses)
    assert explanation.experiments == sum(h["tests"] for h in explanation.hypotheses)
    assert "offline" in explanation.backend and explanation.usage["calls"] == 0
    states = [json.loads(line)["state"] for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert states[0] == "exemplars" and states[-1] == "done"
    assert {"hypotheses", "design", "run", "analyse", "final"} <= set(states)


def test_caps_bound_the_loop(ctx: FeatureContext) -> None:
    explanation = run_sage(ctx, OfflinePolicy(), Limits(max_tests_per_hypothesis=1, max_sweeps=1))
    assert explanation.experiments == len(explanation.hypotheses)
    assert all(h["tests"] == 1 for h in explanation.hypotheses)


def scoring(ctx: FeatureContext) -> ScoringSet:
    catalog, probe = ctx.catalog, ctx.probe
    horror = [i for i in catalog.items if "Horror" in catalog[i].genres]
    other = [i for i in catalog.items if "Horror" not in catalog[i].genres]
    active = [window(probe, 2 * u + 1, [other[u], horror[u], horror[u + 1]], 2) for u in range(8)]
    silent = [window(probe, 2 * u + 1, other[u : u + 3], 1) for u in range(8)]
    return ScoringSet(
        catalog, ctx.exemplars.scale, 0.5 * ctx.exemplars.scale, active, silent, ctx.prefixes
    )


def test_offline_scorer_rewards_the_right_explanation(ctx: FeatureContext) -> None:
    sset = scoring(ctx)
    sage = run_sage(ctx, OfflinePolicy())
    good = score_explanation(sage, ctx, sset, OfflineScorer())
    wrong = score_explanation(
        sage.__class__(**{**sage.__dict__, "label": "Western films", "description": "Westerns."}),
        ctx,
        sset,
        OfflineScorer(),
    )
    assert good["generative_accuracy"] == 1.0 and wrong["generative_accuracy"] == 0.0
    assert good["predictive_r"] > 0.8 and good["detection_auc"] == 1.0
    assert not wrong["predictive_r"] > 0  # NaN (constant) or negative
    assert wrong["detection_auc"] < 0.5  # it points at the Westerns among the silent windows


def test_baseline_is_one_shot(ctx: FeatureContext) -> None:
    baseline = run_baseline(ctx, OfflinePolicy())
    assert baseline.method == "baseline" and baseline.experiments == 0 and ctx.probe.runs == 0
    assert "Horror" in baseline.label


def test_an_llm_failure_concludes_with_what_is_known(ctx: FeatureContext) -> None:
    from recsae_pipeline.interp.llm import LLMReplyError

    class Flaky(OfflinePolicy):
        def design(self, ctx, hypothesis):  # noqa: ANN001, ANN202
            if hypothesis.id == 2:
                raise LLMReplyError("reply still invalid after one correction")
            return super().design(ctx, hypothesis)

    explanation = run_sage(ctx, Flaky())
    assert explanation.stopped_by.startswith("llm error: reply still invalid")
    assert explanation.hypotheses[0]["tests"] == 1 and explanation.label


def test_also_starts_an_alternative_claim_not_a_conjunction(ctx: FeatureContext) -> None:
    catalog = ctx.catalog
    text = "Fires on Horror films. It also responds to films from the 1950s."
    assert parse_claims(text, catalog) == [Spec(genre="Horror"), Spec(decade="1950s")]
    assert parse_spec(text, catalog) == Spec(genre="Horror")  # not Horror films of the 1950s
    assert parse_claims("Western films OR Comedy films from the 1980s", catalog) == [
        Spec(genre="Western"),
        Spec(genre="Comedy", decade="1980s"),
    ]
    negated = "Horror films. It stays silent on Comedy or Drama films."
    assert parse_claims(negated, catalog) == [Spec(genre="Horror")]
    comedy_50s = next(
        i for i in catalog.items.values() if i.genres == ("Comedy",) and i.decade == "1950s"
    )
    horror_90s = next(
        i for i in catalog.items.values() if "Horror" in i.genres and i.decade == "1990s"
    )
    windows = [
        Window(1, 0, 0, (comedy_50s.idx,), (0.0,)),
        Window(3, 0, 0, (horror_90s.idx,), (0.0,)),
    ]
    predicted = OfflineScorer().predict(text, windows, scoring(ctx))
    assert predicted == [[10.0], [10.0]]  # each fully meets one claim (a conjunction: 5 and 5)


def test_generative_accuracy_is_scored_from_the_label_alone(ctx: FeatureContext) -> None:
    sset = scoring(ctx)
    sage = run_sage(ctx, OfflinePolicy())
    claim = sage.__class__(
        **{
            **sage.__dict__,
            "label": "Horror films",
            "description": "Fires on Horror films. It also responds to Western films.",
        }
    )
    scores = score_explanation(claim, ctx, sset, OfflineScorer())
    assert scores["generative_accuracy"] == 1.0  # every Horror target fires
    assert scores["generative_accuracy_description"] == 0.5  # half the targets are Westerns
    assert scores["generated_mean_activation"] > scores["generated_mean_activation_description"]


def test_sage_and_the_baseline_read_the_same_exemplars(ctx: FeatureContext, tmp_path: Path) -> None:
    read = {}
    for name, run in (("sage", run_sage), ("baseline", run_baseline)):
        transcript = Transcript(tmp_path / f"{name}.jsonl")
        run(ctx, OfflinePolicy(), transcript=transcript)
        transcript.close()
        first = json.loads((tmp_path / f"{name}.jsonl").read_text().splitlines()[0])
        read[name] = (first["state"], first["exemplars"], first["scale"])
    assert read["sage"] == read["baseline"]
    state, text, _ = read["sage"]
    assert state == "exemplars" and f"Exemplar {len(ctx.exemplars.windows)} " in text
    assert "vs the catalog base rate" in text and " · head" in text
