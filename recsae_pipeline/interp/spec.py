"""A structured concept over items and their context: what offline explainers hypothesise,
what experiments are built from, and what the offline scorer reads back out of text.

A `Spec` is a conjunction: the item at the position carries every given attribute (genre,
decade, popularity band, franchise), optionally preceded by a run of same-genre items or by
its franchise predecessor. `describe()` writes it in plain words that `parse_spec` reads back,
using only the catalog's own vocabulary. A text may make several claims ("X OR Y", "It also
responds to Y"): `parse_claims` reads them as alternatives, a disjunction of specs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import BaseModel

from recsae_pipeline.data.catalog import Catalog, Item

POPULARITY_WORDS = {
    "head": ("popular", "blockbuster", "well-known", "mainstream", "hit"),
    "torso": ("mid-popularity", "moderately popular"),
    "tail": ("obscure", "niche", "long-tail", "little-known", "rarely watched"),
}
NEGATIONS = ("not ", "silent", "never", "except", "unlike", "rather than", "no ", "without")


class Spec(BaseModel, frozen=True):
    genre: str | None = None
    decade: str | None = None
    popularity: str | None = None
    franchise: str | None = None
    genre_run: int = 0
    """The item follows at least this many items of `genre` in a row (0 = no condition)."""
    sequel: bool = False
    """The item directly follows the previous installment of its franchise."""

    @property
    def empty(self) -> bool:
        return self == Spec()

    def item_matches(self, item: Item) -> bool:
        return (
            (self.genre is None or self.genre in item.genres)
            and (self.decade is None or item.decade == self.decade)
            and (self.popularity is None or item.popularity == self.popularity)
            and (self.franchise is None or item.franchise == self.franchise)
            and (not self.sequel or (item.franchise is not None and (item.installment or 0) > 1))
        )

    def matches(self, catalog: Catalog, items: Sequence[int], position: int) -> bool:
        """Whether the item at `position` of `items` (and its context) fits the spec."""
        if position < 0 or position >= len(items) or items[position] not in catalog.items:
            return False
        item = catalog[items[position]]
        if not self.item_matches(item):
            return False
        if self.genre_run and self.genre:
            before = items[max(0, position - self.genre_run) : position]
            if len(before) < self.genre_run or not all(
                i in catalog.items and self.genre in catalog[i].genres for i in before
            ):
                return False
        if self.sequel:
            if position == 0 or items[position - 1] not in catalog.items:
                return False
            prev = catalog[items[position - 1]]
            if prev.franchise != item.franchise or prev.installment != (item.installment or 0) - 1:
                return False
        return True

    def partial_score(self, catalog: Catalog, items: Sequence[int], position: int) -> float:
        """Share of the spec's conditions the position meets (1.0 = `matches`)."""
        if position >= len(items) or items[position] not in catalog.items:
            return 0.0
        item = catalog[items[position]]
        conditions = []
        if self.genre:
            conditions.append(self.genre in item.genres)
        if self.decade:
            conditions.append(item.decade == self.decade)
        if self.popularity:
            conditions.append(item.popularity == self.popularity)
        if self.franchise:
            conditions.append(item.franchise == self.franchise)
        if self.genre_run or self.sequel:
            conditions.append(self.matches(catalog, items, position))
        return sum(conditions) / len(conditions) if conditions else 0.0

    def describe(self) -> str:
        """Plain words, e.g. 'popular Horror films from the 1980s, after 3+ Horror films'."""
        if self.empty:
            return "no identifiable item attribute"
        words = []
        if self.popularity:
            words.append(POPULARITY_WORDS[self.popularity][0])
        words.append(f"{self.genre} films" if self.genre else "films")
        text = " ".join(words)
        if self.decade:
            text += f" from the {self.decade}"
        if self.franchise:
            article = "" if self.franchise.casefold().startswith("the ") else "the "
            text += f" of {article}{self.franchise} franchise"
        if self.sequel:
            text += ", right after the previous installment (a sequel)"
        if self.genre_run and self.genre:
            text += f", after a run of {self.genre_run}+ {self.genre} films"
        return text

    def refine(self, attribute: str) -> Spec:
        """This spec narrowed by one more `family:value` attribute."""
        family, _, value = attribute.partition(":")
        if family not in ("genre", "decade", "popularity", "franchise"):
            raise ValueError(
                f"attribute {attribute!r}: family must be genre/decade/popularity/franchise"
            )
        return self.model_copy(update={family: value})

    @classmethod
    def of(cls, attribute: str) -> Spec:
        return cls().refine(attribute)


def _clauses(text: str) -> list[str]:
    parts = re.split(r"[.;:\n]|,\s*(?:but|while|and not|not)\b|\bbut\b", text)
    return [p.strip() for p in parts if p.strip()]


ALTERNATIVE = re.compile(r"\b(?:or|also)\b", re.IGNORECASE)
"""Where a new claim starts inside an affirmative clause: "X OR Y", "It also responds to Y"."""


def _read(clause: str, catalog: Catalog, found: dict[str, object]) -> None:
    """Fill `found` with the catalog attributes `clause` names that it does not hold yet."""
    lower = " " + clause.casefold() + " "
    if "genre" not in found:
        hits = [
            (lower.find(g.casefold()), g)
            for g in _by_length(catalog.genres)
            if g.casefold() in lower
        ]
        if hits:
            found["genre"] = min(hits)[1]
    if "decade" not in found:
        match = re.search(r"\b(1[89]\d0|20\d0)s\b", lower) or re.search(
            r"\b(1[89]\d\d|20\d\d)\b", lower
        )
        if match:
            found["decade"] = f"{int(match.group(1)) // 10 * 10}s"
    if "popularity" not in found:
        for band, words in POPULARITY_WORDS.items():
            if any(re.search(rf"\b{re.escape(w)}\b", lower) for w in words):
                found["popularity"] = band
                break
    if "franchise" not in found:
        for name in _by_length(catalog.franchises):
            if name.casefold() in lower:
                found["franchise"] = name
                break
    if "sequel" not in found and re.search(
        r"\bsequel|next installment|previous installment", lower
    ):
        found["sequel"] = True
    run = re.search(r"run of (\d+)\+?|after (\d+)\+? ", lower)
    if "genre_run" not in found and run and ("run" in lower or "binge" in lower):
        found["genre_run"] = int(run.group(1) or run.group(2))


def _by_length(names: list[str]) -> list[str]:
    return sorted(names, key=len, reverse=True)


def parse_claims(text: str, catalog: Catalog) -> list[Spec]:
    """The alternative concepts the text affirms, in the catalog's vocabulary: a disjunction.

    Within one claim the first genre, decade (or year), popularity word and franchise named
    form a conjunction; "or" and "also" start another claim ("Horror films. It also responds
    to films from the 1980s" is Horror OR 1980s, not Horror films from the 1980s). Clauses
    with a negation such as 'not' or 'silent on' are skipped whole."""
    claims: list[dict[str, object]] = [{}]
    for clause in _clauses(text):
        if any(n in " " + clause.casefold() + " " for n in NEGATIONS):
            continue
        pieces = ALTERNATIVE.split(clause)
        for k, piece in enumerate(pieces):
            if k > 0 and claims[-1]:
                claims.append({})
            _read(piece, catalog, claims[-1])
    specs = [Spec(**c) for c in claims if c]  # type: ignore[arg-type]
    return list(dict.fromkeys(specs))


def parse_spec(text: str, catalog: Catalog) -> Spec:
    """The text's first claim (`parse_claims`), or the empty spec when it names none."""
    claims = parse_claims(text, catalog)
    return claims[0] if claims else Spec()


def claims_partial_score(
    claims: Sequence[Spec], catalog: Catalog, items: Sequence[int], position: int
) -> float:
    """The best `partial_score` over the claims (0.0 for none)."""
    return max((c.partial_score(catalog, items, position) for c in claims), default=0.0)
