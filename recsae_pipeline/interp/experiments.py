"""SAGE experiments: crafted item sequences, the feature's activations on them, and their rendering."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recsae_pipeline.data.catalog import Catalog, UnknownItemError
from recsae_pipeline.interp.exemplars import Exemplars
from recsae_pipeline.interp.probe import FeatureProbe
from recsae_pipeline.interp.replies import ExperimentPlan
from recsae_pipeline.interp.windows import EXPLAIN_USERS, FeatureData
from recsae_pipeline.models.metrics import pairwise_auc


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
