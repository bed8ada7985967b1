"""The item catalog: the source's item table, normalised to the contract, with popularity.

`Catalog.load` is the one loader of indexed items, and `Item.attributes` the one definition
of an item's `family:value` attributes (genre, decade, popularity band, franchise) that
feature statistics, steering, the explainers, the browser and `recsae recommend` share.
"""

from __future__ import annotations

import difflib
import functools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from recsae_pipeline.data.ingest import DataSourceError
from recsae_pipeline.data.sequences import POPULARITY_BANDS, item_popularity_sql
from recsae_pipeline.storage.atomic import copy_to_parquet
from recsae_pipeline.storage.registry import ArtifactPaths
from recsae_pipeline.storage.sql import indexed_catalog_sql, read_parquet, sql_identifier

MIN_YEAR, MAX_YEAR = 1870, 2100
# Columns the catalog SQL below (and the item map join) add to the source's item table; an
# item file's extra attribute may not carry one of these names (the readers refuse it).
RESERVED_ITEM_COLUMNS = ("file_row_number", "interactions", "item_idx", "_dup", "_trimmed")
ATTRIBUTE_FAMILIES = ("genre", "decade", "popularity", "franchise")


def build_catalog(paths: ArtifactPaths) -> dict[str, Any]:
    """Write `catalog/items.parquet`: one row per item id (first wins), years outside
    1870-2100 set to null, genres trimmed and de-duplicated, interaction counts attached."""
    if not paths.raw_items.exists():
        raise DataSourceError(
            f"{paths.raw_items} is missing; materialize `raw_interactions` first."
        )
    con = duckdb.connect()
    try:
        raw_items = read_parquet(paths.raw_items, file_row_number=True)
        extras = [
            r[0]
            for r in con.execute(f"DESCRIBE SELECT * FROM {raw_items}").fetchall()
            if r[0] not in ("item_id", "title", "year", "genres", "file_row_number")
        ]
        extra_sql = "".join(f", r.{sql_identifier(c)}" for c in extras)
        select = f"""
            WITH ranked AS (
                SELECT *, row_number() OVER (PARTITION BY item_id ORDER BY file_row_number) AS _dup,
                       list_transform(COALESCE(genres, []), lambda g: trim(g)) AS _trimmed
                FROM {raw_items} WHERE item_id IS NOT NULL
            ), counts AS (
                SELECT item_id, count(*) AS interactions
                FROM {read_parquet(paths.raw_interactions)} GROUP BY item_id
            )
            SELECT r.item_id, COALESCE(nullif(trim(r.title), ''), r.item_id) AS title,
                   CAST(CASE WHEN r.year BETWEEN {MIN_YEAR} AND {MAX_YEAR} THEN r.year END AS SMALLINT) AS year,
                   list_filter(r._trimmed, lambda g, i: g <> '' AND list_position(r._trimmed, g) = i) AS genres  -- dedupe, keep order
                   {extra_sql},
                   COALESCE(c.interactions, 0) AS interactions
            FROM ranked r LEFT JOIN counts c USING (item_id)
            WHERE r._dup = 1 ORDER BY r.file_row_number
        """
        copy_to_parquet(con, select, paths.items)
        items, with_year, with_genres, duplicates, genres = con.execute(
            f"""SELECT count(*), count(year), count(*) FILTER (WHERE len(genres) > 0),
                       (SELECT count(*) - count(DISTINCT item_id) FROM {raw_items}),
                       (SELECT count(DISTINCT g) FROM (SELECT unnest(genres) AS g FROM {read_parquet(paths.items)}))
                FROM {read_parquet(paths.items)}"""
        ).fetchone()  # type: ignore[misc]
    finally:
        con.close()
    return {
        "items": int(items),
        "items_with_year": int(with_year),
        "items_with_genres": int(with_genres),
        "distinct_genres": int(genres),
        "duplicate_ids_dropped": int(duplicates),
        "extra_attributes": ", ".join(extras) or "none",
    }


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
        """`family:value` labels (`ATTRIBUTE_FAMILIES`): genre, decade, popularity band,
        franchise. The one definition; `Catalog.attribute_table` hands it to SQL."""
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
                    f"DESCRIBE SELECT * FROM {read_parquet(paths.items)}"
                ).fetchall()
            }
            franchise = "c.franchise" if "franchise" in columns else "NULL"
            installment = "c.installment" if "installment" in columns else "NULL"
            rows = con.execute(
                f"""
                WITH ranked AS ({item_popularity_sql(paths.sequences)}
                )
                SELECT c.item_idx, c.item_id, c.title, c.year, c.genres, r.rank, r.band,
                       {franchise}, {installment}
                FROM ({indexed_catalog_sql(paths.items, paths.item_map)}) c
                JOIN ranked r ON r.item_idx = c.item_idx
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

    def attribute_table(self) -> pa.Table:
        """(item_idx, family, value) per attribute of every item, sorted: `Item.attributes`
        for SQL (feature enrichment joins it)."""
        rows = sorted(
            (idx, *a.split(":", 1)) for idx, item in self.items.items() for a in item.attributes()
        )
        return pa.table(
            {
                "item_idx": pa.array([r[0] for r in rows], pa.int32()),
                "family": pa.array([r[1] for r in rows], pa.string()),
                "value": pa.array([r[2] for r in rows], pa.string()),
            }
        )

    def title_table(self) -> pa.Table:
        """(item_idx, title) of every item, for SQL."""
        return pa.table(
            {
                "item_idx": pa.array(list(self.items), pa.int32()),
                "title": pa.array([i.title for i in self.items.values()], pa.string()),
            }
        )

    @functools.cached_property
    def base_rates(self) -> dict[str, float]:
        """Share of items carrying each attribute (`family:value`); computed once."""
        counts = Counter(a for item in self.items.values() for a in item.attributes())
        return {a: c / len(self.items) for a, c in counts.items()}
