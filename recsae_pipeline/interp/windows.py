"""What an explainer can do with one SAE feature: read its exemplars, search the catalog, and
run experiments (crafted item sequences -> the feature's activation at every position).

Users are split in two by parity: exemplars (what explainers see) come from even user_idx,
held-out windows for scoring from odd user_idx, so no scored window was ever shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import numpy as np

from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline.storage.sql import read_parquet

EXPLAIN_USERS = 0


"""user_idx % 2 of the users whose windows explainers see; the other parity is held out."""


@dataclass(frozen=True)
class Window:
    """A stretch of one user's sequence around a position, with the feature's activation at
    each position (NaN where the model never saw that position: beyond its max_len)."""

    user_idx: int
    peak_position: int
    """Position (0-based, full sequence) of the peak."""
    start: int
    items: tuple[int, ...]
    activations: tuple[float, ...]

    @property
    def peak_offset(self) -> int:
        return self.peak_position - self.start

    @property
    def peak(self) -> float:
        return self.activations[self.peak_offset]


class FeatureData:
    """One feature's stored activations (feature_activations) joined with the sequences."""

    def __init__(
        self, paths: ArtifactPaths, model: str, layer: int, feature: int, max_len: int
    ) -> None:
        self.paths = paths
        self.max_len = max_len
        """The model's max_len: earlier positions of longer users were never seen."""
        self.model, self.layer, self.feature = model, layer, feature
        self.table = paths.partition(model, layer).feature_activations
        if not self.table.exists():
            raise FileNotFoundError(
                f"{self.table} is missing; materialize `feature_activations` for {model}.layer{layer}"
            )
        self._con = duckdb.connect()
        self._con.execute(
            f"CREATE TEMP TABLE acts AS SELECT user_idx, position, value FROM {read_parquet(self.table)} "
            f"WHERE feature = {int(feature)}"
        )
        self._con.execute(
            f"CREATE TEMP VIEW seqs AS SELECT user_idx, items FROM {read_parquet(paths.sequences)}"
        )

    def close(self) -> None:
        self._con.close()

    def peaks(
        self, parity: int, limit: int | None = None, offset: int = 0
    ) -> list[tuple[int, int, float]]:
        """(user_idx, position, value) of each user's strongest activation, users of the
        given user_idx parity only, strongest first."""
        limit_sql = "" if limit is None else f"LIMIT {int(limit)} OFFSET {int(offset)}"
        return self._con.execute(
            f"""SELECT user_idx, position, value FROM acts WHERE user_idx % 2 = {int(parity)}
                QUALIFY row_number() OVER (PARTITION BY user_idx ORDER BY value DESC, position) = 1
                ORDER BY value DESC, user_idx {limit_sql}"""
        ).fetchall()

    def windows(self, centres: Sequence[tuple[int, int]], radius: int = 5) -> list[Window]:
        """Windows of +-radius items around (user_idx, position) pairs."""
        if not centres:
            return []
        users = sorted({u for u, _ in centres})
        sequences = dict(
            self._con.execute(
                f"SELECT user_idx, items FROM seqs WHERE user_idx IN ({','.join(map(str, users))})"
            ).fetchall()
        )
        acts: dict[tuple[int, int], float] = {
            (u, p): v
            for u, p, v in self._con.execute(
                f"SELECT user_idx, position, value FROM acts WHERE user_idx IN ({','.join(map(str, users))})"
            ).fetchall()
        }
        seen = self._seen_positions(users)
        out = []
        for user, position in centres:
            items = sequences[user]
            start, end = max(0, position - radius), min(len(items), position + radius + 1)
            values = tuple(
                acts.get((user, p), 0.0) if p >= seen.get(user, 0) else float("nan")
                for p in range(start, end)
            )
            out.append(
                Window(user, position, start, tuple(int(i) for i in items[start:end]), values)
            )
        return out

    def _seen_positions(self, users: list[int]) -> dict[int, int]:
        """First position the model saw per user (sequences longer than max_len are cut)."""
        lengths = dict(
            self._con.execute(
                f"SELECT user_idx, len(items) FROM seqs WHERE user_idx IN ({','.join(map(str, users))})"
            ).fetchall()
        )
        return {u: max(0, n - self.max_len) for u, n in lengths.items()}

    def random_windows(self, parity: int, n: int, radius: int, seed: int) -> list[Window]:
        """`n` windows centred on random (user, position) pairs of the given parity,
        whatever the feature does there (negatives for detection scoring)."""
        rows = self._con.execute(
            f"SELECT user_idx, len(items) FROM seqs WHERE user_idx % 2 = {int(parity)} ORDER BY user_idx"
        ).fetchall()
        rng = np.random.default_rng(seed)
        picks = rng.choice(len(rows), size=min(n, len(rows)), replace=False)
        centres = []
        seen = self._seen_positions([rows[i][0] for i in picks])
        for i in picks:
            user, length = rows[i]
            centres.append((user, int(rng.integers(seen[user], length))))
        return self.windows(centres, radius)
