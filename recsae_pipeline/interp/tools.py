"""What an explainer can do with one SAE feature: read its exemplars, search the catalog, and
run experiments (crafted item sequences -> the feature's activation at every position).

Users are split in two by parity: exemplars (what explainers see) come from even user_idx,
held-out windows for scoring from odd user_idx, so no scored window was ever shown.
"""

from __future__ import annotations

import difflib
import functools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import duckdb
import numpy as np
import torch

from recsae_pipeline.activations.hooks import read_hidden
from recsae_pipeline.data.sequences import POPULARITY_BANDS, item_popularity_sql
from recsae_pipeline.models.recommender import Recommender
from recsae_pipeline.models.training import pad_right
from recsae_pipeline.sae.sae import TopKSae
from recsae_pipeline.store import ArtifactPaths
from recsae_pipeline.store import sql_literal as _sql

EXPLAIN_USERS = 0
"""user_idx % 2 of the users whose windows explainers see; the other parity is held out."""


@dataclass(frozen=True)
class Item:
    idx: int
    item_id: str
    title: str
    year: int | None
    genres: tuple[str, ...]
    popularity: str
    """Band: head / torso / tail (thirds of all interactions, most popular first)."""
    popularity_rank: int
    """1 = most interacted-with item."""
    franchise: str | None = None
    installment: int | None = None

    @property
    def decade(self) -> str | None:
        return None if self.year is None else f"{self.year // 10 * 10}s"

    def render(self) -> str:
        """`Title (Year) [Genre1|Genre2]`, the form every explainer sees."""
        year = f" ({self.year})" if self.year is not None else ""
        return f"{self.title}{year} [{'|'.join(self.genres)}]"

    def attributes(self) -> set[str]:
        """`family:value` labels: genre, decade, popularity band, franchise."""
        out = {f"genre:{g}" for g in self.genres} | {f"popularity:{self.popularity}"}
        if self.decade:
            out.add(f"decade:{self.decade}")
        if self.franchise:
            out.add(f"franchise:{self.franchise}")
        return out


class UnknownItemError(KeyError):
    """A title or id that is not in the catalog; the message lists close matches."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class Catalog:
    """The indexed items with their attributes, for rendering, searching and resolving."""

    items: dict[int, Item]
    _by_title: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for item in self.items.values():
            self._by_title.setdefault(item.title.casefold(), []).append(item.idx)

    @classmethod
    def load(cls, paths: ArtifactPaths) -> Catalog:
        """From the catalog, the id map and the sequences (popularity = interaction counts in
        `sequences`, banded into thirds of all interactions)."""
        con = duckdb.connect()
        try:
            columns = {
                r[0]
                for r in con.execute(
                    f"DESCRIBE SELECT * FROM read_parquet({_sql(paths.items)})"
                ).fetchall()
            }
            franchise = "c.franchise" if "franchise" in columns else "NULL"
            installment = "c.installment" if "installment" in columns else "NULL"
            rows = con.execute(
                f"""
                WITH ranked AS ({item_popularity_sql(paths.sequences)}
                )
                SELECT m.item_idx, c.item_id, c.title, c.year, c.genres, r.rank, r.band,
                       {franchise}, {installment}
                FROM read_parquet({_sql(paths.items)}) c
                JOIN read_parquet({_sql(paths.item_map)}) m USING (item_id)
                JOIN ranked r ON r.item_idx = m.item_idx
                """
            ).fetchall()
        finally:
            con.close()
        items = {
            int(idx): Item(
                idx=int(idx),
                item_id=str(item_id),
                title=str(title),
                year=None if year is None else int(year),
                genres=tuple(genres or ()),
                popularity=band,
                popularity_rank=int(rank),
                franchise=franchise_name or None,
                installment=None if part is None else int(part),
            )
            for idx, item_id, title, year, genres, rank, band, franchise_name, part in rows
        }
        if not items:
            raise ValueError(f"{paths.items} and {paths.item_map} share no items; rebuild them")
        return cls(items)

    def __getitem__(self, idx: int) -> Item:
        return self.items[idx]

    def render(self, idx: int) -> str:
        return self.items[idx].render() if idx in self.items else f"<item {idx}>"

    @property
    def genres(self) -> list[str]:
        return sorted({g for item in self.items.values() for g in item.genres})

    @property
    def decades(self) -> list[str]:
        return sorted({item.decade for item in self.items.values() if item.decade})

    @property
    def franchises(self) -> list[str]:
        return sorted({item.franchise for item in self.items.values() if item.franchise})

    def search(
        self,
        title: str | None = None,
        genre: str | None = None,
        year_from: int | None = None,
        year_to: int | None = None,
        popularity: str | None = None,
        franchise: str | None = None,
        exclude_genre: str | None = None,
        n: int = 10,
        seed: int | None = None,
    ) -> list[Item]:
        """Items matching every given filter (title substring, case-insensitive), most
        popular first, or a seeded random sample of the matches when `seed` is given."""
        if popularity is not None and popularity not in POPULARITY_BANDS:
            raise ValueError(f"popularity={popularity!r}; use one of {POPULARITY_BANDS}")
        if genre is not None and genre not in self.genres:
            close = difflib.get_close_matches(genre, self.genres, n=3)
            raise ValueError(
                f"genre {genre!r} is not in the catalog; close: {close or self.genres}"
            )
        needle = title.casefold() if title else None
        hits = [
            item
            for item in self.items.values()
            if (needle is None or needle in item.title.casefold())
            and (genre is None or genre in item.genres)
            and (exclude_genre is None or exclude_genre not in item.genres)
            and (year_from is None or (item.year is not None and item.year >= year_from))
            and (year_to is None or (item.year is not None and item.year <= year_to))
            and (popularity is None or item.popularity == popularity)
            and (franchise is None or item.franchise == franchise)
        ]
        hits.sort(key=lambda item: item.popularity_rank)
        if seed is not None and len(hits) > n:
            rng = np.random.default_rng(seed)
            picks = sorted(rng.choice(len(hits), n, replace=False))
            return [hits[i] for i in picks]
        return hits[:n]

    def resolve(self, refs: Iterable[int | str]) -> list[int]:
        """Item indices for ids (int or digit string) or exact titles (case-insensitive;
        `Title (Year)` also accepted). An unknown title raises with close matches."""
        out = []
        for ref in refs:
            if isinstance(ref, int) or (isinstance(ref, str) and ref.strip().isdigit()):
                idx = int(ref)
                if idx not in self.items:
                    raise UnknownItemError(
                        f"item id {idx} is not in the catalog (ids 1..{max(self.items)})"
                    )
                out.append(idx)
                continue
            text = str(ref).strip()
            key = text.casefold()
            year = None
            if key not in self._by_title and key.endswith(")") and "(" in key:
                head, _, tail = key.rpartition("(")
                if tail[:-1].isdigit():
                    key, year = head.strip(), int(tail[:-1])
            matches = self._by_title.get(key, [])
            if year is not None:
                matches = [i for i in matches if self.items[i].year == year] or matches
            if not matches:
                close = difflib.get_close_matches(text, [i.title for i in self.items.values()], n=5)
                hint = f"; close matches: {close}" if close else "; search the catalog first"
                raise UnknownItemError(f"no item titled {text!r}{hint}")
            out.append(min(matches, key=lambda i: self.items[i].popularity_rank))
        return out

    @functools.cached_property
    def base_rates(self) -> dict[str, float]:
        """Share of items carrying each attribute (`family:value`); computed once."""
        counts = Counter(a for item in self.items.values() for a in item.attributes())
        return {a: c / len(self.items) for a, c in counts.items()}


class FeatureProbe:
    """Runs item sequences through the recommender and reads SAE features at its layer."""

    def __init__(
        self, model: Recommender, sae: TopKSae, layer: int, device: torch.device | str = "cpu"
    ) -> None:
        self.model = model.eval()
        self.sae = sae.eval()
        self.layer = layer
        self.device = torch.device(device)
        self.runs = 0
        """Sequences run so far (the experiment budget)."""

    @torch.no_grad()
    def activations(
        self, sequences: Sequence[Sequence[int]], feature: int, batch_size: int = 256
    ) -> list[np.ndarray]:
        """The feature's activation at every position of each sequence (0 where it is not
        among the top k). Sequences longer than the model's max_len keep their last max_len
        items, and the returned arrays cover those."""
        if not 0 <= feature < self.sae.config.n_latents:
            raise ValueError(
                f"feature {feature} is out of range 0..{self.sae.config.n_latents - 1}"
            )
        max_len = self.model.config.max_len
        cut = [np.asarray(list(s)[-max_len:], dtype=np.int64) for s in sequences]
        if any(len(s) == 0 for s in cut):
            raise ValueError("every experiment sequence needs at least one item")
        if any((s <= 0).any() or (s > self.model.config.num_items).any() for s in cut):
            raise ValueError(f"item ids must be in 1..{self.model.config.num_items}")
        out: list[np.ndarray] = []
        for start in range(0, len(cut), batch_size):
            batch = cut[start : start + batch_size]
            items = pad_right(batch).to(self.device)
            hidden = read_hidden(self.model, items, self.layer)
            flat = hidden.reshape(-1, hidden.shape[-1])
            values, indices = self.sae.encode(flat)
            acts = (values * (indices == feature)).sum(-1).reshape(items.shape).cpu().numpy()
            out.extend(acts[row, : len(seq)].astype(np.float32) for row, seq in enumerate(batch))
        self.runs += len(cut)
        return out


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
        self.table = paths.partition_dir("feature_activations", model, layer) / "part-00000.parquet"
        if not self.table.exists():
            raise FileNotFoundError(
                f"{self.table} is missing; materialize `feature_activations` for {model}.layer{layer}"
            )
        self._con = duckdb.connect()
        self._con.execute(
            f"CREATE TEMP TABLE acts AS SELECT user_idx, position, value FROM read_parquet({_sql(self.table)}) "
            f"WHERE feature = {int(feature)}"
        )
        self._con.execute(
            f"CREATE TEMP VIEW seqs AS SELECT user_idx, items FROM read_parquet({_sql(paths.sequences)})"
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
