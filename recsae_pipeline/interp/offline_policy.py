"""The offline explainer policy: SAGE's decisions from statistics over item metadata, no language model."""

from __future__ import annotations

import numpy as np

from recsae_pipeline.interp.experiments import FeatureContext, TestResult
from recsae_pipeline.interp.replies import (
    ExperimentPlan,
    FinalReply,
    HypothesesReply,
    HypothesisDraft,
    ReviewReply,
    SequenceSpec,
    Status,
    VerdictReply,
)
from recsae_pipeline.interp.sage import Hypothesis
from recsae_pipeline.interp.spec import Spec


class OfflinePolicy:
    """A deterministic explainer from statistics over item metadata, no language model.

    Hypotheses are the exemplar peak items' most enriched attributes (share against the
    catalog base rate), a context hypothesis when the peaks sit in same-genre runs or right
    after a franchise predecessor, and a negative control (popularity-matched items without
    the best attribute stay low). Experiments put matching and popularity-matched
    non-matching items after real user histories; verdicts compare the two groups on the
    feature's own scale, and an ambiguous result narrows the claim by the next attribute.
    Its one-shot answer (the baseline) is the first hypothesis, from the same statistics."""

    name = "offline (statistical policy, no LLM)"

    def __init__(self, sequences_per_group: int = 6, seed: int = 0) -> None:
        self.n = sequences_per_group
        self.seed = seed

    def usage(self) -> dict[str, float]:
        return {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}

    # -- hypotheses

    def _ranked_specs(self, ctx: FeatureContext) -> list[tuple[Spec, float]]:
        """The peak items' enriched attributes (share >= 0.3, purity > 0.1), most enriched
        first; when none is, the most common peak attribute. The evidence SAGE's hypotheses
        and the one-shot baseline both start from."""
        out = []
        for attribute, share, _base, purity in ctx.exemplars.enriched():
            if share >= 0.3 and purity > 0.1:
                out.append((Spec.of(attribute), purity))
        if not out:
            shares = ctx.exemplars.attribute_shares
            out = [(Spec.of(max(shares, key=lambda a: (shares[a], a))), 0.0)]
        return out

    def hypotheses(self, ctx: FeatureContext) -> HypothesesReply:
        ranked = self._ranked_specs(ctx)
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
        """What a one-shot reader of the same evidence writes: the peak items' most enriched
        attribute against the catalog base rate (SAGE's first hypothesis), untested."""
        spec = self._ranked_specs(ctx)[0][0]
        attribute = next(f"{k}:{v}" for k, v in spec.model_dump(exclude_defaults=True).items())
        share = ctx.exemplars.attribute_shares.get(attribute, 0.0)
        base = ctx.exemplars.base_rates.get(attribute, 0.0)
        label = spec.describe()
        return FinalReply(
            label=label,
            description=f"The exemplars' peak items are mostly {label}: {share:.0%} of the "
            f"{len(ctx.exemplars.windows)} peaks against a catalog base rate of {base:.0%}.",
        )
