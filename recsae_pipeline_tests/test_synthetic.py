"""The synthetic movie logs: catalog shape, sequence invariants and the planted ground truth."""

from __future__ import annotations

import io
import re
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest

from recsae_pipeline.data.synthetic import (
    GROUND_TRUTH_SCHEMA,
    INTERACTION_SCHEMA,
    ITEM_SCHEMA,
    MOVIELENS_GENRES,
    SyntheticConfig,
    generate_items,
    iter_interaction_batches,
)

SMALL = SyntheticConfig(n_users=300, n_items=400, n_franchises=20, seed=7)


def _logs(config: SyntheticConfig, users_per_batch: int = 10_000) -> tuple[pa.Table, pa.Table]:
    items = generate_items(config)
    batches = list(iter_interaction_batches(config, items, users_per_batch))
    return (
        pa.Table.from_batches([b[0] for b in batches], schema=INTERACTION_SCHEMA),
        pa.Table.from_batches([b[1] for b in batches], schema=GROUND_TRUTH_SCHEMA),
    )


@pytest.fixture(scope="module")
def items() -> pa.Table:
    return generate_items(SMALL)


@pytest.fixture(scope="module")
def logs() -> tuple[pa.Table, pa.Table]:
    return _logs(SMALL)


@pytest.fixture(scope="module")
def rows(items: pa.Table, logs: tuple[pa.Table, pa.Table]) -> list[dict]:
    """Every interaction joined with its mechanism and its item's catalog row."""
    interactions, truth = logs
    catalog = {row["item_id"]: row for row in items.to_pylist()}
    return [
        {**i, "mechanism": t["mechanism"], "item": catalog[i["item_id"]]}
        for i, t in zip(interactions.to_pylist(), truth.to_pylist(), strict=True)
    ]


def _by_user(rows: list[dict]) -> dict[str, list[dict]]:
    users: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        users[row["user_id"]].append(row)
    return users


def test_catalog_schema_ids_titles_and_ranks(items: pa.Table) -> None:
    assert items.schema == ITEM_SCHEMA
    assert items.num_rows == SMALL.n_items
    assert items.column("item_id").to_pylist()[:2] == ["i00001", "i00002"]
    assert len(set(items.column("item_id").to_pylist())) == SMALL.n_items
    titles = items.column("title").to_pylist()
    assert len(set(titles)) == len(titles)
    assert all(re.fullmatch(r"[A-Z][a-z]+( [a-z]+)*( [A-Z][a-z]+)*( \d)?", t) for t in titles)
    assert sorted(items.column("popularity_rank").to_pylist()) == list(range(1, SMALL.n_items + 1))


def test_catalog_genres_are_one_to_three_movielens_genres(items: pa.Table) -> None:
    assert len(MOVIELENS_GENRES) == 18
    for genres in items.column("genres").to_pylist():
        assert 1 <= len(genres) <= 3
        assert len(set(genres)) == len(genres)
        assert set(genres) <= set(MOVIELENS_GENRES)


def test_genres_co_occur_and_drift_with_era() -> None:
    catalog = generate_items(SyntheticConfig())
    genres = [set(g) for g in catalog.column("genres").to_pylist()]
    years = np.array(catalog.column("year").to_pylist())

    def share(genre: str, given: str | None = None) -> float:
        pool = [g for g in genres if given is None or given in g]
        return sum(genre in g for g in pool) / len(pool)

    assert share("Children's", given="Animation") > 3 * share("Children's")
    assert share("Romance", given="Comedy") > 2 * share("Romance", given="Action")
    crime_horror_mystery = sum(share(g, given="Thriller") for g in ("Crime", "Horror", "Mystery"))
    assert crime_horror_mystery > 5 * share("Children's", given="Thriller")
    assert share("Action", given="Sci-Fi") > 2 * share("Action")

    def median_year(genre: str) -> float:
        return float(np.median([y for y, g in zip(years, genres, strict=True) if genre in g]))

    assert 1940 <= median_year("Film-Noir") < 1960
    assert median_year("Western") < median_year("Drama") < median_year("Sci-Fi")
    assert years.min() >= 1930 and years.max() <= 2020
    assert (years >= 1990).sum() > 3 * (years < 1960).sum()


def test_franchises_are_numbered_titled_dated_and_genred_in_order(items: pa.Table) -> None:
    franchises: dict[str, list[dict]] = defaultdict(list)
    for row in items.to_pylist():
        assert (row["franchise"] is None) == (row["installment"] is None)
        if row["franchise"] is not None:
            franchises[row["franchise"]].append(row)
    assert len(franchises) == SMALL.n_franchises
    for name, parts in franchises.items():
        parts.sort(key=lambda r: r["installment"])
        assert [p["installment"] for p in parts] == list(range(1, len(parts) + 1))
        assert 2 <= len(parts) <= 5
        assert [p["title"] for p in parts] == [name] + [
            f"{name} {k}" for k in range(2, len(parts) + 1)
        ]
        assert all(a["year"] < b["year"] for a, b in zip(parts, parts[1:], strict=False))
        assert all(p["genres"] == parts[0]["genres"] for p in parts)


def test_rejects_more_installments_than_items() -> None:
    with pytest.raises(ValueError, match="n_franchises"):
        generate_items(SyntheticConfig(n_items=50, n_franchises=40))


def test_batches_have_the_contract_schemas_and_chunk_by_user(items: pa.Table) -> None:
    batches = list(iter_interaction_batches(SMALL, items, users_per_batch=128))
    assert len(batches) == 3  # ceil(300 / 128)
    for interactions, truth in batches:
        assert interactions.schema == INTERACTION_SCHEMA
        assert truth.schema == GROUND_TRUTH_SCHEMA
    users = [set(b[0].column("user_id").to_pylist()) for b in batches]
    assert [len(u) for u in users] == [128, 128, 44]
    assert min(users[0]) == "u000001" and max(users[-1]) == "u000300"


def test_same_config_gives_identical_bytes_whatever_the_batch_size() -> None:
    def ipc_bytes(tables: tuple[pa.Table, pa.Table]) -> bytes:
        sink = io.BytesIO()
        for table in tables:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table.combine_chunks())
        return sink.getvalue()

    config = SyntheticConfig(n_users=60, n_items=200, n_franchises=10, seed=3)
    reference = ipc_bytes(_logs(config))
    assert ipc_bytes(_logs(config)) == reference
    assert ipc_bytes(_logs(config, users_per_batch=7)) == reference
    assert (
        ipc_bytes(_logs(SyntheticConfig(n_users=60, n_items=200, n_franchises=10, seed=4)))
        != reference
    )


def test_ground_truth_is_aligned_row_for_row(logs: tuple[pa.Table, pa.Table]) -> None:
    interactions, truth = logs
    for column in ("user_id", "item_id", "timestamp"):
        assert truth.column(column).equals(interactions.column(column))
    mechanisms = set(truth.column("mechanism").to_pylist())
    kinds = {m.split(":")[0] for m in mechanisms}
    assert kinds == {"genre_pref", "genre_binge", "franchise_next", "era", "popular"}
    pattern = r"popular|franchise_next|(genre_pref|genre_binge):.+|era:\d{3}0s"
    assert all(re.fullmatch(pattern, m) for m in mechanisms)


def test_sequences_are_unique_chronological_and_long_tailed(
    items: pa.Table, rows: list[dict]
) -> None:
    catalog_ids = set(items.column("item_id").to_pylist())
    users = _by_user(rows)
    assert len(users) == SMALL.n_users
    lengths = np.array([len(seq) for seq in users.values()])
    for seq in users.values():
        assert len({r["item_id"] for r in seq}) == len(seq)
        assert all(a["timestamp"] < b["timestamp"] for a, b in zip(seq, seq[1:], strict=False))
        assert {r["item_id"] for r in seq} <= catalog_ids
    assert lengths.min() >= SMALL.min_sequence_length
    assert 0.7 * SMALL.mean_sequence_length < lengths.mean() < 1.3 * SMALL.mean_sequence_length
    assert lengths.max() > 3 * np.median(lengths)
    assert [r["user_id"] for r in rows] == sorted(r["user_id"] for r in rows)


def test_timestamps_form_sessions(rows: list[dict]) -> None:
    gaps = np.concatenate(
        [np.diff([r["timestamp"] for r in seq]) for seq in _by_user(rows).values()]
    )
    assert np.median(gaps) < 3600
    assert 0.05 < (gaps > 86400).mean() < 0.4
    assert all(r["timestamp"] >= SMALL.start_timestamp for r in rows)


def test_ratings_are_stars_and_higher_for_preferred_genres(rows: list[dict]) -> None:
    ratings = np.array([r["rating"] for r in rows])
    assert set(np.unique(ratings)) <= {1 + k / 2 for k in range(9)}
    assert 3.2 < ratings.mean() < 3.9
    liked_rating, other_rating = [], []
    for seq in _by_user(rows).values():
        liked = {
            r["mechanism"].split(":")[1] for r in seq if r["mechanism"].startswith("genre_pref")
        }
        for r in seq:
            (liked_rating if liked & set(r["item"]["genres"]) else other_rating).append(r["rating"])
    assert np.mean(liked_rating) > np.mean(other_rating) + 0.3


def test_popularity_is_zipf_like(items: pa.Table, rows: list[dict]) -> None:
    counts = defaultdict(int)
    for r in rows:
        counts[r["item_id"]] += 1
    ranked = sorted(counts, key=counts.get, reverse=True)
    top_decile = ranked[: SMALL.n_items // 10]
    assert sum(counts[i] for i in top_decile) / len(rows) > 0.3
    rank = dict(
        zip(
            items.column("item_id").to_pylist(),
            items.column("popularity_rank").to_pylist(),
            strict=True,
        )
    )
    assert np.median([rank[i] for i in top_decile]) < SMALL.n_items / 5


def test_franchise_next_continues_a_franchise_already_watched(rows: list[dict]) -> None:
    continued, soon = 0, 0
    for seq in _by_user(rows).values():
        for step, r in enumerate(seq):
            if r["mechanism"] != "franchise_next":
                continue
            franchise, installment = r["item"]["franchise"], r["item"]["installment"]
            assert franchise is not None and installment >= 2
            earlier = [
                s
                for s, p in enumerate(seq[:step])
                if p["item"]["franchise"] == franchise
                and p["item"]["installment"] == installment - 1
            ]
            assert earlier, (
                f"{r['user_id']} continued {franchise} without installment {installment - 1}"
            )
            assert all(
                p["item"]["installment"] < installment
                for p in seq[:step]
                if p["item"]["franchise"] == franchise
            )
            continued += 1
            soon += step - earlier[0] <= 3
    assert continued > 50
    assert soon / continued > 0.5


def test_binges_are_runs_of_one_genre(rows: list[dict]) -> None:
    binge_rows, in_run = 0, 0
    for seq in _by_user(rows).values():
        labels = [r["mechanism"] for r in seq]
        for step, r in enumerate(seq):
            if not r["mechanism"].startswith("genre_binge:"):
                continue
            assert r["mechanism"].split(":")[1] in r["item"]["genres"]
            binge_rows += 1
            neighbours = labels[max(step - 1, 0) : step] + labels[step + 1 : step + 2]
            in_run += r["mechanism"] in neighbours
    assert binge_rows > 100
    assert in_run / binge_rows > 0.9


def test_genre_pref_and_era_items_match_their_label(rows: list[dict]) -> None:
    for seq in _by_user(rows).values():
        preferred = set()
        for r in seq:
            kind, _, value = r["mechanism"].partition(":")
            if kind == "genre_pref":
                assert value in r["item"]["genres"]
                preferred.add(value)
            elif kind == "era":
                assert int(value[:-1]) <= r["item"]["year"] < int(value[:-1]) + 10
        assert len(preferred) <= 3
    eras = {
        r["mechanism"]
        for seq in _by_user(rows).values()
        for r in seq
        if r["mechanism"].startswith("era:")
    }
    assert len(eras) > 2


def test_default_config_is_about_100k_interactions() -> None:
    config = SyntheticConfig()
    items = generate_items(config)
    n_rows = sum(b.num_rows for b, _ in iter_interaction_batches(config, items))
    assert items.num_rows == 1500
    assert 80_000 <= n_rows <= 130_000
