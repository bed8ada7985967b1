"""A feature's top exemplars: the windows around its peak activations."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from recsae_pipeline.data.catalog import Catalog
from recsae_pipeline.interp.windows import EXPLAIN_USERS, FeatureData, Window


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

    def render(self, catalog: Catalog, n: int | None = None) -> str:
        """The exemplars as text: each window's items with their activations and popularity
        band, then the peak-item attributes against the catalog base rates and the context
        statistics. Every window by default: what SAGE and the baseline both read."""
        shown = self.windows if n is None else self.windows[:n]
        lines = [f"Feature scale (mean peak of the top 10): {self.scale:.4f}"]
        for rank, w in enumerate(shown, start=1):
            lines.append(f"Exemplar {rank} (user {w.user_idx}, peak {w.peak:.4f}):")
            for offset, (item, act) in enumerate(zip(w.items, w.activations, strict=True)):
                mark = " <= peak" if offset == w.peak_offset else ""
                value = "n/a" if np.isnan(act) else f"{act:.3f}"
                band = f" · {catalog[item].popularity}" if item in catalog.items else ""
                lines.append(f"  {value:>7}  {catalog.render(item)}{band}{mark}")
        lines.append(
            f"Peak-item attributes over all {len(self.windows)} exemplars vs the catalog base "
            "rate (share / base):"
        )
        for attribute, share, base, _ in self.enriched()[:12]:
            lines.append(f"  {attribute}: {share:.2f} / {base:.2f}")
        for name, value in self.context.items():
            lines.append(f"  context {name}: {value:.2f}")
        return "\n".join(lines)


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
