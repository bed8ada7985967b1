"""Seeded movie-like interaction logs with the planted mechanism behind every interaction.

Each user mixes five mechanisms with their own weights: a sparse genre preference, genre
binges, franchise continuation, an era taste and a popularity appetite. The ground truth
records which one produced each interaction, so learned features can be checked against it.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

MOVIELENS_GENRES: tuple[str, ...] = (
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

ITEM_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("year", pa.int16()),
        ("genres", pa.list_(pa.string())),
        ("franchise", pa.string()),
        ("installment", pa.int16()),
        ("popularity_rank", pa.int32()),
    ]
)
INTERACTION_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("timestamp", pa.int64()),
        ("rating", pa.float32()),
    ]
)
GROUND_TRUTH_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("timestamp", pa.int64()),
        ("mechanism", pa.string()),
    ]
)

FIRST_YEAR, LAST_YEAR = 1930, 2020

# Genre -> (weight at its peak, peak year, width in years, floor): era-specific genres
# (Film-Noir, Western, Musical, War) fade to `floor` times their peak weight away from it.
# Weights are loosely MovieLens-1M genre counts.
_GENRE_ERA: dict[str, tuple[float, float, float, float]] = {
    "Action": (600, 1995, 20, 0.15),
    "Adventure": (300, 1985, 30, 0.4),
    "Animation": (110, 1990, 1, 1.0),
    "Children's": (300, 1995, 25, 0.3),
    "Comedy": (1200, 1990, 1, 1.0),
    "Crime": (210, 1990, 1, 1.0),
    "Documentary": (250, 2010, 15, 0.1),
    "Drama": (1600, 1990, 1, 1.0),
    "Fantasy": (90, 2005, 20, 0.3),
    "Film-Noir": (500, 1947, 6, 0.02),
    "Horror": (450, 1985, 20, 0.3),
    "Musical": (400, 1955, 15, 0.15),
    "Mystery": (110, 1990, 1, 1.0),
    "Romance": (470, 1990, 1, 1.0),
    "Sci-Fi": (400, 2005, 25, 0.1),
    "Thriller": (600, 1995, 25, 0.3),
    "War": (350, 1960, 15, 0.2),
    "Western": (600, 1955, 12, 0.05),
}

# Which genres a film of the key genre also carries, with relative weights.
_COMPANIONS: dict[str, dict[str, float]] = {
    "Action": {
        "Adventure": 4,
        "Thriller": 4,
        "Sci-Fi": 3,
        "Crime": 3,
        "War": 2,
        "Comedy": 2,
        "Western": 1,
    },
    "Adventure": {
        "Action": 4,
        "Fantasy": 3,
        "Children's": 2,
        "Sci-Fi": 2,
        "Comedy": 2,
        "Western": 1,
        "Romance": 1,
    },
    "Animation": {"Children's": 6, "Comedy": 3, "Fantasy": 2, "Musical": 2, "Adventure": 2},
    "Children's": {
        "Comedy": 4,
        "Animation": 4,
        "Adventure": 3,
        "Fantasy": 2,
        "Musical": 1,
        "Drama": 1,
    },
    "Comedy": {"Romance": 5, "Drama": 4, "Crime": 1, "Children's": 1, "Action": 1, "Musical": 1},
    "Crime": {"Thriller": 5, "Drama": 4, "Action": 3, "Mystery": 2, "Film-Noir": 2, "Comedy": 1},
    "Documentary": {"Drama": 1, "Musical": 1, "War": 1},
    "Drama": {"Romance": 5, "Comedy": 3, "Crime": 3, "Thriller": 2, "War": 2, "Mystery": 1},
    "Fantasy": {
        "Adventure": 4,
        "Children's": 2,
        "Comedy": 2,
        "Animation": 2,
        "Action": 1,
        "Horror": 1,
    },
    "Film-Noir": {"Thriller": 4, "Crime": 3, "Mystery": 3, "Drama": 2, "Romance": 1},
    "Horror": {"Thriller": 5, "Sci-Fi": 3, "Mystery": 2, "Comedy": 1},
    "Musical": {"Comedy": 4, "Romance": 4, "Children's": 2, "Animation": 2, "Drama": 1},
    "Mystery": {"Thriller": 5, "Crime": 3, "Drama": 2, "Film-Noir": 2, "Horror": 1},
    "Romance": {"Comedy": 5, "Drama": 5, "Musical": 1, "War": 1},
    "Sci-Fi": {"Action": 5, "Adventure": 4, "Thriller": 3, "Horror": 2, "Fantasy": 1},
    "Thriller": {"Crime": 4, "Horror": 3, "Mystery": 3, "Action": 3, "Drama": 2, "Sci-Fi": 2},
    "War": {"Drama": 5, "Action": 4, "Romance": 1, "Adventure": 1},
    "Western": {"Action": 3, "Adventure": 3, "Drama": 2, "Comedy": 1, "Romance": 1},
}

_ADJECTIVES = (
    "Silent", "Broken", "Golden", "Hidden", "Last", "Lost", "Burning", "Crimson", "Distant",
    "Endless", "Fallen", "Frozen", "Savage", "Hollow", "Wild", "Quiet", "Dark", "Bright",
    "Little", "Lonely", "Midnight", "Northern", "Painted", "Restless", "Scarlet", "Secret",
    "Shattered", "Stolen", "Strange", "Sweet", "Velvet", "Wicked", "Iron", "Electric",
    "Forgotten", "Final", "Eternal", "Sleeping", "Blue", "Red", "Black", "White", "Crooked",
    "Dangerous", "Perfect",
)  # fmt: skip
_NOUNS = (
    "Night", "Harbor", "Orchard", "River", "Storm", "Shadow", "City", "Garden", "Winter",
    "Summer", "Road", "Stone", "Crown", "Mirror", "Island", "Station", "Valley", "Empire",
    "Ghost", "Heart", "Fire", "Glass", "Moon", "Star", "Sky", "Desert", "Ocean", "Forest",
    "Bridge", "House", "Tower", "Dream", "Signal", "Hunter", "Stranger", "Sparrow", "Wolf",
    "Lion", "Falcon", "Raven", "Horizon", "Frontier", "Canyon", "Thunder", "Echo", "Silence",
    "Promise", "Letter", "Journey", "Kingdom", "Castle", "Engine", "Machine", "Planet",
    "Comet", "Diamond", "Gold", "Silver", "Rose", "Lantern", "Carnival", "Circus", "Dance",
    "Song", "Game", "Street", "Hotel", "Train", "Sea", "Coast", "Hill", "Mountain", "Field",
    "Paradise", "Dawn", "Dusk", "Eclipse", "Fever", "Blood", "Angel",
)  # fmt: skip

_GENRE_PREF, _BINGE, _FRANCHISE, _ERA, _POPULAR = range(5)  # order of `mixture_weights`
# Where each mechanism's labels start in the label vocabulary (see `_catalog`).
_LABEL_OFFSET = {_POPULAR: 0, _FRANCHISE: 1, _GENRE_PREF: 2, _BINGE: 20, _ERA: 38}
_MAX_TRIES = 12  # rejection draws against already-watched items before a mechanism gives up


@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the synthetic logs; the defaults give ~100k interactions in seconds."""

    n_users: int = 3000
    n_items: int = 1500
    mean_sequence_length: float = 33.0
    min_sequence_length: int = 8
    sequence_length_sigma: float = 1.0  # lognormal spread of sequence lengths
    n_franchises: int = 60  # each with 2-5 ordered installments
    zipf_exponent: float = 1.0
    seed: int = 0
    start_timestamp: int = 946684800  # 2000-01-01, seconds
    activity_span_days: float = 1095.0  # users start uniformly within this window
    # Mean mixture weights over (genre_pref, genre_binge, franchise_next, era, popular);
    # each user draws their own from a Dirichlet with this mean and concentration.
    weight_genre_pref: float = 0.40
    weight_genre_binge: float = 0.06  # chance per step of starting a binge
    weight_franchise_next: float = 0.05
    weight_era: float = 0.20
    weight_popular: float = 0.29
    mixture_concentration: float = 4.0
    binge_min_length: int = 3
    binge_max_length: int = 6
    franchise_continuation_prob: float = 0.5  # after installment n, schedule n+1 within 1-3 steps
    mean_session_length: float = 6.0
    within_session_gap_s: float = 150.0  # median seconds between interactions in a session
    between_session_gap_s: float = 2.5 * 86400  # median seconds between sessions
    half_star_user_share: float = 0.5  # the rest rate in whole stars

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.n_items < 1:
            raise ValueError(f"n_users={self.n_users} and n_items={self.n_items} must be >= 1.")
        if not 1 <= self.min_sequence_length <= self.n_items // 2:
            raise ValueError(
                f"min_sequence_length={self.min_sequence_length} must be in 1..n_items // 2 "
                f"({self.n_items // 2}) so users never run out of unwatched items; lower it."
            )
        if self.mean_sequence_length <= self.min_sequence_length:
            raise ValueError(
                f"mean_sequence_length={self.mean_sequence_length} must exceed "
                f"min_sequence_length={self.min_sequence_length}."
            )
        if not 1 <= self.binge_min_length <= self.binge_max_length:
            raise ValueError(
                f"binge lengths {self.binge_min_length}..{self.binge_max_length} must satisfy "
                "1 <= binge_min_length <= binge_max_length."
            )
        if min(self.mixture_weights) < 0 or self.weight_popular <= 0:
            raise ValueError(
                f"mixture weights {self.mixture_weights} must be >= 0 with weight_popular > 0 "
                "(popularity is every user's last-resort mechanism)."
            )

    @property
    def mixture_weights(self) -> tuple[float, ...]:
        """Mean mixture weights in the order of the mechanisms."""
        return (
            self.weight_genre_pref,
            self.weight_genre_binge,
            self.weight_franchise_next,
            self.weight_era,
            self.weight_popular,
        )


def _title_pool() -> list[str]:
    """All titles the word lists can form, in a fixed order; none ends in a digit."""
    pairs = list(itertools.product(_ADJECTIVES, _NOUNS))
    noun_pairs = [(a, b) for a, b in itertools.product(_NOUNS, _NOUNS) if a != b]
    return (
        [f"{a} {n}" for a, n in pairs]
        + [f"The {a} {n}" for a, n in pairs]
        + [f"{a} {b}" for a, b in noun_pairs]
        + [f"{a} of the {b}" for a, b in noun_pairs]
        + [f"The {n}" for n in _NOUNS]
    )


def _era_factor(years: np.ndarray) -> np.ndarray:
    """(n, genres) weight of each genre in each year: its peak weight times its era bump."""
    base, peak, width, floor = (
        np.array(col, dtype=float) for col in zip(*_GENRE_ERA.values(), strict=True)
    )
    bump = np.exp(-0.5 * ((years[:, None] - peak) / width) ** 2)
    return base * (floor + (1 - floor) * bump)


def _sample_rows(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One column index per row, drawn in proportion to that row's nonnegative weights."""
    cdf = np.cumsum(weights, axis=1)
    u = rng.random(len(weights)) * cdf[:, -1]
    return np.minimum((cdf <= u[:, None]).sum(axis=1), weights.shape[1] - 1)


def _sample_genres(rng: np.random.Generator, years: np.ndarray) -> np.ndarray:
    """(n, genres) bool: a primary genre by era, then 0-2 companions of it that fit the era."""
    era = _era_factor(years)
    index = {g: i for i, g in enumerate(MOVIELENS_GENRES)}
    companions = np.zeros((len(index), len(index)))
    for genre, row in _COMPANIONS.items():
        for other, w in row.items():
            companions[index[genre], index[other]] = w
    rows = np.arange(len(years))
    chosen = np.zeros((len(years), len(index)), dtype=bool)
    primary = _sample_rows(rng, era)
    chosen[rows, primary] = True
    # Companion weights scale with the era's share of each genre (no Film-Noir sidekick in 2015).
    era_share = era / era.sum(axis=1, keepdims=True)
    affinity = companions[primary] * era_share
    n_genres = rng.choice([1, 2, 3], size=len(years), p=[0.45, 0.40, 0.15])
    for k in (2, 3):
        weights = np.where(chosen, 0.0, affinity)
        extra = _sample_rows(rng, weights)
        add = (n_genres >= k) & (weights[rows, extra] > 0)
        chosen[rows[add], extra[add]] = True
        affinity = affinity + companions[extra] * add[:, None] * era_share
    return chosen


def generate_items(config: SyntheticConfig) -> pa.Table:
    """The catalog: unique titles, years, 1-3 co-occurring genres, franchises and Zipf ranks."""
    rng = np.random.default_rng([config.seed, 0])
    sizes = rng.integers(2, 6, size=config.n_franchises)
    n_standalone = config.n_items - int(sizes.sum())
    if n_standalone < 0:
        raise ValueError(
            f"n_franchises={config.n_franchises} need {int(sizes.sum())} installments but "
            f"n_items={config.n_items}; raise n_items or lower n_franchises."
        )
    pool = _title_pool()
    n_works = config.n_franchises + n_standalone
    if n_works > len(pool):
        raise ValueError(
            f"n_items={config.n_items} needs {n_works} distinct titles but the word lists form "
            f"{len(pool)}; lower n_items."
        )
    base_titles = [pool[i] for i in rng.choice(len(pool), size=n_works, replace=False)]
    # Release years skew recent, like MovieLens: density grows as (year - 1930)^1.2.
    span = LAST_YEAR - FIRST_YEAR + 1
    work_years = FIRST_YEAR + np.floor(span * rng.beta(2.2, 1.0, size=n_works)).astype(int)
    work_genres = _sample_genres(rng, work_years.astype(float))

    # Installments follow their predecessor by 1-5 years and share its genres.
    sizes_all = np.concatenate([sizes, np.ones(n_standalone, dtype=int)])
    starts = np.cumsum(sizes_all) - sizes_all
    work = np.repeat(np.arange(n_works), sizes_all)
    installment = np.arange(len(work)) - starts[work] + 1
    cum_gaps = np.cumsum(np.where(installment > 1, rng.integers(1, 6, size=len(work)), 0))
    years = work_years[work] + cum_gaps - cum_gaps[starts[work]]
    overshoot = np.maximum(0, np.maximum.reduceat(years, starts) - LAST_YEAR)
    years = years - overshoot[work]
    in_franchise = work < config.n_franchises

    score = rng.normal(size=len(work)) + 0.01 * (years - 1975) + 0.7 * in_franchise
    score -= 0.3 * np.where(in_franchise, installment - 1, 0)
    rank = np.empty(len(work), dtype=np.int32)
    rank[np.argsort(-score, kind="stable")] = np.arange(1, len(work) + 1)

    order = rng.permutation(len(work))  # so franchise installments get scattered item ids
    work, installment, years, rank = work[order], installment[order], years[order], rank[order]
    in_franchise = in_franchise[order]
    width = max(5, len(str(config.n_items)))
    titles = [
        base_titles[w] if k == 1 else f"{base_titles[w]} {k}"
        for w, k in zip(work.tolist(), installment.tolist(), strict=True)
    ]
    genre_names = np.array(MOVIELENS_GENRES)
    return pa.table(
        {
            "item_id": [f"i{i:0{width}d}" for i in range(1, len(work) + 1)],
            "title": titles,
            "year": years.astype(np.int16),
            "genres": [genre_names[row].tolist() for row in work_genres[work]],
            "franchise": [
                base_titles[w] if f else None for w, f in zip(work, in_franchise, strict=True)
            ],
            "installment": pa.array(
                np.where(in_franchise, installment, 0).astype(np.int16), mask=~in_franchise
            ),
            "popularity_rank": rank,
        },
        schema=ITEM_SCHEMA,
    )


class _Pool(NamedTuple):
    """Items one mechanism draws from, with their cumulative popularity (last entry 1.0)."""

    items: list[int]
    cdf: list[float]


def _pool(members: np.ndarray, popularity: np.ndarray) -> _Pool:
    cdf = np.cumsum(popularity[members])
    cdf /= cdf[-1]
    cdf[-1] = 1.0
    return _Pool(members.tolist(), cdf.tolist())


@dataclass(frozen=True)
class _Catalog:
    """The item table turned into the arrays and popularity pools users sample from."""

    item_ids: pa.Array
    genre_matrix: np.ndarray  # (items, genres) bool
    decade: np.ndarray  # index into `decades` per item
    decades: tuple[int, ...]
    franchise: list[int]  # franchise index per item, -1 outside franchises
    installment: np.ndarray  # 0 outside franchises
    next_installment: list[int]  # item index of installment + 1, -1 if none
    popularity_order: list[int]  # item indices, most popular first
    quality: np.ndarray  # rating offset: popular films rate a little higher
    genre_pools: tuple[_Pool, ...]
    decade_pools: tuple[_Pool, ...]
    everything: _Pool
    liked_genre_logit: np.ndarray  # users favour common genres, damped
    binge_genre_cdf: list[float]  # binges pick genres by their share of the catalog
    decade_share: np.ndarray
    labels: pa.Array  # mechanism label vocabulary, indexed by `_label`


def _label(mechanism: int, index: int = 0) -> int:
    """Index into the label vocabulary of a mechanism with its genre or decade index."""
    return _LABEL_OFFSET[mechanism] + index


def _catalog(items: pa.Table, zipf_exponent: float) -> _Catalog:
    """Index an item table from `generate_items` for sampling."""
    missing = set(ITEM_SCHEMA.names) - set(items.column_names)
    if missing:
        raise ValueError(
            f"items table lacks columns {sorted(missing)}; build it with generate_items."
        )
    n = items.num_rows
    genre_lists = items.column("genres").to_pylist()
    unknown = {g for genres in genre_lists for g in genres} - set(MOVIELENS_GENRES)
    if unknown:
        raise ValueError(f"items carry genres {sorted(unknown)} outside MOVIELENS_GENRES.")
    genre_index = {g: i for i, g in enumerate(MOVIELENS_GENRES)}
    genre_matrix = np.zeros((n, len(MOVIELENS_GENRES)), dtype=bool)
    for row, genres in enumerate(genre_lists):
        genre_matrix[row, [genre_index[g] for g in genres]] = True
    year = items.column("year").to_numpy().astype(int)
    decades, decade = np.unique(year // 10 * 10, return_inverse=True)
    rank = items.column("popularity_rank").to_numpy().astype(float)
    popularity = rank**-zipf_exponent

    names = items.column("franchise").to_pylist()
    installment = items.column("installment").fill_null(0).to_numpy().astype(int)
    franchise_index = {name: i for i, name in enumerate(dict.fromkeys(x for x in names if x))}
    franchise = [franchise_index[x] if x else -1 for x in names]
    position = {
        (f, k): i
        for i, (f, k) in enumerate(zip(franchise, installment.tolist(), strict=True))
        if f >= 0
    }
    next_installment = [
        position.get((f, k + 1), -1) for f, k in zip(franchise, installment.tolist(), strict=True)
    ]

    genre_counts = genre_matrix.sum(axis=0).astype(float)
    decade_counts = np.bincount(decade, minlength=len(decades)).astype(float)
    n_genres = len(MOVIELENS_GENRES)
    with np.errstate(divide="ignore"):  # a genre absent from the catalog is never liked
        liked_genre_logit = 0.7 * np.log(genre_counts / genre_counts.sum())
    labels = (
        ["popular", "franchise_next"]
        + [f"genre_pref:{g}" for g in MOVIELENS_GENRES]
        + [f"genre_binge:{g}" for g in MOVIELENS_GENRES]
        + [f"era:{d}s" for d in decades.tolist()]
    )
    return _Catalog(
        item_ids=items.column("item_id").combine_chunks(),
        genre_matrix=genre_matrix,
        decade=decade,
        decades=tuple(decades.tolist()),
        franchise=franchise,
        installment=installment,
        next_installment=next_installment,
        popularity_order=np.argsort(rank, kind="stable").tolist(),
        quality=0.4 - 0.8 * np.log(rank) / max(math.log(n), 1.0),
        genre_pools=tuple(
            _pool(np.flatnonzero(genre_matrix[:, g]), popularity)
            if genre_counts[g]
            else _Pool([], [])
            for g in range(n_genres)
        ),
        decade_pools=tuple(
            _pool(np.flatnonzero(decade == d), popularity) for d in range(len(decades))
        ),
        everything=_pool(np.arange(n), popularity),
        liked_genre_logit=liked_genre_logit,
        binge_genre_cdf=np.cumsum(genre_counts / genre_counts.sum()).tolist(),
        decade_share=decade_counts / decade_counts.sum(),
        labels=pa.array(labels, type=pa.string()),
    )


def _uniforms(rng: np.random.Generator) -> Iterator[float]:
    """Endless uniform [0, 1) draws, fetched 256 at a time (a Python float is cheap to use)."""
    while True:
        yield from rng.random(256).tolist()


def _draw_unseen(pool: _Pool, seen: set[int], uniforms: Iterator[float]) -> int:
    """A popularity-weighted unwatched item of the pool, or -1 after `_MAX_TRIES` misses."""
    if not pool.items:
        return -1
    for _ in range(_MAX_TRIES):
        item = pool.items[bisect.bisect_right(pool.cdf, next(uniforms))]
        if item not in seen:
            return item
    return -1


class _UserLog(NamedTuple):
    """One user's sequence: item indices, mechanism label indices, timestamps and ratings."""

    items: np.ndarray
    labels: np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray


def _simulate_user(config: SyntheticConfig, catalog: _Catalog, user_index: int) -> _UserLog:
    """Walk one user's sequence step by step; everything comes from (seed, user_index)."""
    rng = np.random.default_rng([config.seed, 1, user_index])
    n_items = len(catalog.franchise)
    excess = config.mean_sequence_length - config.min_sequence_length
    sigma = config.sequence_length_sigma
    length = config.min_sequence_length + round(
        rng.lognormal(math.log(excess) - sigma**2 / 2, sigma)
    )
    length = min(length, n_items // 2)

    # Gumbel top-k: 1-3 liked genres without replacement, favouring common genres.
    n_liked = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    keys = catalog.liked_genre_logit + rng.gumbel(size=len(MOVIELENS_GENRES))
    liked = np.argsort(-keys)[:n_liked]
    liked_cdf = np.cumsum(rng.dirichlet(np.ones(n_liked))).tolist()
    era = int(rng.choice(len(catalog.decades), p=catalog.decade_share))
    mixture = np.asarray(config.mixture_weights) / sum(config.mixture_weights)
    alpha = np.maximum(config.mixture_concentration * mixture, 1e-3)
    weights = np.where(mixture > 0, rng.dirichlet(alpha), 0.0).tolist()

    uniforms = _uniforms(rng)
    seen: set[int] = set()
    items: list[int] = []
    labels: list[int] = []
    in_binge_run: list[bool] = []
    binge_left, binge_genre = 0, 0
    highest: dict[int, int] = {}  # franchise -> item index of its highest installment watched
    open_next: dict[int, int] = {}  # franchise -> item index of its next unwatched installment
    scheduled_step, scheduled_franchise = -1, -1
    scan = 0  # popularity_order position for the last-resort scan
    for step in range(length):
        item, label, continues_binge = -1, 0, False
        if binge_left:
            item = _draw_unseen(catalog.genre_pools[binge_genre], seen, uniforms)
            label, continues_binge = _label(_BINGE, binge_genre), True
            binge_left = binge_left - 1 if item >= 0 else 0
        if item < 0 and step == scheduled_step and scheduled_franchise in open_next:
            item, label = open_next[scheduled_franchise], _label(_FRANCHISE)
        remaining = weights.copy()  # a mechanism that fails is not retried this step
        while item < 0:
            cdf = list(itertools.accumulate(remaining))
            mechanism = min(bisect.bisect_right(cdf, next(uniforms) * cdf[-1]), _POPULAR)
            remaining[mechanism] = 0.0
            if mechanism == _GENRE_PREF:
                genre = int(liked[min(bisect.bisect_right(liked_cdf, next(uniforms)), n_liked - 1)])
                item = _draw_unseen(catalog.genre_pools[genre], seen, uniforms)
                label = _label(_GENRE_PREF, genre)
            elif mechanism == _BINGE:
                binge_genre = min(
                    bisect.bisect_right(catalog.binge_genre_cdf, next(uniforms)),
                    len(catalog.binge_genre_cdf) - 1,
                )
                item = _draw_unseen(catalog.genre_pools[binge_genre], seen, uniforms)
                label = _label(_BINGE, binge_genre)
                span = config.binge_max_length - config.binge_min_length + 1
                binge_left = (
                    config.binge_min_length - 1 + int(next(uniforms) * span) if item >= 0 else 0
                )
            elif mechanism == _FRANCHISE and open_next:
                candidates = list(open_next.values())
                item = candidates[int(next(uniforms) * len(candidates))]
                label = _label(_FRANCHISE)
            elif mechanism == _ERA:
                item = _draw_unseen(catalog.decade_pools[era], seen, uniforms)
                label = _label(_ERA, era)
            elif mechanism == _POPULAR:
                item = _draw_unseen(catalog.everything, seen, uniforms)
                while item < 0:  # the most popular unwatched item; length <= n_items // 2
                    candidate = catalog.popularity_order[scan]
                    item = -1 if candidate in seen else candidate
                    scan += 1
                label = _label(_POPULAR)
        seen.add(item)
        items.append(item)
        labels.append(label)
        in_binge_run.append(continues_binge)

        # A franchise's open successor is the installment after the highest one watched.
        franchise = catalog.franchise[item]
        if (
            franchise >= 0
            and catalog.installment[item] >= catalog.installment[highest.get(franchise, item)]
        ):
            highest[franchise] = item
            following = catalog.next_installment[item]
            if following >= 0 and following not in seen:
                open_next[franchise] = following
                if step > scheduled_step and next(uniforms) < config.franchise_continuation_prob:
                    scheduled_step = step + 1 + int(next(uniforms) * 3)
                    scheduled_franchise = franchise
            else:
                open_next.pop(franchise, None)

    return _UserLog(
        items=np.asarray(items, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        timestamps=_timestamps(rng, config, np.asarray(in_binge_run)),
        ratings=_ratings(rng, config, catalog, np.asarray(items), liked, era),
    )


def _timestamps(
    rng: np.random.Generator, config: SyntheticConfig, in_binge_run: np.ndarray
) -> np.ndarray:
    """Strictly increasing seconds: short gaps within sessions, days between; binges never break."""
    n = len(in_binge_run)
    start = config.start_timestamp + int(rng.random() * config.activity_span_days * 86400)
    new_session = (rng.random(n) < 1 / config.mean_session_length) & ~in_binge_run
    within = config.within_session_gap_s * rng.lognormal(0.0, 0.8, size=n)
    between = config.between_session_gap_s * rng.lognormal(0.0, 1.2, size=n)
    gaps = np.maximum(1, np.rint(np.where(new_session, between, within))).astype(np.int64)
    gaps[0] = 0
    return start + np.cumsum(gaps)


def _ratings(
    rng: np.random.Generator,
    config: SyntheticConfig,
    catalog: _Catalog,
    items: np.ndarray,
    liked: np.ndarray,
    era: int,
) -> np.ndarray:
    """1-5 stars, higher for liked genres, the favourite era and popular films; sequels dip."""
    score = (
        3.3
        + rng.normal(0.0, 0.45)
        + catalog.quality[items]
        + 0.6 * catalog.genre_matrix[items][:, liked].any(axis=1)
        + 0.25 * (catalog.decade[items] == era)
        - 0.2 * (catalog.installment[items] > 1)
        + rng.normal(0.0, 0.85, size=len(items))
    )
    steps = 2.0 if rng.random() < config.half_star_user_share else 1.0
    return (np.clip(np.rint(score * steps) / steps, 1.0, 5.0)).astype(np.float32)


def iter_interaction_batches(
    config: SyntheticConfig, items: pa.Table, users_per_batch: int = 10_000
) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
    """Yield (interactions, ground_truth) per chunk of users, aligned row for row.

    A user's rows depend only on (config.seed, user index), never on `users_per_batch`.
    """
    if users_per_batch < 1:
        raise ValueError(f"users_per_batch={users_per_batch} must be >= 1.")
    catalog = _catalog(items, config.zipf_exponent)
    width = max(6, len(str(config.n_users)))
    for first in range(0, config.n_users, users_per_batch):
        users = range(first, min(first + users_per_batch, config.n_users))
        logs = [_simulate_user(config, catalog, u) for u in users]
        counts = [len(log.items) for log in logs]
        user_ids = pa.array([f"u{u + 1:0{width}d}" for u in users], type=pa.string())
        user_id = user_ids.take(np.repeat(np.arange(len(logs)), counts))
        item_id = catalog.item_ids.take(np.concatenate([log.items for log in logs]))
        timestamp = pa.array(np.concatenate([log.timestamps for log in logs]), type=pa.int64())
        rating = pa.array(np.concatenate([log.ratings for log in logs]), type=pa.float32())
        mechanism = catalog.labels.take(np.concatenate([log.labels for log in logs]))
        yield (
            pa.record_batch([user_id, item_id, timestamp, rating], schema=INTERACTION_SCHEMA),
            pa.record_batch([user_id, item_id, timestamp, mechanism], schema=GROUND_TRUTH_SCHEMA),
        )
